"""``stvr demo``: the end-to-end run of ``make demo`` on the embedded synthetic benchmark.

1. generate the synthetic data set (cached: an existing root of the same
   generator config is reused; a root holding a set of other settings, e.g.
   another seed, is never overwritten: pass its settings with ``--synth``);
2. train the warp-LSTM matching network with the ``cpu`` preset (resumable: a
   finished run of the same config is reused);
3. predict the test pairs with the trained model and with the untrained model
   (the same random initialisation, same seed) and evaluate both: frame-mAP at
   IoU 0.3 / 0.5 / 0.7 (the official protocol), video-mAP of linked tubes at
   0.2 / 0.5, and the matching diagnostics (actor recall, match AUC; a chance
   row: frame-mAP@0.5 of every annotated actor's exact box with random scores);
4. print a table, write ``<out>/results.json``, the test detections and figures
   (training curves, label distribution, Figure 7 warped grid, Figure 8 results).

The trained checkpoint stays in ``<out>`` (default ``runs/demo``), the default
checkpoint of ``stvr relocalize``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

from ..experiments import (adopt_postprocessing, auc_text, chance_map, config_matches, device_name,
                           evaluate_model, pct, prepare_data, run_config, test_dataset)
from ..utils import atomic_write, write_json

DEMO_OUT = "runs/demo"
DEMO_DATA = "data/synthetic"


def training_processes(requested: int, device: str, batch_size: int) -> int:
    """Processes for training: ``requested`` if > 0, else 2 on a CPU with >= 2 cores
    (when the batch splits evenly), else 1."""
    if requested > 0:
        if batch_size % requested:
            raise ValueError(f"--procs {requested} does not divide train.batch_size={batch_size}")
        return requested
    if device.startswith("cuda") or (os.cpu_count() or 1) < 2 or batch_size % 2:
        return 1
    return 2


# --------------------------------------------------------------------------- the command


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthetic data -> train warp LSTM -> evaluate (make demo)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEMO_OUT, help=f"run folder (default {DEMO_OUT})")
    p.add_argument("--data", default=DEMO_DATA, help=f"synthetic dataset root (default {DEMO_DATA})")
    p.add_argument("--steps", type=int, help="training steps (default: the cpu preset's train.max_steps)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--preset", default="cpu", choices=("cpu", "paper"), help="config preset (default cpu)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set train.lr=0.02 (repeatable)")
    p.add_argument("--synth", action="append", default=[], metavar="FIELD=VALUE",
                   help="synthetic generator override (SynthConfig field, repeatable)")
    p.add_argument("--procs", type=int, default=0,
                   help="training processes (DDP, gloo) on CPU; 0 = auto: 2 single-threaded "
                        "processes when the CPU has >= 2 cores (faster than one 2-thread process), "
                        "1 on CUDA")
    p.add_argument("--fresh", action="store_true", help="retrain even if a finished run exists")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..model import STVRModel
    from ..checkpoint import load_checkpoint
    from ..train import spawn_train, train

    t_start = time.perf_counter()
    progress = not args.quiet
    out = Path(args.out)
    device = device_name(args.device)
    timings: dict[str, float] = {}

    print(f"[1/4] synthetic data set at {args.data}")
    t0 = time.perf_counter()
    data_summary = prepare_data(args.data, args.synth, progress=progress)
    timings["data_seconds"] = round(time.perf_counter() - t0, 2)

    cfg = run_config(args.preset, args.data, args.seed, device, args.overrides)
    steps = int(args.steps if args.steps is not None else cfg.train.max_steps)
    cfg.train.max_steps = steps
    procs = training_processes(args.procs, device, cfg.train.batch_size)
    if procs > 1:
        cfg.train.batch_size //= procs        # per process; the step's batch stays the same
    # a run of the same training config whose detection post-processing (model.det_*) differs,
    # e.g. after an upgrade changed the preset's, is kept: its folder takes the new one
    adopted = None if args.fresh else adopt_postprocessing(out, cfg)
    if adopted:
        changes = ", ".join(f"{k} {v!r} -> {getattr(cfg.model, k)!r}" for k, v in adopted.items())
        print(f"      {out}: run reused with the new detection post-processing ({changes}); "
              f"its validation log keeps the numbers of the old one")
    resume = not args.fresh and config_matches(out, cfg)
    if not args.fresh and (out / "config.json").exists() and not resume:
        print(f"      {out} holds a run of another config or other starting weights: training from scratch")
    how = f"{procs} processes x {cfg.train.batch_size} pairs" if procs > 1 else device
    if cfg.model.action_ids:                  # the action distance term (model.match_action_distance)
        how += f"; action probe over the {len(cfg.model.action_ids)} training actions"
    print(f"[2/4] training the {cfg.model.cell} model ({args.preset} preset, {steps} steps, "
          f"seed {args.seed}, {how}) -> {out}")
    t0 = time.perf_counter()
    if procs > 1:
        summary = spawn_train(cfg, out, procs, resume=resume, max_steps=steps, progress=progress)
    else:
        summary = train(cfg, out, resume=resume, max_steps=steps, progress=progress)
    timings["train_seconds"] = round(time.perf_counter() - t0, 2)

    print("[3/4] evaluating on the test pairs")
    dataset = test_dataset(cfg)
    t0 = time.perf_counter()
    trained, _, state = load_checkpoint(out, device=device)
    res_trained = evaluate_model(trained, dataset, device, out / "test_detections.json", progress)
    res_trained["checkpoint_step"] = int(state["step"])
    torch.manual_seed(cfg.train.seed)       # the initialisation train() started from
    untrained = STVRModel(cfg.model).to(device).eval()
    res_untrained = evaluate_model(untrained, dataset, device, out / "test_detections_untrained.json",
                                   progress)
    timings["eval_seconds"] = round(time.perf_counter() - t0, 2)

    table = results_table({"warp LSTM, trained" if cfg.model.cell == "warp" else f"{cfg.model.cell}, trained":
                           res_trained, untrained_name(cfg): res_untrained})
    print(table)

    figures: dict[str, str] = {}
    if not args.no_figures:
        print("[4/4] figures")
        t0 = time.perf_counter()
        figures = make_figures(out, cfg, trained, dataset, device)
        timings["figure_seconds"] = round(time.perf_counter() - t0, 2)
        for name, path in figures.items():
            print(f"      {name}: {path}")
    timings["total_seconds"] = round(time.perf_counter() - t_start, 2)

    from ..config import config_to_dict

    results = {
        "data": {"root": str(args.data), "summary": data_summary},
        "config": config_to_dict(cfg),
        "steps": steps,
        "train": summary,
        "postprocessing_adopted_from": adopted,
        "trained": res_trained,
        "untrained": res_untrained,
        "timings": timings,
        "figures": figures,
        "checkpoint": str(out),
        "device": device,
        "training_processes": procs,
        "pairs_per_step": cfg.train.batch_size * procs,
        "torch_threads": torch.get_num_threads(),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results, indent=2, default=str)
    atomic_write(out / "results.md", table + "\n")
    print(f"results: {out / 'results.json'}; total {timings['total_seconds']:.0f} s "
          f"(data {timings['data_seconds']:.0f} s, training {timings['train_seconds']:.0f} s, "
          f"evaluation {timings['eval_seconds']:.0f} s)")
    if res_trained["failed_pairs"]:
        print(f"warning: {len(res_trained['failed_pairs'])} test pair(s) could not be loaded")
    return 0


def untrained_name(cfg) -> str:
    """Row name of the model before training: its head is random; its backbone may be pretrained."""
    if cfg.model.backbone == "tiny" and cfg.model.backbone_weights:
        return "untrained head (pretrained backbone)"
    if cfg.model.backbone == "i3d" and cfg.model.i3d_weights:
        return "untrained head (pretrained I3D)"
    return "untrained (random init)"


def results_table(results: dict[str, dict]) -> str:
    """Markdown table: frame-mAP at 0.3 / 0.5 / 0.7, video-mAP at 0.2 / 0.5 (percent), actor
    recall (percent) and match AUC (``r["diagnostics"]``, :func:`stvr.evaluation.match_diagnostics`),
    and a last row with the chance frame-mAP@0.5 of the same pairs (every annotated actor's
    exact box with random scores: the floor a matcher must clear)."""
    lines = ["| model | frame-mAP@0.3 | frame-mAP@0.5 | frame-mAP@0.7 | video-mAP@0.2 | video-mAP@0.5 "
             "| actor recall | match AUC |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        fm, vm, diag = r["frame_mAP"], r.get("video_mAP") or {}, r.get("diagnostics") or {}
        lines.append(f"| {name} | {pct(fm.get('0.3'))} | {pct(fm.get('0.5'))} | {pct(fm.get('0.7'))} | "
                     f"{pct(vm.get('0.2'))} | {pct(vm.get('0.5'))} | {pct(diag.get('actor_recall'))} | "
                     f"{auc_text(diag.get('match_auc'))} |")
    chance = chance_map(results.values())
    if chance is not None:
        lines.append(f"| chance (every actor's exact box, random scores) | | {pct(chance)} | | | | 100.0 | ~0.50 |")
    return "\n".join(lines)


def make_figures(out: Path, cfg, model, dataset, device: str) -> dict[str, str]:
    """Training curves, label distribution, Figure 7 (warp cell only) and Figure 8 of the demo run.

    Uses :mod:`stvr.viz` when it is installed; returns ``{figure name: path}``.
    """
    if importlib.util.find_spec("stvr.viz") is None:
        print("      stvr.viz is not installed: no figures")
        return {}
    from .. import viz
    from ..data.pairs import load_dataset_json, resolve_video_path

    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    root = Path(cfg.data.root)
    figs: dict[str, str] = {}
    figs["training_curves"] = str(viz.figure_curves([out], fig_dir / "training_curves.png",
                                                    labels=[f"{cfg.model.cell} (demo)"]))
    if (root / "stats.json").exists():
        figs["label_distribution"] = str(viz.figure_labels(root, fig_dir / "label_distribution.png"))
    pairs = dataset.pairs
    if pairs:
        # the test pair with the most ground-truth boxes: the clearest Figure 8
        best = max(range(len(pairs)), key=lambda i: sum(len(g) for g in pairs[i]["reference"]["gt"]))
        figs["results"] = str(viz.figure_results(
            dataset.pairs_path, best, {"trained": out / "test_detections.json",
                                       "untrained": out / "test_detections_untrained.json"},
            fig_dir / "results.png", root=root, fps=cfg.data.fps, clip_frames=cfg.model.clip_frames))
        if cfg.model.cell == "warp":
            ref = pairs[best]["reference"]
            clips_per_second = cfg.data.fps // cfg.model.clip_frames
            n_clips = min(6, clips_per_second * (int(ref["end"]) - int(ref["start"])) - 1)
            if n_clips >= 1:
                video = resolve_video_path(root, load_dataset_json(root), ref["id"], cfg.data.videos)
                figs["warp_grid"] = str(viz.figure_warp_grid(model, video, fig_dir / "warp_grid.png",
                                                             start=float(ref["start"]), num_clips=n_clips,
                                                             device=device))
    return figs
