"""Pair files, tubelet files and the dataset root.

Pair file (API.md section 3): a JSON list of pairs, each
``{"query": {"id", "frames", "boxes", "label"}, "reference": {"id", "start", "end", "gt"}}``
with normalized ``[x1, y1, x2, y2]`` boxes. The official STVR files store a pair
as a two-element list ``[query, reference]`` and boxes as ``(y1, x1, y2, x2)``;
:func:`load_pairs` reads both (``box_order="yxyx"`` for the official files).

Dataset root (see COMMON conventions)::

    <root>/dataset.json  annotations/{train,val}.csv  label_split.json
    -> train_tubelets.json  pairs/val.json  pairs/test.json  stats.json

written by :func:`build_dataset_root`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..utils import write_json
from .ava import (
    Tubelet,
    evaluation_pairs,
    label_key,
    load_label_map,
    load_label_split,
    read_annotations,
    training_tubelets,
)

__all__ = [
    "load_pairs",
    "save_pairs",
    "validate_pairs",
    "load_tubelets",
    "save_tubelets",
    "load_dataset_json",
    "resolve_video_path",
    "build_dataset_root",
]

_BOX_SLACK = 1e-4  # boxes up to this far outside [0, 1] are clipped, further is an error


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None


# ----------------------------------------------------------------------------- pairs


def _box(value: Any, where: str, yxyx: bool) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ValueError(f"{where}: a box must be a list of 4 numbers, got {value!r}")
    try:
        b = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: a box must be a list of 4 numbers, got {value!r}") from None
    if not all(math.isfinite(v) for v in b):
        raise ValueError(f"{where}: box {value!r} has a non-finite value")
    if yxyx:
        b = [b[1], b[0], b[3], b[2]]
    if b[0] > b[2] or b[1] > b[3]:
        raise ValueError(f"{where}: box {value!r} has x1 > x2 or y1 > y2 (box order {'yxyx' if yxyx else 'xyxy'})")
    if min(b) < -_BOX_SLACK or max(b) > 1 + _BOX_SLACK:
        raise ValueError(f"{where}: box {value!r} is not normalized to [0, 1]")
    return [min(max(v, 0.0), 1.0) for v in b]


def _int(value: Any, where: str, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where}: {what} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)  # official files may store "0902"-style seconds
    raise ValueError(f"{where}: {what} must be an integer, got {value!r}")


def _normalize_pair(pair: Any, where: str, yxyx: bool) -> dict:
    """Validate one pair (object or ``[query, reference]`` form) -> object form, xyxy."""
    if isinstance(pair, (list, tuple)):
        if len(pair) != 2:
            raise ValueError(f"{where}: a list-form pair must be [query, reference], got {len(pair)} elements")
        query, ref = pair
    elif isinstance(pair, dict):
        missing = {"query", "reference"} - set(pair)
        if missing:
            raise ValueError(f"{where}: missing key(s) {sorted(missing)}")
        query, ref = pair["query"], pair["reference"]
    else:
        raise ValueError(f"{where}: a pair must be an object or a [query, reference] list")
    if not isinstance(query, dict) or not isinstance(ref, dict):
        raise ValueError(f"{where}: query and reference must be objects")
    for key in ("id", "frames", "boxes", "label"):
        if key not in query:
            raise ValueError(f"{where}: query lacks '{key}'")
    for key in ("id", "start", "end", "gt"):
        if key not in ref:
            raise ValueError(f"{where}: reference lacks '{key}'")
    if not isinstance(query["id"], str) or not query["id"]:
        raise ValueError(f"{where}: query id must be a non-empty string")
    if not isinstance(ref["id"], str) or not ref["id"]:
        raise ValueError(f"{where}: reference id must be a non-empty string")
    frames = query["frames"]
    if not isinstance(frames, (list, tuple)) or not frames:
        raise ValueError(f"{where}: query frames must be a non-empty list of seconds")
    frames = [_int(s, where, "a query frame") for s in frames]
    if any(b <= a for a, b in zip(frames, frames[1:])):
        raise ValueError(f"{where}: query frames must be increasing, got {frames}")
    qboxes = query["boxes"]
    if not isinstance(qboxes, (list, tuple)) or len(qboxes) != len(frames):
        n = len(qboxes) if isinstance(qboxes, (list, tuple)) else "no"
        raise ValueError(f"{where}: query has {len(frames)} frames but {n} boxes")
    qboxes = [_box(b, f"{where}: query box {k}", yxyx) for k, b in enumerate(qboxes)]
    label = query["label"]
    if isinstance(label, int):
        label = [label]
    if not isinstance(label, (list, tuple)) or not label:
        raise ValueError(f"{where}: query label must be a non-empty list of action ids")
    label = sorted(_int(a, where, "an action id") for a in label)
    start, end = _int(ref["start"], where, "reference start"), _int(ref["end"], where, "reference end")
    if end <= start:
        raise ValueError(f"{where}: reference end ({end}) must be greater than start ({start})")
    gt = ref["gt"]
    if not isinstance(gt, (list, tuple)) or len(gt) != end - start:
        n = len(gt) if isinstance(gt, (list, tuple)) else "no"
        raise ValueError(f"{where}: reference gt has {n} entries, expected end - start = {end - start}")
    gt_out = []
    for k, second in enumerate(gt):
        if not isinstance(second, (list, tuple)):
            raise ValueError(f"{where}: reference gt entry {k} must be a list of boxes")
        gt_out.append([_box(b, f"{where}: gt second {start + k}", yxyx) for b in second])
    return {
        "query": {"id": query["id"], "frames": frames, "boxes": qboxes, "label": label},
        "reference": {"id": ref["id"], "start": start, "end": end, "gt": gt_out},
    }


def validate_pairs(pairs: Any, source: str = "pairs", box_order: str = "xyxy") -> list[dict]:
    """Validate pairs and return them in the object form with xyxy boxes.

    Raises ``ValueError`` ``"<source>: pair <i>: <problem>"`` on the first bad pair.
    """
    if box_order not in ("xyxy", "yxyx"):
        raise ValueError(f"box_order must be 'xyxy' or 'yxyx', got {box_order!r}")
    if not isinstance(pairs, (list, tuple)):
        raise ValueError(f"{source}: a pair file must hold a JSON list of pairs")
    yxyx = box_order == "yxyx"
    return [_normalize_pair(p, f"{source}: pair {i}", yxyx) for i, p in enumerate(pairs)]


def load_pairs(path: str | Path, box_order: str = "xyxy") -> list[dict]:
    """Read a pair file (object form or the official ``[query, reference]`` form).

    Args:
        path: the JSON file.
        box_order: ``"xyxy"`` (project files) or ``"yxyx"`` (official STVR files);
            boxes are returned as normalized xyxy either way.

    Returns:
        Pairs in the API.md section 3 object form, validated: frames are ints,
        ``len(boxes) == len(frames)``, ``len(gt) == end - start``, every box has
        4 finite numbers in [0, 1] with x1 <= x2, y1 <= y2, labels sorted.
    """
    if box_order not in ("xyxy", "yxyx"):
        raise ValueError(f"box_order must be 'xyxy' or 'yxyx', got {box_order!r}")
    path = Path(path)
    return validate_pairs(_read_json(path), str(path), box_order)


def save_pairs(pairs: Sequence[dict], path: str | Path) -> None:
    """Validate ``pairs`` and write them in the object form (xyxy)."""
    path = Path(path)
    write_json(path, validate_pairs(list(pairs), str(path)))


# ----------------------------------------------------------------------------- tubelets


def save_tubelets(tubelets: Iterable[Tubelet], path: str | Path) -> None:
    """Write tubelets as ``[{"id", "person", "label", "seconds", "boxes"}, ...]``."""
    write_json(Path(path), [t.to_json() for t in tubelets])


def load_tubelets(path: str | Path) -> list[Tubelet]:
    """Read a tubelet file written by :func:`save_tubelets` (validated)."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a tubelet file must hold a JSON list")
    out = []
    for i, d in enumerate(data):
        where = f"{path}: tubelet {i}"
        if not isinstance(d, dict):
            raise ValueError(f"{where}: must be an object")
        for key in ("id", "person", "label", "seconds", "boxes"):
            if key not in d:
                raise ValueError(f"{where}: lacks '{key}'")
        secs = [_int(s, where, "a second") for s in d["seconds"]]
        if not secs or any(b != a + 1 for a, b in zip(secs, secs[1:])):
            raise ValueError(f"{where}: seconds must be non-empty, consecutive and increasing, got {secs}")
        if not isinstance(d["boxes"], list) or len(d["boxes"]) != len(secs):
            raise ValueError(f"{where}: needs one box per second ({len(secs)})")
        boxes = np.array([_box(b, where, False) for b in d["boxes"]], dtype=np.float64).reshape(-1, 4)
        label = d["label"] if isinstance(d["label"], list) else [d["label"]]
        if not label:
            raise ValueError(f"{where}: empty label")
        out.append(
            Tubelet(
                str(d["id"]),
                _int(d["person"], where, "person"),
                tuple(_int(a, where, "an action id") for a in label),
                secs,
                boxes,
            )
        )
    return out


