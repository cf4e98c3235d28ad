"""Training loop: single process, one GPU, or several with ``torchrun`` (DDP).

The protocol is the official one (reference-facts.md section 7): SGD with
momentum 0.9, a step learning-rate schedule, gradient-norm clipping, batches of
query/reference pairs sampled by :class:`stvr.data.dataset.TrainPairDataset`.

Checkpoints (written atomically to ``out_dir``):

- ``last.safetensors``: model weights; ``last.optim.safetensors``: the
  optimizer's momentum buffers; ``last.json``: step, learning rate, RNG states,
  the best validation score so far and the full config.
- ``best.safetensors`` / ``best.json``: the checkpoint with the best validation
  frame-mAP@0.5 (when validation runs).
- ``config.json``: the run's config; ``train_log.csv`` and ``val_log.csv``.

Resuming (``resume=True``, the default) continues from ``last.*``; because the
data order and every per-sample random draw are functions of (seed, step), and
the global RNG states are restored, a run interrupted at any moment and resumed
reaches exactly the parameters of an uninterrupted run of the same steps (on
the same device and thread count).
"""

from __future__ import annotations

import base64
import csv
import json
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
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    elif use_cuda:
        dev = torch.device(device if device.startswith("cuda") else "cuda")
    else:
        dev = torch.device("cpu")
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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _rng_state() -> dict[str, Any]:
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


def save_checkpoint(out_dir: str | Path, name: str, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, cfg: Config,
                    step: int, extra: dict[str, Any] | None = None) -> Path:
    """Write ``<name>.safetensors`` (+ ``<name>.optim.safetensors``) and ``<name>.json``.

    Returns the path of the weights file.
    """
    from safetensors.torch import save, save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = _unwrap(model)
    weights = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    _atomic_write_bytes(out / f"{name}.safetensors", save(weights))
    state: dict[str, Any] = {"step": step, "config": config_to_dict(cfg), "rng": _rng_state()}
    if optimizer is not None:
        names = {id(p): n for n, p in net.named_parameters()}
        buffers, groups = {}, []
        for group in optimizer.param_groups:
            groups.append({k: v for k, v in group.items() if k != "params"})
            for p in group["params"]:
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buffers[names[id(p)]] = buf.detach().cpu().contiguous()
        tmp = out / f"{name}.optim.safetensors.tmp"
        save_file(buffers, str(tmp))
        os.replace(tmp, out / f"{name}.optim.safetensors")
        state["optimizer"] = {"param_groups": groups}
    state.update(extra or {})
    _atomic_write_bytes(out / f"{name}.json", (json.dumps(state, indent=1) + "\n").encode())
    return out / f"{name}.safetensors"


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(weights file, state JSON) of a checkpoint given as a run folder, a
    ``.safetensors`` file or its ``.json``. A folder resolves to ``best`` when
    present, else ``last``."""
    p = Path(path)
    if p.is_dir():
        for name in (CHECKPOINT_BEST, CHECKPOINT_LAST):
            if (p / f"{name}.safetensors").exists():
                return p / f"{name}.safetensors", p / f"{name}.json"
        raise FileNotFoundError(f"{p}: no best.safetensors or last.safetensors in this folder")
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return p, p.with_suffix(".json")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the model of a checkpoint: returns ``(model, config, state)``.

    Weights are read with safetensors (no pickle); the config comes from the
    checkpoint's JSON. The model is returned in eval mode on ``device``.
    """
    from safetensors.torch import load_file

    from .model import STVRModel

    weights_path, state_path = resolve_checkpoint(path)
    if not state_path.exists():
        raise FileNotFoundError(f"{state_path}: the checkpoint's JSON (config, step) is missing")
    state = json.loads(state_path.read_text())
    cfg = config_from_dict(state["config"])
    cfg.model.i3d_weights = None  # weights come from the checkpoint, not the backbone file
    model = STVRModel(cfg.model)
    missing, unexpected = model.load_state_dict(load_file(str(weights_path)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_path}: does not fit the model of its config "
                         f"(missing {missing[:5]}..., unexpected {unexpected[:5]}...)")
    return model.to(device).eval(), cfg, state


def _restore_training_state(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                            device: torch.device) -> dict[str, Any]:
    from safetensors.torch import load_file

    state = json.loads((out_dir / f"{CHECKPOINT_LAST}.json").read_text())
    net = _unwrap(model)
    net.load_state_dict(load_file(str(out_dir / f"{CHECKPOINT_LAST}.safetensors"),
                                  device=str(device)))
    buffers = load_file(str(out_dir / f"{CHECKPOINT_LAST}.optim.safetensors"), device=str(device))
    params = dict(net.named_parameters())
    for name, buf in buffers.items():
        optimizer.state[params[name]]["momentum_buffer"] = buf
    for group, saved in zip(optimizer.param_groups, state["optimizer"]["param_groups"]):
        group.update(saved)
    _set_rng_state(state["rng"])
    return state


# --------------------------------------------------------------------------- the loop


class _CsvLog:
    def __init__(self, path: Path, fields: Sequence[str], append: bool):
        self.path, self.fields = path, list(fields)
        if not (append and path.exists()):
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(self.fields)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self.fields])


