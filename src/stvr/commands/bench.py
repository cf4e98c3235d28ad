"""``stvr bench table1``: the paper's Table 1 (five methods) on the synthetic benchmark.

Every method is the same matching network with a different recurrent layer
(reference-facts.md section 8): Clip = no cell, ConvLSTM = ``conv``, Optical
Flow = ``flow`` (ConvLSTM whose state is warped by optical flow), TrajLSTM =
``traj``, Warp LSTM = ``warp``. All are trained with the same preset, data,
number of steps and seeds, and evaluated on the test pairs with the official
frame-mAP (IoU 0.3 / 0.5 / 0.7; 0.5 is the paper's headline), video-mAP and
the matching diagnostics (actor recall and match AUC per method; a chance row:
frame-mAP@0.5 of every annotated actor's exact box with random scores, see
:func:`stvr.evaluation.match_diagnostics`). A finished run without diagnostics
gets them from its saved test detections (no retraining).

Runs live in ``<runs>/<method>-seed<k>/`` (checkpoints, logs and the run's
``results.json``). A run whose ``results.json`` matches the requested config is
skipped; one whose config differs only in the detection post-processing
(``model.det_*``; these runs do not validate, so training never reads them) is
evaluated again from its last checkpoint; an unfinished one resumes from its last
checkpoint, so the command can be killed and restarted at any time (e.g. in the
background). After every run
the aggregate table is rewritten: ``<out>/table1.md`` (mean ± sample standard
deviation over seeds, in percent) and ``<out>/table1.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

from ..experiments import (adopt_postprocessing, chance_map, config_matches, device_name, evaluate_model,
                           only_postprocessing_differs, pct, prepare_data, run_config, test_dataset,
                           weights_match)
from ..utils import atomic_write, write_json

# method key -> (paper name, model.cell, paper Table 1 frame-mAP@0.5 on AVA, on UCF-101-24)
METHODS: dict[str, tuple[str, str, float, float]] = {
    "clip": ("Clip", "none", 18.8, 52.9),
    "conv": ("ConvLSTM", "conv", 20.8, 53.5),
    "flow": ("Optical Flow", "flow", 20.2, 52.0),
    "traj": ("TrajLSTM", "traj", 21.0, 54.8),
    "warp": ("Warp LSTM", "warp", 21.8, 59.4),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks of the paper's tables (table1)",
                       description="Reproduce the shape of the paper's tables on the synthetic benchmark.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    t = bsub.add_parser("table1", help="Table 1: Clip, ConvLSTM, Optical Flow, TrajLSTM, Warp LSTM",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    t.add_argument("--steps", type=int, help="training steps per run (default: the preset's train.max_steps)")
    t.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   help="methods to run (default: all five)")
    t.add_argument("--data", default="data/synthetic", help="synthetic dataset root (default data/synthetic)")
    t.add_argument("--runs", default="runs/table1", help="folder of the run folders (default runs/table1)")
    t.add_argument("--out", default="benchmarks/results", help="where table1.md / table1.json go")
    t.add_argument("--preset", default="cpu", choices=("cpu", "paper"), help="config preset (default cpu)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run (repeatable)")
    t.add_argument("--synth", action="append", default=[], metavar="FIELD=VALUE",
                   help="synthetic generator override (repeatable)")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    t.add_argument("--jobs", type=int, default=1,
                   help="runs trained in parallel processes (default 1); with N > 1 each process "
                        "uses --threads torch threads (on 2 CPU cores, --jobs 2 --threads 1 gets "
                        "about 1.4x the throughput of one 2-thread run)")
    t.add_argument("--threads", type=int, default=1, help="torch threads per job when --jobs > 1 (default 1)")
    t.add_argument("--no-video-map", action="store_true", help="frame-mAP only (skip tube linking)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=run_table1)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _run_dir(runs: Path, method: str, seed: int) -> Path:
    return runs / f"{method}-seed{seed}"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def run_one(method: str, seed: int, args: argparse.Namespace, steps: int | None, dataset_cache: dict) -> dict:
    """Train (or resume) and evaluate one (method, seed) run; returns its results dict."""
    from ..config import config_to_dict
    from ..train import train

    name, cell, _, _ = METHODS[method]
    device = device_name(args.device)
    cfg = run_config(args.preset, args.data, seed, device, [*args.overrides, f"model.cell={cell}"])
    if steps is not None:
        cfg.train.max_steps = int(steps)
    cfg.train.eval_every = 0             # same budget for every method: no validation, last checkpoint
    run_dir = _run_dir(Path(args.runs), method, seed)
    cfg_dict = json.loads(json.dumps(config_to_dict(cfg)))
    done = _read_json(run_dir / "results.json")
    if done is not None and not weights_match(run_dir, cfg):
        done = None                       # trained from other weights (e.g. older shipped ones): retrain
    if done is not None and done.get("config") == cfg_dict:
        if "diagnostics" not in done:     # a run finished before the diagnostics existed
            _add_diagnostics(done, run_dir, cfg, dataset_cache)
        return done
    if done is not None and only_postprocessing_differs(done.get("config"), cfg_dict) \
            and (run_dir / "last.safetensors").exists():
        return _reevaluate(done, run_dir, cfg, cfg_dict, args, dataset_cache)
    resume = config_matches(run_dir, cfg)
    t0 = time.perf_counter()
    summary = train(cfg, run_dir, resume=resume, max_steps=cfg.train.max_steps, progress=not args.quiet)
    t_train = time.perf_counter() - t0
    res, state = _evaluate_last(run_dir, cfg, args, dataset_cache)
    res.update({
        "method": name, "key": method, "cell": cell, "seed": seed, "steps": cfg.train.max_steps,
        "checkpoint_step": int(state["step"]), "train": summary,
        "train_seconds_this_call": round(t_train, 1), "config": cfg_dict,
    })
    write_json(run_dir / "results.json", res, indent=2, default=str)
    return res


def _evaluate_last(run_dir: Path, cfg, args: argparse.Namespace, dataset_cache: dict) -> tuple[dict, dict]:
    """``(results, checkpoint state)`` of the run's last checkpoint on the test pairs, with the
    post-processing (``model.det_*``) of ``cfg``; the detections go to ``test_detections.json``."""
    from ..checkpoint import load_checkpoint

    device = device_name(args.device)
    model, _, state = load_checkpoint(run_dir / "last.safetensors", device=device)
    for k, v in vars(cfg.model).items():
        if k.startswith("det_"):
            setattr(model.cfg, k, v)
    key = (cfg.model.image_size, cfg.data.root)
    if key not in dataset_cache:
        dataset_cache[key] = test_dataset(cfg)
    t0 = time.perf_counter()
    res = evaluate_model(model, dataset_cache[key], device, run_dir / "test_detections.json",
                         progress=not args.quiet, video_ious=None if args.no_video_map else (0.2, 0.5))
    res["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return res, state


def _reevaluate(done: dict, run_dir: Path, cfg, cfg_dict: dict, args: argparse.Namespace,
                dataset_cache: dict) -> dict:
    """A finished run whose config differs only in ``model.det_*``: its last checkpoint predicts
    the test pairs again with the new post-processing (no retraining); ``config.json``, the
    checkpoint's JSON (:func:`stvr.experiments.adopt_postprocessing`: ``stvr predict`` on the run
    then uses it too) and ``results.json`` then hold the new config."""
    from ..config import save_config

    res, _ = _evaluate_last(run_dir, cfg, args, dataset_cache)
    res.update({k: done[k] for k in ("method", "key", "cell", "seed", "steps", "checkpoint_step", "train",
                                     "train_seconds_this_call") if k in done})
    res.update({"config": cfg_dict,
                "reevaluated_from": {k: v for k, v in done["config"]["model"].items() if k.startswith("det_")}})
    if adopt_postprocessing(run_dir, cfg) is None:
        save_config(cfg, run_dir / "config.json")
    write_json(run_dir / "results.json", res, indent=2, default=str)
    return res


def _add_diagnostics(res: dict, run_dir: Path, cfg, dataset_cache: dict) -> None:
    """Add ``"diagnostics"`` (:func:`stvr.evaluation.match_diagnostics`) to a finished run's
    results from its saved test detections, without retraining; the run's ``results.json``
    is rewritten. Nothing happens without detections or annotations."""
    from ..evaluation import match_diagnostics
    from ..predict import load_detections
    from ..train import validation_actors

    path = run_dir / "test_detections.json"
    if not path.exists():
        return
    key = (cfg.model.image_size, cfg.data.root)
    if key not in dataset_cache:
        dataset_cache[key] = test_dataset(cfg)
    dataset = dataset_cache[key]
    actors = validation_actors(dataset)
    if actors is None:
        return
    diag = match_diagnostics(dataset.pairs, load_detections(path), actors, 0.5, dataset.clips_per_second)
    res["diagnostics"] = {k: (float(v) if math.isfinite(v) else None) for k, v in diag.items()}
    write_json(run_dir / "results.json", res, indent=2, default=str)


def _stats(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std (ddof 1; 0 for one value), count) of the finite values."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return None, None, 0
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s, len(v)


def aggregate(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method: mean/std/n over seeds of frame-mAP at 0.3/0.5/0.7, video-mAP at 0.2/0.5,
    match AUC and actor recall (``"match_auc"``, ``"actor_recall"``; from each run's
    ``"diagnostics"``)."""
    agg: dict[str, dict] = {}
    for method, runs in results.items():
        name, cell, ava, ucf = METHODS[method]
        entry: dict[str, Any] = {"method": name, "cell": cell, "seeds": [r["seed"] for r in runs],
                                 "paper_ava_map@0.5": ava, "paper_ucf24_map@0.5": ucf}
        for kind, ths in (("frame_mAP", ("0.3", "0.5", "0.7")), ("video_mAP", ("0.2", "0.5"))):
            for t in ths:
                m, s, n = _stats([r.get(kind, {}).get(t) for r in runs])
                entry[f"{kind}@{t}"] = {"mean": m, "std": s, "n": n,
                                        "per_seed": [r.get(kind, {}).get(t) for r in runs]}
        for k in ("match_auc", "actor_recall"):
            per_seed = [(r.get("diagnostics") or {}).get(k) for r in runs]
            m, s, n = _stats(per_seed)
            entry[k] = {"mean": m, "std": s, "n": n, "per_seed": per_seed}
        agg[method] = entry
    return agg


