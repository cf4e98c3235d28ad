"""What does a trained recurrent cell use at inference? (issue 11, Table 1's "why")

Evaluates finished runs (e.g. the Table 1 runs of ``stvr bench table1``) on a split
of their dataset root three ways, with the same weights:

* ``trained``: as trained (the run's own test result);
* ``zero_warp``: the Warp LSTM's predicted displacements set to zero (the state is
  not moved; every other computation unchanged). Warp LSTM runs only;
* ``no_memory``: the cell's state reset to zero at every clip (no information
  flows from one clip to the next through the cell; ``model.match_clips`` still
  averages the maps of a second, as trained).

If ``zero_warp`` scores like ``trained``, the displacements do not matter at
inference; if ``no_memory`` does, the cell's memory does not either, and what
tells the methods apart is what the per-clip computation learned.

    python benchmarks/bench_cell_ablation.py --data data/v4-s0-96 \\
        --runs runs/table1-v7/warp-seed0 runs/table1-v7/conv-seed0

Prints a Markdown table (frame-mAP@0.5 and match AUC per run and ablation) and
writes ``benchmarks/results/bench_cell_ablation[-TAG].json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from stvr.checkpoint import load_checkpoint
from stvr.experiments import evaluate_model, test_dataset
from stvr.recurrent import WarpLSTMCell

ABLATIONS = ("trained", "zero_warp", "no_memory")


@contextlib.contextmanager
def ablated(model: torch.nn.Module, ablation: str) -> Iterator[bool]:
    """Apply ``ablation`` to ``model.cell`` (an instance attribute, undone on exit).
    Yields False when the ablation does not apply (no cell, or ``zero_warp`` on another cell)."""
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose from {ABLATIONS}")
    cell = getattr(model, "cell", None)
    if ablation == "trained":
        yield True
        return
    if cell is None or (ablation == "zero_warp" and not isinstance(cell, WarpLSTMCell)):
        yield False
        return
    if ablation == "zero_warp":
        original = cell.predict_offsets

        def zero_offsets(x, h):
            points, offsets = original(x, h)
            return points, torch.zeros_like(offsets)

        cell.predict_offsets = zero_offsets
        try:
            yield True
        finally:
            del cell.predict_offsets
    else:                                          # "no_memory"
        original = cell.forward

        def forget(x, state=None, context=None, **extra):
            return original(x, None, context, **extra)

        cell.forward = forget
        try:
            yield True
        finally:
            del cell.forward


def evaluate_run(run: Path, root: Path, split: str, ablations: tuple[str, ...], datasets: dict) -> dict:
    """``{ablation: {"mAP", "match_auc"} or None}`` (percent / AUC) of one run folder on ``root``'s
    split (:func:`stvr.experiments.evaluate_model`); ``datasets`` caches the evaluation dataset per
    image size across runs."""
    model, cfg, state = load_checkpoint(run)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(root), videos=None, cache=None))
    if cfg.model.image_size not in datasets:
        datasets[cfg.model.image_size] = test_dataset(cfg, split)
    out: dict = {"cell": cfg.model.cell, "step": state.get("step")}
    for ab in ablations:
        with ablated(model, ab) as applies:
            if not applies:
                out[ab] = None
                continue
            res = evaluate_model(model, datasets[cfg.model.image_size], "cpu", progress=False, video_ious=None)
        out[ab] = {"mAP": 100 * res["frame_mAP"]["0.5"], "match_auc": res["diagnostics"]["match_auc"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", type=Path, required=True, help="run folders (checkpoints)")
    ap.add_argument("--data", type=Path, required=True, help="the runs' dataset root")
    ap.add_argument("--split", default="test")
    ap.add_argument("--ablations", nargs="+", choices=ABLATIONS, default=list(ABLATIONS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    args = ap.parse_args()
    missing = [str(r) for r in args.runs if not r.is_dir()]
    if missing:                                   # before hours of evaluation, not in the middle
        ap.error(f"--runs: no such run folder: {', '.join(missing)}")
    if not (args.data / "pairs" / f"{args.split}.json").is_file():
        ap.error(f"--data {args.data}: no pairs/{args.split}.json (a dataset root of `stvr data synth`)")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = {"data": str(args.data), "split": args.split, "runs": {}}
    print("| run | cell | " + " | ".join(args.ablations) + " |\n|---|---|" + "---:|" * len(args.ablations))
    datasets: dict = {}
    for run in args.runs:
        r = evaluate_run(run, args.data, args.split, tuple(args.ablations), datasets)
        results["runs"][str(run)] = r
        cells = [f"{r[a]['mAP']:.1f} ({r[a]['match_auc']:.3f})" if r[a] else "-" for a in args.ablations]
        print(f"| {run.name} | {r['cell']} | " + " | ".join(cells) + " |", flush=True)
    by_cell: dict = {}
    for r in results["runs"].values():
        by_cell.setdefault(r["cell"], []).append(r)
    for cell, rs in by_cell.items():
        means = []
        for a in args.ablations:
            v = [r[a]["mAP"] for r in rs if r[a]]
            means.append(f"**{np.mean(v):.1f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.1f}**" if v else "-")
        print(f"| mean of {len(rs)} | {cell} | " + " | ".join(means) + " |")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(__file__).parent / "results" / f"bench_cell_ablation{'-' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"({results['seconds']} s; {out})")


if __name__ == "__main__":
    main()
