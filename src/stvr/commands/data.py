"""``stvr data``: build dataset roots (``ava``, ``ucf24``, ``synth``) and show their statistics."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``stvr data {ava,ucf24,stats,synth}``."""
    p = sub.add_parser("data", help="build a dataset root (AVA, UCF-101-24, synthetic) or show its statistics",
                       description="Build dataset roots: tubelets, held-out label split, pair files, statistics.")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    a = dsub.add_parser(
        "ava", help="reorganize AVA CSVs into training tubelets and val/test pairs",
        description="Reads the AVA train and val CSVs, holds out the 27 val + 27 test combined labels "
        "(official STVR split by default), and writes <out>/dataset.json, annotations/, label_split.json, "
        "train_tubelets.json, pairs/val.json, pairs/test.json and stats.json. Reference spans are clipped "
        "to AVA's annotated range [900, 1800) s.")
    a.add_argument("train_csv", help="AVA train CSV (e.g. ava_train_v2.1.csv)")
    a.add_argument("val_csv", help="AVA val CSV (e.g. ava_val_v2.1.csv)")
    a.add_argument("--out", required=True, help="dataset root to write")
    a.add_argument("--videos", help="folder with the AVA videos (<video_id>.<ext>); optional")
    a.add_argument("--split-json", help="label split: the official val_test.json ([test, val] lists) or "
                   "{'val': [...], 'test': [...]}; default: the packaged official split")
    a.add_argument("--seed", type=int, default=0, help="seed of the reference draws (default 0)")
    a.add_argument("--force", action="store_true",
                   help="replace the files of an existing dataset root at --out (default: refuse)")
    a.add_argument("--strict", action="store_true",
                   help="stop at the first malformed CSV row (default: skip malformed rows with a warning)")
    a.set_defaults(func=run_ava)

    u = dsub.add_parser(
        "ucf24", help="UCF-101-24 annotations (pyannot.pkl or JSON) into a dataset root",
        description="Reads pyannot.pkl (restricted unpickler) or its JSON version, splits the classes "
        "14/5/5 (seeded), and writes the dataset root with tubelets, pairs and statistics.")
    u.add_argument("annotations", help="pyannot.pkl or a JSON file with the same structure")
    u.add_argument("--out", required=True, help="dataset root to write")
    u.add_argument("--videos", help="folder with the UCF101 videos (<class>/<name>.avi or <name>.avi)")
    u.add_argument("--seed", type=int, default=0, help="seed of the class split and reference draws")
    u.add_argument("--width", type=int, default=320, help="frame width in pixels (default 320)")
    u.add_argument("--height", type=int, default=240, help="frame height in pixels (default 240)")
    u.add_argument("--fps", type=float, default=25.0, help="frame rate of the annotations (default 25)")
    u.add_argument("--box-format", choices=("xywh", "xyxy"), default="xywh",
                   help="pixel box layout in the file (pyannot.pkl: xywh, the default)")
    u.set_defaults(func=run_ucf24)

    s = dsub.add_parser("stats", help="statistics of a dataset root (and the label-distribution plot)",
                        description="Prints the counts per split and the largest labels; --plot writes "
                        "a bar chart of samples per combined label (paper Fig. 6).")
    s.add_argument("root", help="dataset root")
    s.add_argument("--plot", help="write the label-distribution PNG here")
    s.add_argument("--top", type=int, default=10, help="labels listed per split (default 10)")
    s.add_argument("--json", action="store_true", help="print the statistics as JSON")
    s.set_defaults(func=run_stats)

    try:
        data_synth = importlib.import_module("stvr.commands.data_synth")
    except ModuleNotFoundError as err:
        if err.name != "stvr.commands.data_synth":
            raise
    else:
        data_synth.register(dsub)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _read_csv(path: Path, strict: bool):
    from ..data.ava import read_annotations

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = read_annotations(path, strict=strict)
    for w in caught:   # through the CLI's logging, like every other warning (-q hides them)
        logging.getLogger("stvr.warnings").warning("%s", w.message)
    return rows, len(caught)


def check_root_output(out: Path, force: bool) -> None:
    """A dataset root to write: not a file, in a writable folder, and not an existing
    dataset root unless ``force`` (ValueError otherwise)."""
    from ..guards import check_parent

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; --out is the dataset root folder to write")
    check_parent(out / "dataset.json", "--out")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: folder is not writable")
    if (out / "dataset.json").exists() and not force:
        raise ValueError(f"--out {out} already holds a dataset root (dataset.json); pass --force to "
                         f"replace its files, or choose another --out")


def _move_into_place(stage: Path, final: Path) -> None:
    """Move the files built in ``stage`` to ``final`` (a new folder: one rename; an
    existing one: file by file, other files of it are kept)."""
    if not final.exists():
        os.rename(stage, final)
        return
    for src in sorted(p for p in stage.rglob("*") if p.is_file()):
        dst = final / src.relative_to(stage)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
    import shutil

    shutil.rmtree(stage, ignore_errors=True)