def _cell(e: dict) -> str:
    if e["mean"] is None:
        return "n/a"
    return f"{100 * e['mean']:.1f} ± {100 * e['std']:.1f}" if e["n"] > 1 else f"{100 * e['mean']:.1f}"


def _auc_cell(e: dict) -> str:
    if e["mean"] is None:
        return "n/a"
    return f"{e['mean']:.2f} ± {e['std']:.2f}" if e["n"] > 1 else f"{e['mean']:.2f}"


def markdown(agg: dict[str, dict], meta: dict) -> str:
    """Table 1 in Markdown: one row per method, frame-mAP@0.5 first (percent, mean ± std),
    actor recall (percent) and match AUC; a last row with the chance frame-mAP@0.5
    (``meta["chance_mAP@0.5"]``: every annotated actor's exact box with random scores)."""
    lines = [
        "# Table 1 on the synthetic benchmark",
        "",
        f"Test split of `{meta['data']}` ({meta['test_pairs']} pairs, {meta['test_labels']} unseen "
        f"combined labels); preset `{meta['preset']}`, {meta['steps']} training steps per run, "
        f"seeds {', '.join(map(str, meta['seeds']))}; last checkpoint of each run (no model selection). "
        "Frame-mAP follows the official protocol (API.md section 4); values in percent, "
        "mean ± sample standard deviation over seeds. The paper's numbers (frame-mAP@0.5 on AVA and "
        "UCF-101-24) are given for the shape of the comparison only; the data differ.",
        "",
        "| Method | frame-mAP@0.5 | frame-mAP@0.3 | frame-mAP@0.7 | video-mAP@0.5 | actor recall | match AUC "
        "| runs | paper AVA | paper UCF-101-24 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    na = {"mean": None, "std": None, "n": 0, "per_seed": []}
    for e in agg.values():
        lines.append(f"| {e['method']} | {_cell(e['frame_mAP@0.5'])} | {_cell(e['frame_mAP@0.3'])} | "
                     f"{_cell(e['frame_mAP@0.7'])} | {_cell(e['video_mAP@0.5'])} | "
                     f"{_cell(e.get('actor_recall', na))} | {_auc_cell(e.get('match_auc', na))} | "
                     f"{e['frame_mAP@0.5']['n']} | {e['paper_ava_map@0.5']:.1f} | {e['paper_ucf24_map@0.5']:.1f} |")
    chance = meta.get("chance_mAP@0.5")
    if chance is not None:
        lines.append(f"| Chance (every actor's exact box, random scores) | {100 * chance:.1f} | | | | 100.0 "
                     "| ~0.50 | | | |")
    lines += ["", "Match AUC: ROC AUC with which the scores of the detections covering an annotated actor "
              "rank the actors of the query's action above the other actors (0.5: a detector that does "
              "not match); actor recall: share of annotated actors covered at IoU >= 0.5; chance: "
              "frame-mAP@0.5 of every annotated actor's exact box with uniform random scores "
              "(mean of 3 seeds), the floor a matcher must clear (stvr.evaluation.match_diagnostics).",
              "", "Per seed, frame-mAP@0.5 (%) [match AUC]:", ""]
    for e in agg.values():
        aucs = e.get("match_auc", na)["per_seed"] or [None] * len(e["frame_mAP@0.5"]["per_seed"])
        vals = ", ".join(("n/a" if v is None else f"{100 * v:.1f}") + ("" if a is None else f" [{a:.2f}]")
                         for v, a in zip(e["frame_mAP@0.5"]["per_seed"], aucs))
        lines.append(f"- {e['method']}: {vals} (seeds {', '.join(map(str, e['seeds']))})")
    if meta.get("missing"):
        lines += ["", f"Not finished yet: {', '.join(meta['missing'])}."]
    lines += ["", f"Machine: {meta['machine']}; total training+evaluation time of the runs: "
              f"{meta['run_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def run_table1(args: argparse.Namespace) -> int:
    import torch

    if not args.seeds:
        raise ValueError("--seeds needs at least one seed")
    print(f"synthetic data set at {args.data}")
    data_summary = prepare_data(args.data, args.synth, progress=not args.quiet)
    steps = args.steps
    if steps is None:
        steps = run_config(args.preset, args.data, 0, "cpu", args.overrides).train.max_steps
    if args.jobs < 1 or args.threads < 1:
        raise ValueError("--jobs and --threads must be >= 1")
    out = Path(args.out)
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    todo = [(m, s) for s in args.seeds for m in args.methods]   # seed-major: a full row set early
    missing = [f"{m}-seed{s}" for m, s in todo]
    threads = torch.get_num_threads() if args.jobs == 1 else args.threads

    def record(k: int, method: str, seed: int, res: dict) -> None:
        results[method].append(res)
        missing.remove(f"{method}-seed{seed}")
        print(f"[{k}/{len(todo)}] {METHODS[method][0]}, seed {seed}: frame-mAP@0.5 = "
              f"{pct(res['frame_mAP']['0.5'])} %", flush=True)
        _write_tables(out, results, args, steps, data_summary, missing, threads)

    if args.jobs == 1:
        cache: dict = {}
        for k, (method, seed) in enumerate(todo, 1):
            print(f"[{k}/{len(todo)}] {METHODS[method][0]} (cell {METHODS[method][1]}), seed {seed}, "
                  f"{steps} steps", flush=True)
            record(k, method, seed, run_one(method, seed, args, steps, cache))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        args.quiet = True            # several progress bars would interleave
        print(f"{len(todo)} runs, {args.jobs} at a time ({args.threads} torch thread(s) each)", flush=True)
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"),
                                 initializer=_job_init, initargs=(args.threads,)) as ex:
            futures = {ex.submit(run_one, m, s, args, steps, {}): (m, s) for m, s in todo}
            for k, fut in enumerate(as_completed(futures), 1):
                method, seed = futures[fut]
                record(k, method, seed, fut.result())
    print((out / "table1.md").read_text())
    return 0


def _job_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _write_tables(out: Path, results: dict[str, list[dict]], args: argparse.Namespace, steps: int,
                  data_summary: Any, missing: list[str], threads: int) -> None:
    done = {m: sorted(r, key=lambda x: x["seed"]) for m, r in results.items() if r}
    agg = aggregate(done)
    first = next(iter(r[0] for r in done.values()))
    run_seconds = sum(r["train"].get("seconds", 0) + r.get("eval_seconds", 0)
                      for rs in done.values() for r in rs)
    meta = {"data": args.data, "test_pairs": first["num_pairs"], "test_labels": first["num_labels"],
            "preset": args.preset, "steps": steps, "seeds": list(args.seeds), "missing": missing,
            "overrides": list(args.overrides), "synth": list(args.synth),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {threads}",
            "run_seconds": run_seconds,
            "chance_mAP@0.5": chance_map(r for rs in done.values() for r in rs)}
    write_json(out / "table1.json", {"meta": meta, "data": data_summary, "methods": agg,
                                     "runs": {m: [{k: v for k, v in r.items() if k != "config"} for r in rs]
                                              for m, rs in done.items()}}, indent=2, default=str)
    atomic_write(out / "table1.md", markdown(agg, meta))
