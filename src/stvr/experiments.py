"""Helpers of the experiment commands (``stvr demo``, ``stvr bench``): the synthetic
data set with generator overrides, a preset config for one run, whether a run
folder can be resumed, the test set of a config, and predict-then-evaluate.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

from .utils import resolve_device

__all__ = ["synth_config", "prepare_data", "run_config", "config_matches", "weights_match",
           "only_postprocessing_differs", "adopt_postprocessing", "test_dataset", "evaluate_model", "pct",
           "auc_text", "chance_map", "device_name"]


def synth_config(overrides: Sequence[str] = ()):
    """The generator's default :class:`stvr.data.synthetic.SynthConfig` with ``key=value`` overrides."""
    from .config import coerce_value
    from .data.synthetic import SynthConfig

    cfg = SynthConfig()
    changes: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cfg)}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--synth {item!r} is not of the form field=value")
        key, value = (v.strip() for v in item.split("=", 1))
        if key not in names:
            raise ValueError(f"--synth: SynthConfig has no field {key!r}; fields: {', '.join(sorted(names))}")
        changes[key] = coerce_value(value, getattr(cfg, key))
    return dataclasses.replace(cfg, **changes)


def prepare_data(root: str | Path, overrides: Sequence[str] = (), progress: bool = True) -> dict:
    """Generate (or reuse) the synthetic data set at ``root``; returns the generator's summary."""
    from .data.synthetic import generate_dataset

    return generate_dataset(Path(root), synth_config(overrides), progress=progress)


def run_config(preset_name: str, data_root: str | Path, seed: int, device: str,
               overrides: Sequence[str] = ()):
    """The ``preset_name`` config on ``data_root`` with ``train.seed``/``train.device`` and
    overrides, with the action ids of the root's training annotations where the action distance
    term is on (:func:`stvr.train.with_action_ids`: the config a run trained on it saves)."""
    from .config import apply_overrides, preset
    from .train import with_action_ids

    cfg = apply_overrides(preset(preset_name), [f"data.root={data_root}", f"train.seed={seed}",
                                                f"train.device={device}", *overrides])
    return with_action_ids(cfg)


def config_matches(run_dir: Path, cfg) -> bool:
    """Whether ``run_dir/config.json`` holds exactly ``cfg`` and the run started from the same
    weight files (:func:`weights_match`), so its checkpoints can be resumed or reused."""
    from .config import config_to_dict

    path = run_dir / "config.json"
    if not path.exists():
        return False
    return (json.loads(path.read_text()) == json.loads(json.dumps(config_to_dict(cfg)))
            and weights_match(run_dir, cfg))


def weights_match(run_dir: Path, cfg) -> bool:
    """Whether the run's ``last.json`` started from the weight files ``cfg`` names now
    (:func:`stvr.checkpoint.weights_digests`; ``"builtin"`` may name other shipped weights after
    an upgrade). True without a readable ``last.json`` (nothing to reuse) and for one written
    before the digests existed."""
    from .checkpoint import weights_digests

    try:
        stored = json.loads((run_dir / "last.json").read_text()).get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        return True
    return stored is None or stored == weights_digests(cfg)


def _training_part(config: dict) -> dict:
    """A config dict without the detection post-processing fields (``model.det_*``)."""
    model = {k: v for k, v in config.get("model", {}).items() if not k.startswith("det_")}
    return {**config, "model": model}


def only_postprocessing_differs(old: dict | None, new: dict) -> bool:
    """Whether two config dicts (:func:`stvr.config.config_to_dict`) differ, and only in the
    detection post-processing (``model.det_*``: NMS, caps, threshold, score decay, box voting),
    which training never reads (validation during training does: its logged numbers are
    of the post-processing the run was trained with)."""
    return isinstance(old, dict) and old != new and _training_part(old) == _training_part(new)


