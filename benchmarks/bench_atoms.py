"""Can the synthetic benchmark be learned? The atom probe (issue 11).

A small 3D CNN is trained on crops around every *training* actor (8-frame
clips, 32 x 32 px around the annotated box, enlarged by 1.25) to name the
actor's atoms (multi-label, binary cross-entropy), then scored on the actors of
the *validation* videos (whose combined labels include combinations never shown
in training): ROC AUC per atom. The same probe on a single frame of each clip
(the clip's middle frame) tells which atoms one frame already reveals: the
temporal atoms should stay near 0.5 there.

    python benchmarks/bench_atoms.py --seed 0                # generates data/probe-seed0 if needed
    python benchmarks/bench_atoms.py --root data/synthetic   # an existing dataset root

The clip probe's validation AUC is also split by the actors' combined label: actors
doing a held-out combination (``label_split.json``) and actors doing a label also
shown in training; the JSON keeps the mean probability of every atom per combined
label (which combination hides which atom).

Prints a Markdown table and writes ``benchmarks/results/bench_atoms[-TAG].json``.
Targets (DESIGN.md): clip probe AUC >= 0.95 on average and >= 0.90 per atom.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from stvr.data.actors import ActorClipDataset, actor_index
from stvr.evaluation import roc_auc

CROP = 32


def crops(root: Path, split: str, size: int, action_ids=None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``uint8 [N, 3, 8, CROP, CROP]`` crops of every actor clip of a split and targets ``[N, A]``."""
    index = actor_index(root, split, action_ids)
    ds = ActorClipDataset(root, index, image_size=size)
    out = torch.empty(len(ds), 3, ds.clip_frames, CROP, CROP, dtype=torch.uint8)
    targets = torch.empty(len(ds), len(index.action_ids))
    for i in range(len(ds)):
        k = i // ds.per_second
        f = torch.from_numpy(np.ascontiguousarray(ds.frames(i))).permute(0, 3, 1, 2).float()  # [T, 3, S, S]
        b = index.boxes[k] * size
        c, half = (b[:2] + b[2:]) / 2, (b[2:] - b[:2]) * 0.625
        box = torch.tensor([c[0] - half[0], c[1] - half[1], c[0] + half[0], c[1] + half[1]], dtype=torch.float32)
        rois = torch.cat([torch.arange(f.shape[0], dtype=torch.float32)[:, None], box.expand(f.shape[0], 4)], 1)
        r = roi_align(f, rois, (CROP, CROP), 1.0, sampling_ratio=2, aligned=True)     # [T, 3, CROP, CROP]
        out[i] = r.clamp(0, 255).round().to(torch.uint8).permute(1, 0, 2, 3)
        targets[i] = torch.from_numpy(index.targets[k])
    return out, targets, index.action_ids


class Probe(nn.Module):
    """3 conv3d blocks (16, 32, 64 channels, 3x3x3) each with 2x2 spatial max-pooling,
    global average pool, linear; any clip length (time is never strided)."""

    def __init__(self, num_outputs: int) -> None:
        super().__init__()

        def block(cin, cout, k, stride):
            pad = tuple(x // 2 for x in k)
            return [nn.Conv3d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, 16, (3, 3, 3), 1), nn.MaxPool3d((1, 2, 2)),
            *block(16, 32, (3, 3, 3), 1), nn.MaxPool3d((1, 2, 2)),
            *block(32, 64, (3, 3, 3), 1), nn.MaxPool3d((1, 2, 2)),
        )
        self.fc = nn.Linear(64, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3, 4)))