def run_ava(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..data.ava import AVA_TIME_RANGE, load_label_split, write_annotations
    from ..data.pairs import build_dataset_root
    from ..data.stats import format_stats
    from ..guards import default_dir_mode
    from ..utils import write_json

    import shutil
    import tempfile

    final = Path(args.out)
    stage = None
    try:
        check_root_output(final, args.force)
        if args.videos and not Path(args.videos).is_dir():
            return _fail(f"--videos {args.videos}: not a folder")
        split = load_label_split(args.split_json)
        with tqdm(total=4, desc="ava", unit="step") as steps:
            rows = {}
            for name, path in (("train", Path(args.train_csv)), ("val", Path(args.val_csv))):
                if not path.is_file():
                    return _fail(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
                rows[name], _ = _read_csv(path, args.strict)
                if not rows[name]:
                    return _fail(f"{path}: no valid annotation rows (the file is empty or every row is "
                                 f"malformed); nothing written")
                steps.update(1)
            # everything is written into a hidden folder next to --out and moved into place at
            # the end: a failure partway leaves no half-written dataset root
            final.parent.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
            os.chmod(stage, default_dir_mode())  # mkdtemp's 0700 -> the user's normal folder mode
            out = stage
            for name in ("train", "val"):
                write_annotations(rows[name], out / "annotations" / f"{name}.csv")
            write_json(out / "label_split.json",
                       {"val": [list(x) for x in split["val"]], "test": [list(x) for x in split["test"]]}, indent=1)
            train_ids = sorted({r.video_id for r in rows["train"]})
            val_ids = sorted({r.video_id for r in rows["val"]})
            videos, missing = {}, []
            if args.videos:
                vdir = Path(args.videos)
                for vid in tqdm(sorted(set(train_ids) | set(val_ids)), desc="videos", unit="video", leave=False):
                    found = sorted(p for p in vdir.glob(f"{vid}.*") if p.is_file())
                    if found:
                        videos[vid] = str(found[0].resolve())
                    else:
                        missing.append(vid)
            dataset = {
                "name": "ava",
                "fps": 24,
                "videos": videos,
                "time_ranges": {vid: list(AVA_TIME_RANGE) for vid in sorted(set(train_ids) | set(val_ids))},
                "train_videos": train_ids,
                "val_videos": val_ids,
            }
            write_json(out / "dataset.json", dataset, indent=1)
            steps.update(1)
            stats = build_dataset_root(out, seed=args.seed)
            _move_into_place(stage, final)
            stage = None
            out = final
            steps.update(1)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    print(format_stats(stats, top=5))
    print(f"wrote {out}: {len(rows['train'])} train rows ({len(train_ids)} videos), "
          f"{len(rows['val'])} val rows ({len(val_ids)} videos); "
          f"{stats['splits']['train']['tubelets']} training tubelets, "
          f"{stats['splits']['val']['pairs']} val pairs, {stats['splits']['test']['pairs']} test pairs")
    if args.videos:
        print(f"videos: {len(videos)} found, {len(missing)} missing" + (f" (e.g. {missing[:5]})" if missing else ""))
    else:
        print("videos: none given (--videos); training/evaluation need them")
    return 0


def run_ucf24(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..data.stats import format_stats
    from ..data.ucf24 import write_ucf24_root

    path = Path(args.annotations)
    if not path.is_file():
        return _fail(f"{path}: no such file")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _fail(f"--out {out} is a file; --out is the dataset root folder to write")
    try:
        from ..guards import check_parent

        check_parent(out / "dataset.json", "--out")
    except ValueError as err:
        return _fail(str(err))
    try:
        with tqdm(total=1, desc="ucf24", unit="root") as bar:
            stats = write_ucf24_root(path, args.out, videos_dir=args.videos, seed=args.seed,
                                     width=args.width, height=args.height, fps=args.fps,
                                     box_format=args.box_format)
            bar.update(1)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    print(format_stats(stats, top=5))
    missing = stats.get("missing_videos", [])
    print(f"wrote {args.out}: {stats['splits']['train']['tubelets']} training tubelets, "
          f"{stats['splits']['val']['pairs']} val pairs, {stats['splits']['test']['pairs']} test pairs"
          + (f"; {len(missing)} videos missing" if args.videos else "; no --videos given"))
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from ..data.ava import load_label_split
    from ..data.pairs import load_dataset_json, load_pairs, load_tubelets
    from ..data.stats import compute_stats, format_stats, plot_label_distribution

    root = Path(args.root)
    try:
        if (root / "train_tubelets.json").is_file():
            train = load_tubelets(root / "train_tubelets.json")
            pairs = {n: load_pairs(root / "pairs" / f"{n}.json") for n in ("val", "test")
                     if (root / "pairs" / f"{n}.json").is_file()}
            split = load_label_split(root / "label_split.json") if (root / "label_split.json").is_file() else None
            old = json.loads((root / "stats.json").read_text()) if (root / "stats.json").is_file() else {}
            names = old.get("label_names") or load_dataset_json(root).get("label_names")
            stats = compute_stats(train, pairs, split, label_names=names)
        elif (root / "stats.json").is_file():
            stats = json.loads((root / "stats.json").read_text())
        else:
            return _fail(f"{root}: no train_tubelets.json or stats.json (build it with `stvr data ava|ucf24|synth`)")
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats, top=args.top))
    if args.plot:
        path = plot_label_distribution(stats, args.plot)
        print(f"wrote {path}")
    return 0
