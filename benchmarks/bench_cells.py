"""Speed of the warp operator and of one step of each recurrent cell.

Cases, at two sizes:

* ``paper``: batch 8, input and hidden 1024 channels, 20x20 map, gate
  bottleneck 128, 3x3 = 9 control points + 16 boundary points (k = 4);
* ``cpu``: the ``cpu`` preset (``stvr.config.preset("cpu")``): batch =
  its training batch (4 pairs), ``backbone_channels`` (64) channels,
  ``image_size / 16`` (8x8) map, bottleneck ``cell_bottleneck`` (32).

Operations (each timed forward only under ``no_grad`` and forward + backward):

* ``sparse_image_warp``: ``stvr.warp.sparse_image_warp`` of a ``[B, C, H, W]`` map
  (gradients w.r.t. the map and the destination points);
* ``warp_states h+c``: ``stvr.warp.warp_states`` of h and c together (what the
  warp cell runs: one spline fit, one resampling of ``2C`` channels);
* ``grid_sample h+c``: the same resampling with ``F.grid_sample`` (border,
  align_corners) on the same dense flow, the obvious alternative, for reference;
* ``conv`` / ``warp`` / ``traj`` / ``flow`` cell: one step ``cell(x, (h, c))`` from
  a non-zero state; backward of ``out.sum() + c.sum()`` into the parameters, x, h
  and c. The warp cell uses the official Glorot init of its displacement
  predictor (non-zero displacements, about one cell), the flow cell a random
  flow of about one cell.

``--alt-src DIR`` also times another implementation (a directory with its
``warp.py`` and ``recurrent.py``, e.g. from an older commit) on the warp
operator and the warp/flow cells, interleaved with the current code in the
same process (rows tagged ``[alt]``): a fair before/after comparison on a
loaded machine.

Timing: ``--threads`` CPU threads (default 2; several values -> each is
measured), the cases interleaved round by
round (``--repeats`` rounds after ``--warmup``) so that load from other
processes spreads evenly; median and min wall-clock milliseconds per case, and
the median process CPU time (all threads; on a machine shared with other jobs
run with ``OMP_WAIT_POLICY=PASSIVE`` so that waiting threads sleep instead of
spinning, which makes the CPU time a load-independent measure of the work). On
CUDA the device is synchronized around each call.

    python benchmarks/bench_cells.py [--sizes paper cpu] [--devices cpu cuda]
        [--threads 2] [--repeats 10] [--baseline OLD.json] [--alt-src DIR]

Prints a Markdown table (and the warp/conv ratios; target: warp-LSTM step
forward + backward <= 1.3x a ConvLSTM step at the paper's sizes on CPU) and
writes ``benchmarks/results/bench_cells.json``. With ``--baseline`` an earlier
result file is shown side by side ("before" column) and stored in the output.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).parent / "results" / "bench_cells.json"
TARGET_RATIO = 1.3


def sizes(name: str) -> dict[str, int]:
    """Benchmark sizes: batch, channels (input = hidden), map side, bottleneck, grid, boundary k."""
    from stvr.config import preset

    if name == "paper":
        return {"batch": 8, "channels": 1024, "map": 20, "bottleneck": 128, "grid": 3, "boundary": 4}
    if name == "cpu":
        cfg = preset("cpu")
        m = cfg.model
        return {
            "batch": cfg.train.batch_size,
            "channels": m.backbone_channels,
            "map": m.image_size // 16,
            "bottleneck": m.cell_bottleneck,
            "grid": m.warp_grid,
            "boundary": m.warp_boundary_points,
        }
    raise ValueError(f"unknown size {name!r}; choose 'paper' or 'cpu'")


def load_alt(src_dir: str):
    """``(warp, recurrent)`` modules of another implementation: a directory holding
    ``warp.py`` and ``recurrent.py`` (e.g. from ``git show <commit>:src/stvr/warp.py``),
    imported as the package ``stvr_alt``."""
    import importlib
    import types

    path = Path(src_dir)
    for name in ("warp.py", "recurrent.py"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"--alt-src {src_dir}: missing {name}")
    pkg = types.ModuleType("stvr_alt")
    pkg.__path__ = [str(path)]
    sys.modules["stvr_alt"] = pkg
    return importlib.import_module("stvr_alt.warp"), importlib.import_module("stvr_alt.recurrent")


def make_cases(size: dict[str, int], device, impls: dict[str, tuple]) -> list[tuple[str, str, Callable[[], Any]]]:
    """``(operation, mode, fn)`` for every timed case at one size on one device.

    ``impls`` maps a label ("" for the current code, "[alt]" for ``--alt-src``) to
    ``(warp, recurrent)`` modules; the alternative implementation is timed on the
    cases its code affects (the warp operator, the warp and flow cells).
    """
    import torch

    warp, recurrent = impls[""]

    b, ch, s = size["batch"], size["channels"], size["map"]
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    x, h, c = rnd(b, ch, s, s), rnd(b, ch, s, s), rnd(b, ch, s, s)
    pts = recurrent.control_point_grid(s, s, size["grid"], device=device)
    src = pts.unsqueeze(0).expand(b, -1, -1).contiguous()
    dst = src + rnd(b, pts.shape[0], 2, scale=0.7)
    k = size["boundary"]
    flow = warp.spline_dense_flow(src, dst, s, s, 2, 0.0, k)
    cases: list[tuple[str, str, Callable[[], Any]]] = []
    hg = h.clone().requires_grad_()
    cg = c.clone().requires_grad_()
    dg = dst.clone().requires_grad_()
    hc = torch.cat([h, c], 1)
    hcg = hc.clone().requires_grad_()
    fg = flow.clone().requires_grad_()
    leaves = (hg, cg, dg, hcg, fg)

    def add(op: str, fwd: Callable[[], Any], loss: Callable[[], Any], module=None) -> None:
        def f():
            with torch.no_grad():
                fwd()

        def fb():
            for t in leaves:  # every timed step starts without accumulated gradients
                t.grad = None
            if module is not None:
                module.zero_grad(set_to_none=True)
            loss().backward()

        cases.append((op, "forward", f))
        cases.append((op, "forward+backward", fb))

    for tag, (wm, _) in impls.items():
        add(
            f"sparse_image_warp{tag}",
            lambda wm=wm: wm.sparse_image_warp(h, src, dst, 2, 0.0, k),
            lambda wm=wm: wm.sparse_image_warp(hg, src, dg, 2, 0.0, k)[0].sum(),
        )

        def states_loss(wm=wm):
            (a, d), _ = wm.warp_states((hg, cg), src, dg, 2, k)
            return a.sum() + d.sum()

        add(f"warp_states h+c{tag}", lambda wm=wm: wm.warp_states((h, c), src, dst, 2, k), states_loss)
    add(
        "grid_sample h+c",
        lambda: warp.dense_image_warp_reference(hc, flow),
        lambda: warp.dense_image_warp_reference(hcg, fg).sum(),
    )

    cell_flow = rnd(b, s, s, 2)
    runs = [("", kind) for kind in ("conv", "warp", "traj", "flow")]
    runs += [(tag, kind) for tag in impls if tag for kind in ("warp", "flow")]
    for tag, kind in runs:
        opts: dict[str, Any] = {"bottleneck": size["bottleneck"]}
        if kind == "warp":
            opts.update(grid=size["grid"], num_boundary_points=k, offset_init="glorot")
        torch.manual_seed(0)
        cell = impls[tag][1].build_cell(kind, ch, ch, **opts).to(device)
        extra = {"flow": cell_flow} if kind == "flow" else {}

        def fwd(cell=cell, extra=extra):
            return cell(x, (h, c), **extra)

        def loss(cell=cell, extra=extra):
            out, (_, c_new) = cell(x, (hg, cg), **extra)
            return out.sum() + c_new.sum()

        add(f"{kind} cell{tag}", fwd, loss, module=cell)
    return cases


def run_device(
    device_name: str, size_names: list[str], repeats: int, warmup: int, threads: int, impls: dict[str, tuple]
) -> list[dict]:
    import torch

    torch.set_num_threads(threads)
    device = torch.device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for size_name in size_names:
        size = sizes(size_name)
        cases = make_cases(size, device, impls)
        for _, _, fn in cases:
            for _ in range(warmup):
                fn()
        sync()
        times: list[list[float]] = [[] for _ in cases]
        cpu_times: list[list[float]] = [[] for _ in cases]
        for _ in range(repeats):
            for i, (_, _, fn) in enumerate(cases):
                c0 = time.process_time()
                t0 = time.perf_counter()
                fn()
                sync()
                times[i].append(time.perf_counter() - t0)
                cpu_times[i].append(time.process_time() - c0)
        for (op, mode, _), ts, cs in zip(cases, times, cpu_times):
            rows.append(
                {
                    "device": device_name,
                    "threads": threads if device.type == "cpu" else None,
                    "size": size_name,
                    "op": op,
                    "mode": mode,
                    "median_ms": 1000 * statistics.median(ts),
                    "min_ms": 1000 * min(ts),
                    "cpu_median_ms": 1000 * statistics.median(cs),
                    "repeats": repeats,
                    **{f"size_{k}": v for k, v in size.items()},
                }
            )
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """warp-cell / conv-cell time per device, threads, size and mode (median and min),
    for the current warp cell and, with ``--alt-src``, the alternative one."""
    key = {(r["device"], r["threads"], r["size"], r["op"], r["mode"]): r for r in rows}
    out = []
    for r in rows:
        if not r["op"].startswith("warp cell"):
            continue
        conv = key.get((r["device"], r["threads"], r["size"], "conv cell", r["mode"]))
        if conv is None:
            continue
        out.append(
            {
                "device": r["device"],
                "threads": r["threads"],
                "size": r["size"],
                "impl": r["op"][len("warp cell") :] or "current",
                "mode": r["mode"],
                "warp_over_conv_median": r["median_ms"] / conv["median_ms"],
                "warp_over_conv_min": r["min_ms"] / conv["min_ms"],
                "warp_over_conv_cpu": r["cpu_median_ms"] / conv["cpu_median_ms"],
            }
        )
    return out


def markdown(rows: list[dict], baseline: list[dict] | None) -> str:
    base = {(r["device"], r.get("threads"), r["size"], r["op"], r["mode"]): r for r in baseline or []}
    head = "| device | threads | size | operation | mode | median ms | min ms | CPU ms |"
    sep = "|---|---:|---|---|---|---:|---:|---:|"
    if baseline is not None:
        head += " before median ms | before min ms |"
        sep += "---:|---:|"
    lines = [head, sep]
    for r in rows:
        line = (
            f"| {r['device']} | {r['threads'] or '-'} | {r['size']} | {r['op']} | {r['mode']} | "
            f"{r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['cpu_median_ms']:.2f} |"
        )
        if baseline is not None:
            old = base.get((r["device"], r["threads"], r["size"], r["op"], r["mode"]))
            line += f" {old['median_ms']:.2f} | {old['min_ms']:.2f} |" if old else " - | - |"
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["paper", "cpu"], choices=["paper", "cpu"])
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda if available")
    p.add_argument("--threads", type=int, nargs="+", default=[2], help="CPU thread counts (torch.set_num_threads)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--baseline", default=None, help="earlier bench_cells JSON to compare with")
    p.add_argument(
        "--alt-src",
        default=None,
        help="directory with another warp.py + recurrent.py, timed interleaved with the current code "
        "(rows tagged [alt]); e.g. extracted from an older commit",
    )
    p.add_argument("--label", default="", help="free text stored in the JSON meta (e.g. a commit)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    import torch

    from stvr import recurrent, warp

    impls: dict[str, tuple] = {"": (warp, recurrent)}
    if args.alt_src:
        impls["[alt]"] = load_alt(args.alt_src)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows: list[dict] = []
    for dev in devices:
        if dev.startswith("cuda") and not torch.cuda.is_available():
            print(f"skipping {dev}: CUDA is not available", file=sys.stderr)
            continue
        for threads in args.threads if dev == "cpu" else [torch.get_num_threads()]:
            rows += run_device(dev, args.sizes, args.repeats, args.warmup, threads, impls)
    baseline = None
    if args.baseline:
        baseline = json.loads(Path(args.baseline).read_text())["results"]
    rat = ratios(rows)
    print(markdown(rows, baseline))
    print()
    print(
        "| device | threads | size | warp cell | mode | warp / conv (median) | warp / conv (min) "
        "| warp / conv (CPU) |"
    )
    print("|---|---:|---|---|---|---:|---:|---:|")
    for r in rat:
        print(
            f"| {r['device']} | {r['threads'] or '-'} | {r['size']} | {r['impl']} | {r['mode']} | "
            f"{r['warp_over_conv_median']:.2f} | {r['warp_over_conv_min']:.2f} | {r['warp_over_conv_cpu']:.2f} |"
        )
    target = [
        r
        for r in rat
        if r["device"] == "cpu" and r["size"] == "paper" and r["mode"] == "forward+backward" and r["impl"] == "current"
    ]
    for r in target:
        ok = r["warp_over_conv_median"] <= TARGET_RATIO
        print(
            f"\ntarget (paper sizes, CPU, {r['threads']} threads, forward+backward): warp/conv = "
            f"{r['warp_over_conv_median']:.2f} (median) <= {TARGET_RATIO}: {'met' if ok else 'NOT met'}"
        )
    meta = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "label": args.label,
        "alt_src": args.alt_src,
        "target_warp_over_conv": TARGET_RATIO,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"meta": meta, "results": rows, "ratios": rat}
    if baseline is not None:
        doc["baseline"] = {"file": args.baseline, "results": baseline}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
