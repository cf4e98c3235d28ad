"""``stvr data synth``: generate the synthetic STVR benchmark (see ``stvr.data.synthetic``)."""

from __future__ import annotations

import argparse
import json
import sys

_DEFAULTS = None


def _defaults():
    global _DEFAULTS
    if _DEFAULTS is None:
        from ..data.synthetic import SynthConfig

        _DEFAULTS = SynthConfig()
    return _DEFAULTS


def register(dsub: argparse._SubParsersAction) -> None:
    """Add ``stvr data synth`` to the ``stvr data`` sub-commands."""
    d = _defaults()
    s = dsub.add_parser(
        "synth", help="generate the synthetic benchmark (videos, AVA-format CSVs, held-out labels, pairs)",
        description="Render videos of textured actors that move, bounce, get occluded and perform 1-3 of "
        "8 atomic actions (spin, pulse, blink, wobble, colorcycle, scroll, shake, squash) at a time; write "
        "<out>/videos/*.mp4, annotations/{train,val}.csv (AVA format, one row per actor, second and "
        "atom), label_split.json (held-out atom combinations never shown in training videos), "
        "dataset.json, train_tubelets.json, pairs/{val,test}.json and stats.json. Deterministic by seed; "
        "an existing complete root of the same settings is reused unless --force.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--out", default="data/synthetic", help="dataset root to write")
    s.add_argument("--seed", type=int, default=d.seed, help="seed of everything (videos, labels, pairs)")
    s.add_argument("--num-train-videos", type=int, default=d.num_train_videos, help="training videos")
    s.add_argument("--num-val-videos", type=int, default=d.num_val_videos,
                   help="validation videos (both val and test pairs come from them)")
    s.add_argument("--seconds", type=int, default=d.seconds, help="length of every video in seconds")
    s.add_argument("--size", type=int, default=d.size, help="frame side in pixels (even, >= 32)")
    s.add_argument("--actors", type=int, nargs=2, metavar=("MIN", "MAX"), default=list(d.actors),
                   help="actors per video (inclusive range)")
    s.add_argument("--speed", type=float, nargs=2, metavar=("MIN", "MAX"), default=list(d.speed),
                   help="actor speed range in pixels per second")
    s.add_argument("--actor-size", type=float, nargs=2, metavar=("MIN", "MAX"), default=list(d.actor_size),
                   help="actor box side as a fraction of the frame side")
    s.add_argument("--segment-seconds", type=int, nargs=2, metavar=("MIN", "MAX"),
                   default=list(d.segment_seconds), help="seconds between atom changes")
    s.add_argument("--atoms-per-label", type=float, nargs=3, metavar=("P1", "P2", "P3"),
                   default=list(d.atoms_per_label),
                   help="weights of 1, 2 and 3 atoms per training actor segment (1 0 0: one atom at a time)")
    s.add_argument("--val-labels", type=int, default=d.num_val_labels, help="held-out validation labels")
    s.add_argument("--test-labels", type=int, default=d.num_test_labels, help="held-out test labels")
    s.add_argument("--heldout-probability", type=float, default=d.heldout_probability,
                   help="share of actor segments in validation videos with a held-out label")
    s.add_argument("--occlusion-probability", type=float, default=d.occlusion_probability,
                   help="probability that a video has a moving occluder")
    s.add_argument("--no-camera-pan", action="store_true", help="keep the background still")
    s.add_argument("--workers", type=int, default=None,
                   help="rendering processes (default: up to 4, the CPU count); output does not depend on it")
    s.add_argument("--force", action="store_true",
                   help="regenerate even if the root is complete (and overwrite a non-synthetic root)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=run_synth)


def config_from_args(args: argparse.Namespace):
    """The :class:`~stvr.data.synthetic.SynthConfig` of parsed ``stvr data synth`` arguments."""
    from dataclasses import replace

    return replace(
        _defaults(),
        seed=args.seed,
        num_train_videos=args.num_train_videos,
        num_val_videos=args.num_val_videos,
        seconds=args.seconds,
        size=args.size,
        actors=tuple(int(v) for v in args.actors),
        speed=tuple(float(v) for v in args.speed),
        actor_size=tuple(float(v) for v in args.actor_size),
        segment_seconds=tuple(int(v) for v in args.segment_seconds),
        atoms_per_label=tuple(float(v) for v in args.atoms_per_label),
        num_val_labels=args.val_labels,
        num_test_labels=args.test_labels,
        heldout_probability=args.heldout_probability,
        occlusion_probability=args.occlusion_probability,
        camera_pan=not args.no_camera_pan,
    )


def format_summary(summary: dict) -> str:
    """Human-readable summary of :func:`stvr.data.synthetic.generate_dataset`."""
    v, sec, p, lab = summary["videos"], summary["seconds"], summary["pairs"], summary["labels"]
    head = "generated" if summary["generated"] else "reused (complete, same settings; --force regenerates)"
    lines = [
        f"{summary['root']}: {head}",
        f"  videos   train {v['train']} ({sec['train']} s), val {v['val']} ({sec['val']} s), "
        f"{summary['size']}x{summary['size']} at {summary['fps']} fps",
        f"  train    {summary['tubelets']['train']} tubelets, {lab['train']} combined labels",
        f"  val      {p['val']} pairs over {lab['val_with_pairs']}/{lab['val']} held-out labels "
        f"({', '.join(summary['held_out'].get('val', []))})",
        f"  test     {p['test']} pairs over {lab['test_with_pairs']}/{lab['test']} held-out labels "
        f"({', '.join(summary['held_out'].get('test', []))})",
    ]
    if summary["generated"]:
        t = summary.get("timing", {})
        lines.append(f"  time     {summary['elapsed_s']:.1f} s ({summary.get('realtime_factor', 0):.1f}x real time, "
                     f"{t.get('workers', 1)} worker(s); render {t.get('render_s', 0):.1f} s, "
                     f"encode {t.get('encode_s', 0):.1f} s summed), "
                     f"{t.get('video_bytes', 0) / 1e6:.1f} MB of video")
    return "\n".join(lines)


def run_synth(args: argparse.Namespace) -> int:
    from ..data.synthetic import generate_dataset

    try:
        cfg = config_from_args(args).validate()
        summary = generate_dataset(args.out, cfg, progress=not args.quiet, workers=args.workers, force=args.force)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    if summary["pairs"]["val"] == 0 or summary["pairs"]["test"] == 0:
        print("warning: a held-out split has no pairs; use more or longer validation videos "
              "(--num-val-videos, --seconds) or a larger --heldout-probability", file=sys.stderr)
    return 0