def _truncate_log(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (they were produced after the checkpoint)."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(kept)


def build_datasets(cfg: Config):
    """(train dataset, validation dataset or None) of the config's dataset root."""
    from .data.dataset import EvalPairDataset, TrainPairDataset
    from .data.video import ClipCache

    root = Path(cfg.data.root)
    cache = ClipCache(Path(cfg.data.cache) if cfg.data.cache else root / "cache",
                      size=cfg.model.image_size, fps=cfg.data.fps)
    train_set = TrainPairDataset(root, cfg.data, cfg.model.image_size, seed=cfg.train.seed,
                                 cache=cache)
    val_set = None
    if (root / "pairs" / "val.json").exists():
        val_set = EvalPairDataset(root, split="val", image_size=cfg.model.image_size, cache=cache)
    return train_set, val_set


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
        train_set / val_set: datasets to use instead of the config's root.
        progress: show a tqdm progress bar (rank 0 only).

    Returns ``{"step", "loss", "best_val_map", "seconds", "clips_per_second",
    "checkpoint"}``.
    """
    from tqdm import tqdm

    from .data.dataset import collate_pairs
    from .model import STVRModel

    tc = cfg.train
    total_steps = int(max_steps if max_steps is not None else tc.max_steps)
    dist_info, device = init_distributed(tc.device)
    out = Path(out_dir)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.json")

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
        state = _restore_training_state(out, model, optimizer, device)
        start_step = int(state["step"])
        best = state.get("best", best)
        for log in ("train_log.csv", "val_log.csv"):
            if dist_info.is_main:
                _truncate_log(out / log, start_step)
    if dist_info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)

    end_step = total_steps if stop_after is None else min(total_steps, start_step + stop_after)
    sampler = StepBatchSampler(len(train_set), tc.batch_size, tc.seed, start_step, end_step,
                               dist_info.rank, dist_info.world_size)
    loader = DataLoader(EpochIndexed(train_set), batch_sampler=sampler,
                        collate_fn=collate_pairs, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda",
                        persistent_workers=False)
    fields = ["step", "lr", "loss", "rpn_objectness", "rpn_box", "box_classifier", "box_reg",
              "grad_norm", "clips_per_second", "seconds"]
    log = _CsvLog(out / "train_log.csv", fields, append=resumed) if dist_info.is_main else None
    vlog = (_CsvLog(out / "val_log.csv", ["step", "mAP@0.3", "mAP@0.5", "mAP@0.7"],
                    append=resumed) if dist_info.is_main and val_set is not None else None)
    tb = _tensorboard(out) if dist_info.is_main else None

    model.train()
    step, loss_value, t0 = start_step, float("nan"), time.perf_counter()
    clips_seen, window_t, window_clips = 0, time.perf_counter(), 0
    bar = tqdm(total=end_step, initial=start_step, disable=not (progress and dist_info.is_main),
               desc="train", dynamic_ncols=True)
    for batch in loader:
        lr = learning_rate(step, tc.lr, tc.lr_steps, tc.lr_gamma)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batch.to(device, non_blocking=True)
        losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip_norm)
        optimizer.step()
        step += 1
        n_clips = int(batch.reference_mask.sum()) + int(batch.query_clips.shape[0])
        clips_seen += n_clips
        window_clips += n_clips
        loss_value = float(losses["loss"].detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step}; lower train.lr")
        if dist_info.is_main:
            now = time.perf_counter()
            speed = window_clips / max(now - window_t, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2g}", clips_s=f"{speed:.1f}")
            bar.update(1)
            if step % tc.log_every == 0 or step == end_step:
                row = {"step": step, "lr": lr, "loss": loss_value,
                       "grad_norm": float(grad_norm), "clips_per_second": round(speed, 3),
                       "seconds": round(now - t0, 3)}
                row.update({k: float(v.detach()) for k, v in losses.items() if k != "loss"})
                log.write(row)
                if tb is not None:
                    for k, v in row.items():
                        if k != "step":
                            tb.add_scalar(f"train/{k}", v, step)
                window_t, window_clips = now, 0
        if val_set is not None and tc.eval_every > 0 and step % tc.eval_every == 0:
            scores = _validate(_unwrap(model), val_set, device, cfg)
            model.train()
            if dist_info.is_main:
                vlog.write({"step": step, **{f"mAP@{k}": v for k, v in scores.items()}})
                if tb is not None:
                    for k, v in scores.items():
                        tb.add_scalar(f"val/mAP@{k}", v, step)
                m = scores["0.5"]
                if math.isfinite(m) and m > best["map"]:
                    best = {"map": m, "step": step}
                    save_checkpoint(out, CHECKPOINT_BEST, model, None, cfg, step, {"best": best})
        if dist_info.is_main and (step % tc.checkpoint_every == 0 or step == end_step):
            save_checkpoint(out, CHECKPOINT_LAST, model, optimizer, cfg, step, {"best": best})
    bar.close()
    if dist_info.is_main and step == start_step and not (out / f"{CHECKPOINT_LAST}.json").exists():
        save_checkpoint(out, CHECKPOINT_LAST, model, optimizer, cfg, step, {"best": best})
    if tb is not None:
        tb.close()
    elapsed = time.perf_counter() - t0
    return {
        "step": step,
        "loss": loss_value,
        "best_val_map": None if best["step"] < 0 else best["map"],
        "seconds": elapsed,
        "clips_per_second": clips_seen / max(elapsed, 1e-9),
        "checkpoint": str(out / f"{CHECKPOINT_LAST}.safetensors"),
    }


def _validate(model: nn.Module, val_set: Dataset, device: torch.device, cfg: Config) -> dict[str, float]:
    """Frame-mAP of the validation pairs at IoU 0.3 / 0.5 / 0.7."""
    from .evaluation import frame_map
    from .predict import predict_pairs

    detections = predict_pairs(model, val_set, device=device, progress=False)
    pairs = val_set.pairs  # type: ignore[attr-defined]
    return {str(t): frame_map(pairs, detections, iou_threshold=t)["mAP"] for t in (0.3, 0.5, 0.7)}


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))