# ----------------------------------------------------------------------------- dataset root


def load_dataset_json(root: str | Path) -> dict:
    """Read and check ``<root>/dataset.json`` (see the dataset-root layout)."""
    path = Path(root) / "dataset.json"
    d = _read_json(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    d.setdefault("fps", 24)
    d.setdefault("videos", {})
    d.setdefault("time_ranges", {})
    d.setdefault("train_videos", [])
    d.setdefault("val_videos", [])
    if not isinstance(d["videos"], dict) or not isinstance(d["time_ranges"], dict):
        raise ValueError(f"{path}: 'videos' and 'time_ranges' must be objects keyed by video id")
    for vid, r in d["time_ranges"].items():
        if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(v, int) for v in r) and r[0] < r[1]):
            raise ValueError(f"{path}: time range of {vid!r} must be [first_second, end_exclusive], got {r!r}")
    return d


def resolve_video_path(root: str | Path, dataset: dict, video_id: str, videos_dir: str | Path | None = None) -> Path:
    """Path of a video: ``dataset["videos"][video_id]`` (relative to root, or absolute).

    With ``videos_dir``, the file of the same name is looked up in that folder
    instead (or ``<videos_dir>/<video_id>.*`` when the video is not listed).
    Raises ``FileNotFoundError`` naming the video when nothing is found.
    """
    root = Path(root)
    entry = dataset.get("videos", {}).get(video_id)
    if videos_dir is not None:
        vdir = Path(videos_dir)
        if entry is not None and (vdir / Path(entry).name).exists():
            return vdir / Path(entry).name
        found = sorted(vdir.glob(f"{video_id}.*"))
        if found:
            return found[0]
        raise FileNotFoundError(f"video {video_id!r} not found in {vdir}")
    if entry is None:
        raise FileNotFoundError(f"video {video_id!r} is not listed in {root / 'dataset.json'}")
    p = Path(entry)
    return p if p.is_absolute() else root / p


