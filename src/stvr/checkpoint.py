"""Checkpoints: saving, committing, recovering, resolving and loading them.

Used by the training loop (:mod:`stvr.train`) and by inference (``stvr predict``,
``stvr relocalize``, ``stvr viz``), which therefore need not import the training loop.

Files of a checkpoint ``<name>`` (``last`` or ``best``) in a run folder:

- ``<name>.safetensors``: model weights; ``<name>.optim.safetensors``: the
  optimizer's momentum buffers; ``<name>.json``: step, optimizer hyper-parameters,
  RNG states (per rank under DDP), the best validation score so far, the dataset's
  provenance and the full config. No pickle anywhere.

A checkpoint is committed crash-consistently: both ``.safetensors`` files are
written as ``*.tmp`` first (each carries its step in the safetensors metadata),
then ``<name>.json.tmp`` appears atomically (the commit point), then the three
files are renamed into place. A run killed before the commit point keeps the
previous checkpoint intact; one killed after it is rolled forward by
:func:`recover_checkpoint` when resuming.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import Config, config_from_dict, config_to_dict

log = logging.getLogger(__name__)

CHECKPOINT_LAST = "last"
CHECKPOINT_BEST = "best"


_CKPT_FORMAT = "stvr-checkpoint-1"


def fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])),
                                         dtype=torch.uint8))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([
            torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
            for s in state["cuda"]][: torch.cuda.device_count()])


def checkpoint_files(name: str) -> tuple[str, str]:
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
        for fname in checkpoint_files(name):
            tmp = out / f"{fname}.tmp"
            if tmp.exists():
                os.replace(tmp, out / fname)
        os.replace(marker, out / f"{name}.json")
        return
    for fname in (*checkpoint_files(name), f"{name}.json"):
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
    net = unwrap_model(model)
    weights = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    weights_file, optim_file = checkpoint_files(name)
    fsync_write(out / f"{weights_file}.tmp", save(weights, metadata=meta))
    state: dict[str, Any] = {"step": int(step), "format": _CKPT_FORMAT,
                             "config": config_to_dict(cfg), "rng": rng_state()}
    if optimizer is not None:
        names = {id(p): n for n, p in net.named_parameters()}
        buffers, groups = {}, []
        for group in optimizer.param_groups:
            groups.append({k: v for k, v in group.items() if k != "params"})
            for p in group["params"]:
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buffers[names[id(p)]] = buf.detach().cpu().contiguous()
        fsync_write(out / f"{optim_file}.tmp", save(buffers, metadata=meta))
        state["optimizer"] = {"param_groups": groups}
    state["dataset"] = dataset_provenance(cfg)
    state["weights_sha256"] = weights_digests(cfg)
    state.update(extra or {})
    part = out / f"{name}.json.part"
    fsync_write(part, (json.dumps(state, indent=1) + "\n").encode())
    os.replace(part, out / f"{name}.json.tmp")          # commit point
    recover_checkpoint(out, name)                       # rename into place
    return out / weights_file


def set_checkpoint_model_fields(out_dir: str | Path, name: str, fields: dict[str, Any]) -> None:
    """Set ``fields`` of ``config.model`` in the JSON of checkpoint ``name`` of ``out_dir`` (an
    atomic, fsynced rewrite; the weights and optimizer files are untouched). Meant for fields the
    weights do not depend on (the detection post-processing, ``model.det_*``)."""
    from .utils import atomic_write

    path = Path(out_dir) / f"{name}.json"
    state = json.loads(path.read_text())
    state["config"]["model"].update(fields)
    atomic_write(path, json.dumps(state, indent=1) + "\n", fsync=True)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def weights_digests(cfg: Config) -> dict[str, str | None]:
    """SHA-256 of the weight files a config starts from, stored in every checkpoint JSON under
    ``"weights_sha256"``: ``{"backbone_weights": ..., "i3d_weights": ...}`` (None when the field
    is unset or its file is missing). ``"builtin"`` names a file the package may replace in an
    upgrade, so equal configs do not prove equal starting weights; these digests do."""
    import hashlib

    from .backbones import resolve_backbone_weights

    out: dict[str, str | None] = {}
    for name in ("backbone_weights", "i3d_weights"):
        value = getattr(cfg.model, name)
        if value is None:
            path = None
        else:
            path = resolve_backbone_weights(value) if name == "backbone_weights" else Path(value)
        if path is None or not path.is_file():
            out[name] = None
            continue
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if key not in _DIGESTS:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            _DIGESTS[key] = h.hexdigest()
        out[name] = _DIGESTS[key]
    return out


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


def file_step(path: Path) -> int | None:
    """The step stored in a safetensors file's metadata (None for files without it)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return int(meta["step"]) if "step" in meta else None


def check_step(path: Path, step: int) -> None:
    found = file_step(path)
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
        check_step(weights_path, step)
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


def restore_training_state(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                           device: torch.device, cfg: Config, rank: int = 0,
                           world_size: int = 1) -> dict[str, Any]:
    """Load ``out_dir/last.*`` into ``model`` and ``optimizer`` and restore the RNG states
    (this rank's when the checkpoint holds one per rank); returns the checkpoint JSON.
    Refuses (``ValueError``) a checkpoint of another model config; warns about changed
    data/train settings."""
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
    weights_file, optim_file = (out_dir / f for f in checkpoint_files(CHECKPOINT_LAST))
    check_step(weights_file, step)
    check_step(optim_file, step)
    net = unwrap_model(model)
    net.load_state_dict(load_file(str(weights_file), device=str(device)))
    buffers = load_file(str(optim_file), device=str(device))
    params = dict(net.named_parameters())
    for name, buf in buffers.items():
        optimizer.state[params[name]]["momentum_buffer"] = buf
    for group, saved in zip(optimizer.param_groups, state["optimizer"]["param_groups"]):
        group.update(saved)
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == world_size:
        set_rng_state(ranks[rank])
    else:
        if world_size > 1 or ranks is not None:
            log.warning("resuming with %d process(es) from a checkpoint written by %s; the "
                        "random draws will differ from an uninterrupted run",
                        world_size, len(ranks) if ranks else 1)
        set_rng_state(state["rng"])
    return state
