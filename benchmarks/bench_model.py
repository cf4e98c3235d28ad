"""Speed and memory of the matching network per reference second (3 clips).

For each preset (``cpu``: tiny backbone 128x128; ``paper``: I3D 320x320) and
device (CPU, and CUDA when available), in a fresh subprocess each (so peak
memory is per case):

* ``infer``: eval-mode ``forward`` of one pair with ``--seconds`` reference
  seconds and 1 query second (3 query clips) -> ms per reference second;
* ``train``: one training step (forward + backward) of a batch of ``--batch``
  pairs with 2-second references and 1-second queries -> ms per reference second.

A preset whose ``model.match_action_distance`` resolves on (the cpu preset's ``"auto"``: frozen
pretrained backbone) is timed with its action probe over ``--actions`` actions (default 8, the
synthetic benchmark's atoms; unfitted, which costs the same); the one-time fit of the probe before
training is not part of a step (the demo's training log reports it).

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, peak RSS of the
worker process (``ru_maxrss``, includes the Python/torch runtime) on CPU.

    python benchmarks/bench_model.py [--presets cpu paper] [--devices cpu cuda] [--cell warp]

Prints a table and writes ``benchmarks/results/bench_model.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "bench_model.json"


def _batch(cfg, pairs: int, seconds: int, device):
    import torch

    from stvr.data.batch import PairBatch

    s, t, clips = cfg.image_size, cfg.clip_frames, 3 * seconds
    g = torch.Generator().manual_seed(0)
    qc = torch.rand(3 * pairs, 3, t, s, s, generator=g) * 2 - 1
    qb = torch.tensor([[0.2, 0.2, 0.6, 0.8]]).repeat(3 * pairs, 1)
    qi = torch.arange(pairs).repeat_interleave(3)
    rc = torch.rand(pairs, clips, 3, t, s, s, generator=g) * 2 - 1
    mask = torch.ones(pairs, clips, dtype=torch.bool)
    gt = [[torch.tensor([[0.1, 0.1, 0.5, 0.7], [0.5, 0.3, 0.9, 0.9]]) for _ in range(clips)] for _ in range(pairs)]
    gl = [[torch.tensor([2, 1]) for _ in range(clips)] for _ in range(pairs)]
    return PairBatch(qc, qb, qi, rc, mask, gt, gl, list(range(pairs))).to(device)


def worker(args: argparse.Namespace) -> dict:
    import torch

    from stvr.config import apply_overrides, preset, resolve_action_distance
    from stvr.model import STVRModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = apply_overrides(preset(args.preset), [f"model.cell={args.cell}"]).model
    if resolve_action_distance(cfg) and args.actions > 0 and not cfg.action_ids:
        cfg.action_ids = list(range(1, args.actions + 1))   # what training fills from train.csv
    device = torch.device(args.device)
    model = STVRModel(cfg).to(device)
    action_probe = model.action_probe is not None
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.mode == "infer":
        model.eval()
        batch = _batch(cfg, 1, args.seconds, device)
        step = lambda: model(batch)  # noqa: E731
        ref_seconds = args.seconds
    else:
        model.train()
        batch = _batch(cfg, args.batch, 2, device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            model(batch)["loss"].backward()
            opt.step()
        ref_seconds = 2 * args.batch
    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    best = min(times)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"preset": args.preset, "cell": args.cell, "device": args.device, "mode": args.mode,
            "pairs": 1 if args.mode == "infer" else args.batch, "reference_seconds": ref_seconds,
            "seconds_per_step": best, "ms_per_reference_second": 1000 * best / ref_seconds,
            "peak_memory_mb": peak / 2**20,
            "peak_memory_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
            "action_probe": action_probe, "actions": len(cfg.action_ids) if action_probe else 0,
            "threads": args.threads, "repeats": args.repeats}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["cpu", "paper"])
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda if available")
    p.add_argument("--modes", nargs="+", default=["infer", "train"])
    p.add_argument("--cell", default="warp")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--actions", type=int, default=8,
                   help="actions of the probe where the preset's action distance is on (default 8; 0: time without it)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="infer", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=int, default=None, help="reference seconds in 'infer' (default 4 cpu / 1 paper on CPU)")
    p.add_argument("--batch", type=int, default=None, help="pairs in 'train' (default 4 cpu / 1 paper on CPU, 8 on CUDA)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    import torch

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for preset_name in args.presets:
        for device in devices:
            for mode in args.modes:
                slow = preset_name == "paper" and device == "cpu"
                seconds = args.seconds or (1 if slow else 4 if device == "cpu" else 10)
                batch = args.batch or (1 if slow else 4 if device == "cpu" else 8)
                repeats = 1 if slow else args.repeats
                cmd = [sys.executable, __file__, "--worker", "--preset", preset_name, "--device", device,
                       "--mode", mode, "--cell", args.cell, "--threads", str(args.threads),
                       "--seconds", str(seconds), "--batch", str(batch), "--repeats", str(repeats),
                       "--warmup", str(args.warmup), "--actions", str(args.actions)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    print(f"{preset_name}/{device}/{mode} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                    rows.append({"preset": preset_name, "device": device, "mode": mode, "error": res.stderr[-500:]})
                    continue
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"{'preset':<7}{'device':<7}{'mode':<7}{'pairs':>6}{'ref s':>7}{'ms/ref s':>11}{'peak MB':>10}  probe")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<7}{r['device']:<7}{r['mode']:<7}  failed")
            continue
        print(f"{r['preset']:<7}{r['device']:<7}{r['mode']:<7}{r['pairs']:>6}{r['reference_seconds']:>7}"
              f"{r['ms_per_reference_second']:>11.1f}{r['peak_memory_mb']:>10.0f}  "
              f"{r['actions'] if r.get('action_probe') else '-'}")
    meta = {"python": platform.python_version(), "torch": torch.__version__, "cell": args.cell,
            "cpu_threads": args.threads, "actions": args.actions,
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