def build_dataset_root(root: str | Path, seed: int = 0, strict: bool = True) -> dict:
    """Reorganize a dataset root's annotations into training tubelets and pairs.

    Reads ``dataset.json``, ``annotations/train.csv``, ``annotations/val.csv`` and
    ``label_split.json`` and writes

    * ``train_tubelets.json``: :func:`stvr.data.ava.training_tubelets` of the
      train CSV with the val + test labels held out;
    * ``pairs/val.json`` and ``pairs/test.json``: :func:`stvr.data.ava.evaluation_pairs`
      of the val CSV for the val / test labels, references clipped to the
      ``time_ranges`` of ``dataset.json``;
    * ``stats.json``: :func:`stvr.data.stats.compute_stats` of the above.

    Args:
        root: the dataset root.
        seed: seed of the reference draws (pairs depend only on data and seed).
        strict: passed to :func:`stvr.data.ava.read_annotations`.

    Returns:
        The statistics dictionary written to ``stats.json``.
    """
    from .stats import compute_stats

    root = Path(root)
    dataset = load_dataset_json(root)
    split = load_label_split(root / "label_split.json")
    train_rows = read_annotations(root / "annotations" / "train.csv", strict=strict)
    val_rows = read_annotations(root / "annotations" / "val.csv", strict=strict)
    ranges = {k: tuple(v) for k, v in dataset["time_ranges"].items()}
    missing = sorted({r.video_id for r in val_rows} - set(ranges))
    if missing:
        raise ValueError(f"{root / 'dataset.json'}: no time range for val video(s) {missing[:10]}")
    train = training_tubelets(train_rows, split["val"] + split["test"])
    pairs = {
        name: evaluation_pairs(val_rows, split[name], ranges, seed=seed) for name in ("val", "test")
    }
    save_tubelets(train, root / "train_tubelets.json")
    for name, p in pairs.items():
        save_pairs(p, root / "pairs" / f"{name}.json")
    names = dataset.get("label_names")
    if names is None and str(dataset.get("name", "")).lower().startswith("ava"):
        label_map = load_label_map()
        names = {}
        for lab in {t.label for t in train} | set(split["val"]) | set(split["test"]):
            names[label_key(lab)] = "+".join(label_map.get(a, f"#{a}") for a in lab)
    stats = compute_stats(train, pairs, split, label_names=names)
    stats["name"] = dataset.get("name", root.name)
    stats["seed"] = int(seed)
    write_json(root / "stats.json", stats, indent=1)
    return stats
