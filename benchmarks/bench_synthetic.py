"""Speed of the synthetic data generator and of the clip cache on it.

Cases (each in this process, one core unless ``--workers`` says otherwise):

* ``render``  / ``encode``: milliseconds per frame of rendering (numpy) and of
  encoding (RGB -> yuv420p + libx264) for ``--probe-videos`` videos of the
  default config at each ``--sizes``; ``x real time`` = video seconds generated
  per wall-clock second on one core (the target is >= 20x at 128 px);
* ``default``: the whole small default data set (``SynthConfig()``: 24 train +
  8 val videos x 20 s, 128 px) with ``generate_dataset`` for each ``--workers``
  value: wall time, x real time, tubelets, pairs, video megabytes;
* ``cache``: filling a ``ClipCache`` (128 px, 24 fps) with every second of the
  default data set (decode + resample + write), then reading it back.

    python benchmarks/bench_synthetic.py [--sizes 64 128] [--workers 1 2] [--probe-videos 4]

Prints a Markdown table and writes ``benchmarks/results/bench_synthetic.json``.
Timings depend on the machine load (the reference machine has 2 cores shared
with other jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "bench_synthetic.json"


def bench_frames(size: int, videos: int) -> dict:
    from stvr.data.synthetic import SynthConfig, _ActorTrack, plan_dataset, render_frames
    from stvr.data.video import VideoWriter

    cfg = replace(SynthConfig(), size=size, num_train_videos=videos, num_val_videos=1)
    scripts, _ = plan_dataset(cfg)
    scripts = scripts[:videos]
    render = encode = 0.0
    frames_total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for sc in scripts:
            tracks = [_ActorTrack(a, sc.seconds, sc.fps) for a in sc.actors]
            with VideoWriter(Path(tmp) / f"{sc.video_id}.mp4", sc.fps, size, size, gop=sc.fps) as w:
                for s in range(sc.seconds):
                    t0 = time.perf_counter()
                    f = render_frames(sc, s, tracks)
                    t1 = time.perf_counter()
                    w.write(f)
                    encode += time.perf_counter() - t1
                    render += t1 - t0
                    frames_total += f.shape[0]
                t2 = time.perf_counter()
            encode += time.perf_counter() - t2
    seconds = frames_total / cfg.fps
    return {
        "size": size,
        "videos": len(scripts),
        "video_seconds": seconds,
        "actors_per_video": sum(len(s.actors) for s in scripts) / len(scripts),
        "render_ms_per_frame": 1e3 * render / frames_total,
        "encode_ms_per_frame": 1e3 * encode / frames_total,
        "x_real_time_1_core": seconds / (render + encode),
    }


def bench_default(workers: int, root: Path) -> dict:
    from stvr.data.synthetic import SynthConfig, generate_dataset

    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    s = generate_dataset(root, SynthConfig(), progress=False, workers=workers)
    wall = time.perf_counter() - t0
    return {
        "workers": workers,
        "wall_s": wall,
        "video_seconds": s["seconds"]["train"] + s["seconds"]["val"],
        "x_real_time": (s["seconds"]["train"] + s["seconds"]["val"]) / wall,
        "videos": s["videos"],
        "train_tubelets": s["tubelets"]["train"],
        "pairs": s["pairs"],
        "labels": s["labels"],
        "video_mb": s["timing"]["video_bytes"] / 1e6,
    }


def bench_cache(root: Path) -> dict:
    import numpy as np

    from stvr.data.pairs import load_dataset_json
    from stvr.data.video import ClipCache

    ds = load_dataset_json(root)
    cache_dir = root / "bench_cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache = ClipCache(cache_dir, size=128, fps=24)
    t0 = time.perf_counter()
    total = 0
    for vid, rel in ds["videos"].items():
        lo, hi = ds["time_ranges"][vid]
        total += cache.frames(vid, root / rel, lo, hi).shape[0]
    fill = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vids = list(ds["videos"])
    t1 = time.perf_counter()
    reads = 200
    for _ in range(reads):
        vid = vids[int(rng.integers(len(vids)))]
        s = int(rng.integers(0, 18))
        cache.frames(vid, root / ds["videos"][vid], s, s + 2)
    read = time.perf_counter() - t1
    size = sum(f.stat().st_size for f in cache_dir.rglob("*.npy"))
    shutil.rmtree(cache_dir, ignore_errors=True)
    return {
        "frames": total,
        "fill_s": fill,
        "fill_frames_per_s": total / fill,
        "read_2s_ms": 1e3 * read / reads,
        "cache_mb": size / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--probe-videos", type=int, default=4)
    ap.add_argument("--root", help="where to build the default data set (default: a temp folder)")
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import cv2

    cv2.setNumThreads(1)
    frames = [bench_frames(s, args.probe_videos) for s in args.sizes]
    tmp = None
    if args.root:
        root = Path(args.root)
    else:
        tmp = tempfile.mkdtemp(prefix="bench_synth_")
        root = Path(tmp) / "root"
    try:
        default = [bench_default(w, root) for w in args.workers]
        cache = bench_cache(root)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    print("| size | videos | render ms/frame | encode ms/frame | x real time (1 core) |")
    print("|---:|---:|---:|---:|---:|")
    for r in frames:
        print(f"| {r['size']} | {r['videos']} | {r['render_ms_per_frame']:.2f} | {r['encode_ms_per_frame']:.2f} "
              f"| {r['x_real_time_1_core']:.1f} |")
    print()
    print("| default data set | workers | wall s | x real time | tubelets | val/test pairs | video MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in default:
        print(f"| {r['videos']['train']}+{r['videos']['val']} videos x 20 s, 128 px | {r['workers']} "
              f"| {r['wall_s']:.1f} | {r['x_real_time']:.1f} | {r['train_tubelets']} "
              f"| {r['pairs']['val']}/{r['pairs']['test']} | {r['video_mb']:.1f} |")
    print()
    print("| clip cache (128 px) | frames | fill s | fill frames/s | 2 s read ms | cache MB |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| default data set | {cache['frames']} | {cache['fill_s']:.1f} | {cache['fill_frames_per_s']:.0f} "
          f"| {cache['read_2s_ms']:.2f} | {cache['cache_mb']:.0f} |")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "frames": frames,
        "default": default,
        "cache": cache,
    }
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