def adopt_postprocessing(run_dir: Path, cfg) -> dict[str, Any] | None:
    """Give a run folder trained with another detection post-processing ``cfg``'s, so that it
    can be resumed or reused instead of retrained.

    When ``run_dir/config.json`` and the JSON of each of its checkpoints (``last``, ``best``)
    differ from ``cfg`` only in ``model.det_*`` (:func:`only_postprocessing_differs`) and the run
    started from the same weight files (:func:`weights_match`), their ``model.det_*`` fields are
    set to ``cfg``'s (atomic rewrites of the JSON files; weights, optimizer state, steps and logs
    untouched) and the old values are returned, ``{field: old value}`` of the fields that changed.
    Otherwise nothing is written and ``None`` is returned (no run, another training config, or
    the same config: nothing to adopt)."""
    from .checkpoint import CHECKPOINT_BEST, CHECKPOINT_LAST, recover_checkpoint, set_checkpoint_model_fields
    from .config import config_to_dict, save_config

    path = run_dir / "config.json"
    new = json.loads(json.dumps(config_to_dict(cfg)))
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not only_postprocessing_differs(old, new) or not weights_match(run_dir, cfg):
        return None
    states = []
    for name in (CHECKPOINT_LAST, CHECKPOINT_BEST):
        recover_checkpoint(run_dir, name)
        state_path = run_dir / f"{name}.json"
        if not state_path.exists():
            continue
        try:
            stored = json.loads(state_path.read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if _training_part(stored) != _training_part(new):
            return None
        states.append(name)
    det = {k: v for k, v in new["model"].items() if k.startswith("det_")}
    for name in states:
        set_checkpoint_model_fields(run_dir, name, det)
    save_config(cfg, path)
    return {k: old["model"].get(k) for k, v in det.items() if old["model"].get(k) != v}


def test_dataset(cfg, split: str = "test"):
    """The :class:`EvalPairDataset` of ``cfg.data.root``'s ``split`` pairs (shared clip cache)."""
    from .data.dataset import EvalPairDataset
    from .data.video import ClipCache

    root = Path(cfg.data.root)
    cache = ClipCache(Path(cfg.data.cache) if cfg.data.cache else root / "cache",
                      size=cfg.model.image_size, fps=cfg.data.fps)
    return EvalPairDataset(root, split=split, image_size=cfg.model.image_size, cache=cache,
                           data_cfg=cfg.data, clip_frames=cfg.model.clip_frames)


def evaluate_model(model, dataset, device: str, detections_path: Path | None = None,
                   progress: bool = True, video_ious: Sequence[float] | None = (0.2, 0.5)) -> dict:
    """Predict ``dataset`` with ``model`` and evaluate; optionally save the detections.

    With the annotations of the dataset's root (:func:`stvr.train.validation_actors`,
    read once per dataset), the result has ``"diagnostics"``: actor recall, match AUC
    and chance frame-mAP (:func:`stvr.evaluation.match_diagnostics`)."""
    from .predict import evaluate_detections, predict_pairs, save_detections
    from .train import validation_actors

    t0 = time.perf_counter()
    failed: list[int] = []
    dets = predict_pairs(model, dataset, device=device, progress=progress, failed=failed)
    t_pred = time.perf_counter() - t0
    if detections_path is not None:
        save_detections(dets, detections_path)
    res = evaluate_detections(dataset.pairs, dets, video_ious=video_ious,
                              clips_per_second=dataset.clips_per_second,
                              actors=validation_actors(dataset))
    ref_seconds = sum(int(p["reference"]["end"]) - int(p["reference"]["start"]) for p in dataset.pairs)
    res.update({"predict_seconds": round(t_pred, 2), "reference_seconds": ref_seconds,
                "failed_pairs": failed})
    return res


def pct(x: float | None) -> str:
    """A score in [0, 1] as a percentage with one decimal ("n/a" for None)."""
    return "n/a" if x is None else f"{100 * x:.1f}"


def auc_text(x: float | None) -> str:
    """A ROC AUC with two decimals ("n/a" for None)."""
    return "n/a" if x is None else f"{x:.2f}"


def chance_map(results: Any) -> float | None:
    """The chance frame-mAP@0.5 (``["diagnostics"]["chance_mAP"]``) of the first result that has one."""
    for r in results:
        value = (r.get("diagnostics") or {}).get("chance_mAP")
        if value is not None:
            return value
    return None


def device_name(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available else ``"cpu"``; other names as ``torch.device`` spells them."""
    return str(resolve_device(name))
