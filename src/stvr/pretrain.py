"""Backbone pretraining: the analogue of the paper's Kinetics-pretrained I3D.

The paper starts from an I3D that already knows actions; trained from scratch,
the cpu preset's tiny backbone learns to find actors long before it learns
what they do, and the matching head then ranks actors at random (issue 11).
:func:`pretrain_backbone` teaches the backbone the actions first: every
annotated person of the *training* videos of a dataset root is a sample (one
8-frame clip, its box, its set of action ids); the backbone's map is cropped at
the box exactly as the matching network crops the query (:func:`stvr.model.crop_features`),
average-pooled and read out by one linear layer, trained with a multi-label
binary cross-entropy. Only training annotations are used, so held-out combined
labels stay unseen.

The weights shipped in the package (``stvr/backbones/weights/tiny_synthetic.safetensors``,
used by the cpu preset through ``model.backbone_weights="builtin"``) are made by
:data:`BUILTIN_RECIPE`: a synthetic root of a dedicated seed whose actors do
exactly one atom at a time, so that no 2- or 3-atom combination (the held-out
labels of every seed) is ever shown to the backbone.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .backbones import build_backbone
from .config import ModelConfig
from .data.actors import ActorClipDataset, actor_index
from .data.pairs import load_dataset_json
from .evaluation import roc_auc

log = logging.getLogger(__name__)

__all__ = ["BUILTIN_RECIPE", "ActorClassifier", "fit_action_probe", "pretrain_backbone", "recolor_clips"]

#: how the shipped weights were made (also stored in their metadata; generator version 4; the file
#: written was then copied to ``src/stvr/backbones/weights/tiny_synthetic.safetensors``)
BUILTIN_RECIPE = (
    "stvr data synth --out data/pretrain-synth-v4 --seed 1000 --atoms-per-label 1 0 0 --num-train-videos 64 && "
    "stvr pretrain --data data/pretrain-synth-v4 --out runs/tiny_v4.safetensors --steps 2000 --lr 3e-3 "
    "--seed 0 --set model.roi_mapping=pixel"
)


class ActorClassifier(nn.Module):
    """Backbone -> crop at the actor's box -> average pool -> linear: ``[N, A]`` logits.

    Args:
        cfg: the model config whose backbone (and RoI mapping) is pretrained.
        num_actions: A, the number of action ids.
    """

    def __init__(self, cfg: ModelConfig, num_actions: int) -> None:
        super().__init__()
        from .model import crop_features

        self.cfg = cfg
        self._crop = crop_features
        self.backbone = build_backbone(cfg)
        self.fc = nn.Linear(cfg.backbone_channels, num_actions)

    def forward(self, clips: Tensor, boxes: Tensor) -> Tensor:
        """``clips [N, 3, T, S, S]``, normalized ``boxes [N, 4]`` -> logits ``[N, A]``."""
        feats = self.backbone(clips)
        idx = torch.arange(feats.shape[0], device=feats.device)
        crops = self._crop(feats, boxes.to(feats.dtype), idx, self.cfg.roi_crop_size,
                           mapping=self.cfg.roi_mapping, image_size=self.cfg.image_size)
        return self.fc(crops.mean((2, 3)))


def recolor_clips(clips: Tensor, generator: torch.Generator) -> Tensor:
    """A random colour change per clip, constant over its frames: ``[N, 3, T, H, W]`` in [-1, 1].

    Each clip gets its own permutation of the RGB channels, each channel of it is inverted
    (``-x``) with probability 1/2, then scaled by a contrast in [0.6, 1] (about the clip's mean);
    values stay in [-1, 1]. Appearance that is constant over time is scrambled; every change
    over time (brightness, hue, position, shape) keeps its timing.
    """
    n = clips.shape[0]
    perm = torch.argsort(torch.rand(n, 3, generator=generator), dim=1)
    sign = torch.where(torch.rand(n, 3, generator=generator) < 0.5, -1.0, 1.0).to(clips.dtype)
    contrast = (0.6 + 0.4 * torch.rand(n, 1, 1, 1, 1, generator=generator)).to(clips.dtype)
    out = torch.gather(clips, 1, perm.view(n, 3, 1, 1, 1).expand_as(clips)) * sign.view(n, 3, 1, 1, 1)
    mean = out.mean((1, 2, 3, 4), keepdim=True)
    return (mean + contrast * (out - mean)).clamp_(-1.0, 1.0)


def _evaluate(model: ActorClassifier, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    scores, targets = [], []
    with torch.no_grad():
        for clips, boxes, y in loader:
            scores.append(model(clips.to(device), boxes.to(device)).float().cpu().numpy())
            targets.append(y.numpy())
    model.train()
    return np.concatenate(scores), np.concatenate(targets)


def pretrain_backbone(root: str | Path, cfg: ModelConfig, out: str | Path, *, steps: int = 1500,
                      batch_size: int = 16, lr: float = 2e-3, seed: int = 0, workers: int = 0,
                      device: str = "cpu", progress: bool = True, val_clips: int = 1200,
                      recipe: str | None = None, color_augment: bool = False) -> dict[str, Any]:
    """Pretrain ``cfg``'s backbone on the training actors of ``root``; write its weights.

    Args:
        root: dataset root (``annotations/train.csv`` gives the samples; ``val.csv``,
            when present, the validation AUCs).
        cfg: model config (backbone, widths, image size, RoI mapping).
        out: the ``.safetensors`` file to write (backbone state dict; metadata: the
            config, action ids, steps, seed, losses, AUCs, ``recipe``).
        steps: optimizer steps (AdamW, cosine decay to 5 %).
        batch_size: actor clips per step.
        lr: peak learning rate.
        seed: seed of the initialization and the sampling.
        workers: DataLoader workers.
        device: torch device.
        progress: tqdm bar.
        val_clips: at most this many validation clips are scored (evenly spaced).
        recipe: the command line that reproduces the run (stored in the metadata).
        color_augment: recolour every training clip at random, the same way in all its frames
            (:func:`recolor_clips`): the actors' own colours stop telling their actions, while a
            colour that changes over time (blink, colorcycle) still does.

    Returns:
        A summary: ``train_clips``, ``steps``, ``loss_first`` / ``loss_last`` (mean of the
        first / last 50 steps, or of a fifth of the steps when fewer than 250), ``val_auc`` per action id and its mean, ``seconds``, ``out``.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    root, out = Path(root), Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the pretrained weights are written as .safetensors")
    dev = torch.device(device)
    torch.manual_seed(seed)
    info = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    fps = int(info.get("fps", 24))
    index = actor_index(root, "train")
    train_set = ActorClipDataset(root, index, cfg.image_size, fps, cfg.clip_frames, flip=True, seed=seed)
    model = ActorClassifier(cfg, len(index.action_ids)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc="pretrain", unit="step", disable=not progress, dynamic_ncols=True)
    step, epoch = 0, 0
    try:
        while step < steps:
            train_set.set_epoch(epoch)
            loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                                num_workers=workers, generator=gen)
            for clips, boxes, y in loader:
                if color_augment:
                    clips = recolor_clips(clips, gen)
                logits = model(clips.to(dev), boxes.to(dev))
                loss = F.binary_cross_entropy_with_logits(logits, y.to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
                if step >= steps:
                    break
            epoch += 1
    finally:
        bar.close()
    window = max(1, min(50, len(losses) // 5))
    summary: dict[str, Any] = {
        "train_clips": len(train_set), "action_ids": index.action_ids, "steps": step,
        "loss_first": float(np.mean(losses[:window])) if losses else float("nan"),
        "loss_last": float(np.mean(losses[-window:])) if losses else float("nan"),
    }
    if (root / "annotations" / "val.csv").is_file():
        vindex = actor_index(root, "val", index.action_ids)
        vset = ActorClipDataset(root, vindex, cfg.image_size, fps, cfg.clip_frames)
        keep = np.unique(np.linspace(0, len(vset) - 1, min(val_clips, len(vset))).round().astype(int))
        sub = torch.utils.data.Subset(vset, keep.tolist())
        s, y = _evaluate(model, DataLoader(sub, batch_size=32, num_workers=workers), dev)
        aucs = {str(a): roc_auc(s[:, k], y[:, k]) for k, a in enumerate(index.action_ids)}
        summary["val_auc"] = aucs
        summary["val_auc_mean"] = float(np.nanmean(list(aucs.values())))
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    from .config import config_to_dict, Config

    synthetic = info.get("synthetic") or {}
    meta = {
        "format": "stvr-pretrained-backbone-1",
        "backbone": cfg.backbone,
        "model": json.dumps(config_to_dict(Config(model=cfg))["model"]),
        "data": str(info.get("name", root.name)),
        "synthetic": json.dumps(synthetic.get("config")) if synthetic else "",
        "generator_version": str(synthetic.get("version", "")) if synthetic else "",
        "summary": json.dumps(summary),
        "recipe": recipe or "",
        "color_augment": str(bool(color_augment)).lower(),
        "seed": str(seed),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(out)
    from .guards import apply_default_mode

    apply_default_mode(out)
    summary["out"] = str(out)
    return summary


@torch.no_grad()
def fit_action_probe(model: nn.Module, root: str | Path, *, max_seconds: int | None = 700, seed: int = 0,
                     fps: int | None = None, cache_dir: str | Path | None = None,
                     batch_size: int = 32) -> dict[str, Any]:
    """Fit ``model.action_probe`` (:class:`stvr.model.actions.ActionProbe`) on the training actors of ``root``.

    Up to ``max_seconds`` annotated seconds of the training videos are drawn (``seed``; ``None``:
    every one, in file order); each one's
    clips go through the model's frozen backbone and are averaged (as the model's
    ``match_clips`` groups of a second), and every annotated person of the second gives one sample:
    the crop mean at its box (the model's RoI crop) and its multi-hot actions over
    ``model.cfg.action_ids``. Only ``annotations/train.csv`` is read: held-out labels stay unseen.
    The clips go through the backbone ``batch_size`` seconds at a time (memory: one batch of clips);
    under ``torch.distributed`` the processes share the blocks of seconds and gather the features,
    so each fits the same probe, as one process would.

    Returns ``{"seconds", "actors", "loss", "train_auc"}`` (``train_auc``: mean per-action ROC AUC
    of the fitted probe on its own samples, NaN-free actions only).
    """
    from .model import crop_features

    probe = getattr(model, "action_probe", None)
    if probe is None:
        raise ValueError("the model has no action probe (model.match_action_distance is off)")
    cfg = model.cfg
    index = actor_index(root, "train", action_ids=[int(a) for a in cfg.action_ids])
    info_fps = int(fps) if fps is not None else int(load_dataset_json(Path(root)).get("fps", 24))
    dataset = ActorClipDataset(root, index, cfg.image_size, fps=info_fps, clip_frames=cfg.clip_frames,
                               cache_dir=cache_dir)
    per_second = dataset.per_second
    # the annotated seconds (video, second) -> their entries, in file order
    seconds: dict[tuple[str, int], list[int]] = {}
    for k, (vid, sec) in enumerate(zip(index.video_ids, index.seconds.tolist())):
        seconds.setdefault((vid, int(sec)), []).append(k)
    keys = list(seconds)
    if max_seconds is None or int(max_seconds) >= len(keys):
        chosen = list(range(len(keys)))
    else:
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(len(keys), size=int(max_seconds), replace=False).tolist())
    entries = [seconds[keys[i]] for i in chosen]
    device = next(model.parameters()).device

    def block_features(block: list[list[int]]) -> Tensor:
        """Crop means ``[actors, C]`` of the annotated persons of a block of seconds."""
        clips = torch.cat([dataset.second_clips(e[0]) for e in block]).to(device)
        m = model.run_backbone(clips)
        maps = m.view(len(block), per_second, *m.shape[1:]).mean(1)           # [seconds, C, h, w]
        owner = torch.tensor([i for i, e in enumerate(block) for _ in e], device=device)
        boxes = torch.as_tensor(index.boxes[[k for e in block for k in e]], device=device)
        crops = crop_features(maps, boxes.to(maps.dtype), owner, cfg.roi_crop_size, mapping=cfg.roi_mapping,
                              image_size=cfg.image_size)
        return crops.mean((2, 3))

    # blocks of batch_size seconds (all clips at once would take GBs); under torch.distributed each
    # process computes every world_size-th block and all gather them, in block order
    blocks = [entries[i:i + batch_size] for i in range(0, len(entries), batch_size)]
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mine = {b: block_features(blocks[b]).cpu() for b in range(rank, len(blocks), world)}
    if world > 1:
        shards: list[Any] = [None] * world
        torch.distributed.all_gather_object(shards, mine)
        mine = {b: f for shard in shards for b, f in shard.items()}
    features = torch.cat([mine[b] for b in range(len(blocks))]).to(device)
    rows = [k for e in entries for k in e]
    targets = torch.as_tensor(index.targets[rows], device=device)
    loss = probe.fit(features, targets, seed=seed)
    scores = probe.logits(features).cpu().numpy()
    aucs = [roc_auc(scores[:, a], index.targets[rows, a] > 0) for a in range(probe.num_actions)]
    aucs = [a for a in aucs if not math.isnan(a)]
    out = {"seconds": len(entries), "actors": len(rows), "loss": loss,
           "train_auc": float(np.mean(aucs)) if aucs else float("nan")}
    log.info("action probe fitted on %d training actors (%d seconds): loss %.4f, train AUC %.3f",
             out["actors"], out["seconds"], loss, out["train_auc"])
    return out