def _as_input(x: torch.Tensor, frames: str) -> torch.Tensor:
    x = x.float().div_(127.5).sub_(1.0)
    if frames == "single":
        x = x[:, :, x.shape[2] // 2: x.shape[2] // 2 + 1]
    return x


def train_probe(train_x, train_y, val_x, val_y, frames: str, seconds: float, seed: int, batch: int = 64):
    """Train for ``seconds`` of wall time; returns per-atom (val AUC, train AUC) and steps."""
    torch.manual_seed(seed)
    model = Probe(train_y.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    t0, steps = time.perf_counter(), 0
    model.train()
    while time.perf_counter() - t0 < seconds:
        for idx in torch.randperm(len(train_x), generator=g).split(batch):
            x = _as_input(train_x[idx], frames)
            if torch.rand(1, generator=g).item() < 0.5:
                x = x.flip(-1)
            loss = F.binary_cross_entropy_with_logits(model(x), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if time.perf_counter() - t0 >= seconds:
                break

    @torch.no_grad()
    def scores(x):
        model.eval()
        return torch.cat([model(_as_input(c, frames)) for c in x.split(256)]).numpy()

    sv, st = scores(val_x), scores(train_x[:2000])
    val_auc = [roc_auc(sv[:, a], val_y[:, a].numpy()) for a in range(val_y.shape[1])]
    train_auc = [roc_auc(st[:, a], train_y[:2000, a].numpy()) for a in range(val_y.shape[1])]
    return val_auc, train_auc, steps, sv


def combined_labels(targets: np.ndarray, action_ids: list[int]) -> list[tuple[int, ...]]:
    """Multi-hot ``targets [N, A]`` -> each row's combined label (sorted tuple of atom ids)."""
    ids = np.asarray(action_ids)
    return [tuple(int(a) for a in ids[np.asarray(row) > 0.5]) for row in targets]


def auc_by_label_kind(scores: np.ndarray, targets: np.ndarray, action_ids: list[int],
                      heldout: set[tuple[int, ...]]) -> dict:
    """Per-atom ROC AUC over the actors doing a *held-out* combined label and over those doing a
    label also shown in training (``scores``, ``targets``: ``[N, A]``; NaN where an atom has only
    one class in a group). A probe that recognizes the atoms on training labels but not on held-out
    ones fails to *compose* them, not to see them."""
    labels = combined_labels(targets, action_ids)
    held = np.array([lab in heldout for lab in labels], dtype=bool)
    out: dict = {"heldout_share": float(held.mean()) if len(held) else float("nan")}
    for name, m in (("heldout", held), ("seen", ~held)):
        out[name] = [roc_auc(scores[m, a], targets[m, a]) if m.any() else float("nan")
                     for a in range(targets.shape[1])]
    return out


def mean_probabilities(scores: np.ndarray, targets: np.ndarray, action_ids: list[int]) -> dict:
    """``{"1+6": {"actors": n, "p": [A mean sigmoid(score)]}}`` per combined label of ``targets``:
    which atoms the probe names for the actors of each label (where a combination hides an atom)."""
    labels = combined_labels(targets, action_ids)
    p = 1.0 / (1.0 + np.exp(-np.asarray(scores, dtype=np.float64)))
    out = {}
    for lab in sorted(set(labels), key=lambda lab: (len(lab), lab)):
        m = np.array([x == lab for x in labels])
        out["+".join(map(str, lab))] = {"actors": int(m.sum()), "p": p[m].mean(0).round(3).tolist()}
    return out


def _nan_reduce(reduce, x) -> float:
    """``reduce`` (``np.nanmean`` / ``np.nanmin``) of ``x``, NaN when no value is finite (a probe not run)."""
    x = np.asarray(x, dtype=float)
    return float(reduce(x)) if np.isfinite(x).any() else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="dataset root (default: generate data/probe-seed<SEED>)")
    ap.add_argument("--seed", type=int, default=0, help="synthetic seed (when generating) and probe seed")
    ap.add_argument("--minutes", type=float, default=2.0, help="training wall time of each probe")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--probes", nargs="+", choices=("clip", "single"), default=["clip", "single"],
                    help="which probes to train (default both)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.root is None:
        from stvr.data.synthetic import GENERATOR_VERSION, SynthConfig, generate_dataset

        root = Path(f"data/probe-v{GENERATOR_VERSION}-seed{args.seed}")
        generate_dataset(root, SynthConfig(seed=args.seed), progress=False)
    else:
        root = Path(args.root)
    info = json.loads((root / "dataset.json").read_text())
    size = int(info.get("size", 128))
    names = info.get("atoms", {})
    t0 = time.perf_counter()
    tx, ty, ids = crops(root, "train", size)
    vx, vy, _ = crops(root, "val", size, ids)
    prep = time.perf_counter() - t0
    split_file = root / "label_split.json"
    heldout = ({tuple(lab) for labs in json.loads(split_file.read_text()).values() for lab in labs}
               if split_file.is_file() else set())
    rows = {}
    for frames in args.probes:
        val_auc, train_auc, steps, sv = train_probe(tx, ty, vx, vy, frames, args.minutes * 60, args.seed)
        rows[frames] = {"val_auc": val_auc, "train_auc": train_auc, "steps": steps}
        if frames == "clip":
            rows[frames]["by_label_kind"] = auc_by_label_kind(sv, vy.numpy(), ids, heldout)
            rows[frames]["mean_probability"] = mean_probabilities(sv, vy.numpy(), ids)
    nan = [float("nan")] * len(ids)
    for frames in ("clip", "single"):
        rows.setdefault(frames, {"val_auc": nan, "train_auc": nan, "steps": 0})
    result = {
        "root": str(root), "generator": info.get("synthetic", {}).get("version"),
        "seed": args.seed, "minutes": args.minutes, "train_clips": len(tx), "val_clips": len(vx),
        "prep_s": round(prep, 1), "atoms": [names.get(str(a), str(a)) for a in ids], **rows,
        "clip_mean_auc": _nan_reduce(np.nanmean, rows["clip"]["val_auc"]),
        "clip_min_auc": _nan_reduce(np.nanmin, rows["clip"]["val_auc"]),
        "single_mean_auc": _nan_reduce(np.nanmean, rows["single"]["val_auc"]),
    }
    print(f"root {root}: {len(tx)} training / {len(vx)} validation actor clips, "
          f"{args.minutes:g} min per probe ({rows['clip']['steps']} / {rows['single']['steps']} steps)\n")
    kinds = rows["clip"].get("by_label_kind", {"heldout": nan, "seen": nan})
    print("| atom | clip probe val AUC | held-out-label actors | training-label actors | clip train AUC "
          "| single-frame val AUC |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, name in enumerate(result["atoms"]):
        print(f"| {name} | {rows['clip']['val_auc'][k]:.3f} | {kinds['heldout'][k]:.3f} | {kinds['seen'][k]:.3f} "
              f"| {rows['clip']['train_auc'][k]:.3f} | {rows['single']['val_auc'][k]:.3f} |")
    print(f"| **mean** | **{result['clip_mean_auc']:.3f}** | {_nan_reduce(np.nanmean, kinds['heldout']):.3f} | "
          f"{_nan_reduce(np.nanmean, kinds['seen']):.3f} | "
          f"{_nan_reduce(np.nanmean, rows['clip']['train_auc']):.3f} | {result['single_mean_auc']:.3f} |")
    out = Path(__file__).parent / "results" / f"bench_atoms{'-' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
