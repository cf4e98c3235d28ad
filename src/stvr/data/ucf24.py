"""UCF-101-24 annotations (``pyannot.pkl`` of github.com/gurkirt/corrected-UCF101-Annots).

The annotation file is a dict ``video_name -> {"numf": int, "label": int,
"annotations": [{"sf": int, "ef": int, "label": int, "boxes": ndarray [ef-sf, 4]}]}``
with ``video_name`` like ``"Basketball/v_Basketball_g01_c01"``, 0-based frame
indices, ``ef`` exclusive and one pixel box per frame ``sf..ef-1``.

Box format: the widely used ``pyannot.pkl`` stores ``(x, y, w, h)`` in pixels
(its author's own loaders convert with ``x2 = x + w``, ``y2 = y + h``), which is
the default here (``box_format="xywh"``); ``box_format="xyxy"`` reads files
that already hold ``(x1, y1, x2, y2)``. Boxes are normalized by the frame size
(UCF101: 320 x 240) and clipped to [0, 1].

The pickle is read with a restricted unpickler that only rebuilds numpy arrays
/ dtypes / scalars and plain containers (``encoding="latin1"`` for the
Python-2 pickles); any other global (functions, classes) is refused, so a
malicious file cannot run code. A JSON file with the same structure (boxes as
nested lists) is accepted too.

Conversion to the project's tubelets (``stvr.data.ava.Tubelet``): one tube =
one tubelet with label ``(class_id,)`` and person id = the tube's index in its
video. Second ``t`` (= frames of ``[t, t+1)`` s at the video's ``fps``) belongs
to the tube when the frame at its middle, ``floor((t + 0.5) * fps)``, is
annotated, and the box of that frame is the box of the second. Only whole
seconds of the video are used: the annotated range is ``[0, numf // fps)``.

Class split (no official one exists for STVR on UCF-101-24; the paper uses
14 / 5 / 5 classes): :func:`split_classes` shuffles the sorted class ids with
``numpy.random.default_rng(seed).permutation`` and takes the first 14 for
training, the next 5 for val and the last 5 for test. With seed 0 and the 24
classes 0..23 this gives ``UCF24_SPLIT_SEED0``.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .ava import AvaRow, Tubelet, write_annotations

__all__ = [
    "UCF24_CLASSES",
    "UCF24_SPLIT_SEED0",
    "load_ucf24_annotations",
    "safe_load_pickle",
    "ucf24_tubelets",
    "split_classes",
    "tubelet_rows",
    "write_ucf24_root",
]

#: Class names in index order (class id = index), as in the UCF-101-24 loaders.
UCF24_CLASSES: tuple[str, ...] = (
    "Basketball", "BasketballDunk", "Biking", "CliffDiving", "CricketBowling", "Diving",
    "Fencing", "FloorGymnastics", "GolfSwing", "HorseRiding", "IceDancing", "LongJump",
    "PoleVault", "RopeClimbing", "SalsaSpin", "SkateBoarding", "Skiing", "Skijet",
    "SoccerJuggling", "Surfing", "TennisSwing", "TrampolineJumping", "VolleyballSpiking",
    "WalkingWithDog",
)

# ----------------------------------------------------------------------------- safe unpickling

_NP_CORE = "numpy._core" if hasattr(np, "_core") else "numpy.core"
_ALLOWED_GLOBALS: dict[tuple[str, str], tuple[str, str]] = {}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = (f"{_NP_CORE}.multiarray", "_reconstruct")
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "scalar")] = (f"{_NP_CORE}.multiarray", "scalar")
    _ALLOWED_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = (f"{_NP_CORE}.numeric", "_frombuffer")
for _name in ("ndarray", "dtype"):
    _ALLOWED_GLOBALS[("numpy", _name)] = ("numpy", _name)
for _name in ("set", "frozenset", "complex", "bytearray"):
    _ALLOWED_GLOBALS[("builtins", _name)] = ("builtins", _name)
    _ALLOWED_GLOBALS[("__builtin__", _name)] = ("builtins", _name)
_ALLOWED_GLOBALS[("collections", "OrderedDict")] = ("collections", "OrderedDict")
# protocol-2 pickles made by Python 3 store bytes (numpy buffers) as _codecs.encode(str, "latin1")
_ALLOWED_GLOBALS[("_codecs", "encode")] = ("_codecs", "encode")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only numpy arrays/dtypes/scalars and builtin containers."""

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None and module == "numpy.dtypes" and name.endswith("DType"):
            target = (module, name)  # numpy >= 1.25 dtype classes (data types only)
        if target is None:
            raise pickle.UnpicklingError(f"refused to load global '{module}.{name}' (only numpy arrays allowed)")
        import importlib

        return getattr(importlib.import_module(target[0]), target[1])

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def safe_load_pickle(path: str | Path) -> Any:
    """Load a pickle with the restricted unpickler (``encoding="latin1"``).

    Raises ``ValueError`` naming the file when the pickle references anything but
    numpy arrays and builtin containers, or is corrupt.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: unsafe or invalid pickle: {err}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise ValueError(f"{path}: corrupt pickle: {type(err).__name__}: {err}") from None


# ----------------------------------------------------------------------------- reading


def _as_int(v: Any, where: str, what: str) -> int:
    if isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{where}: {what} must be an integer, got {v!r}")
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    raise ValueError(f"{where}: {what} must be an integer, got {v!r}")


def _key_str(k: Any) -> str:
    return k.decode("latin1") if isinstance(k, bytes) else str(k)


def load_ucf24_annotations(path: str | Path) -> dict[str, dict]:
    """Read and validate a ``pyannot.pkl`` (restricted unpickler) or its JSON version.

    Returns ``{video_name: {"numf": int, "label": int, "annotations":
    [{"sf": int, "ef": int, "label": int, "boxes": float64 [ef - sf, 4]}]}}``
    with boxes as stored (pixels, format not converted). Raises ``ValueError``
    naming the file and video for a bad structure.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from None
    else:
        raw = safe_load_pickle(path)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a dict video_name -> annotation, got {type(raw).__name__}")
    out: dict[str, dict] = {}
    for key, entry in raw.items():
        name = _key_str(key)
        where = f"{path}: video {name!r}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: entry must be a dict")
        entry = {_key_str(k): v for k, v in entry.items()}
        if "annotations" not in entry or "numf" not in entry:
            raise ValueError(f"{where}: needs 'numf' and 'annotations'")
        numf = _as_int(entry["numf"], where, "numf")
        tubes = []
        anns = entry["annotations"]
        if not isinstance(anns, (list, tuple)):
            raise ValueError(f"{where}: 'annotations' must be a list")
        for j, a in enumerate(anns):
            if not isinstance(a, Mapping):
                raise ValueError(f"{where}: tube {j} must be a dict")
            a = {_key_str(k): v for k, v in a.items()}
            for k in ("sf", "ef", "label", "boxes"):
                if k not in a:
                    raise ValueError(f"{where}: tube {j} lacks '{k}'")
            sf, ef = _as_int(a["sf"], where, "sf"), _as_int(a["ef"], where, "ef")
            if not 0 <= sf < ef <= numf:
                raise ValueError(f"{where}: tube {j} has frames [{sf}, {ef}) outside [0, numf={numf})")
            try:
                boxes = np.asarray(a["boxes"], dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: tube {j} boxes are not numeric") from None
            if boxes.shape != (ef - sf, 4):
                raise ValueError(f"{where}: tube {j} boxes have shape {boxes.shape}, expected ({ef - sf}, 4)")
            if not np.isfinite(boxes).all():
                raise ValueError(f"{where}: tube {j} has non-finite boxes")
            tubes.append({"sf": sf, "ef": ef, "label": _as_int(a["label"], where, "label"), "boxes": boxes})
        label = _as_int(entry["label"], where, "label") if "label" in entry else (tubes[0]["label"] if tubes else -1)
        out[name] = {"numf": numf, "label": label, "annotations": tubes}
    return out


# ----------------------------------------------------------------------------- conversion


def video_id_of(name: str) -> str:
    """``"Basketball/v_Basketball_g01_c01" -> "v_Basketball_g01_c01"`` (unique in UCF101)."""
    return name.replace("\\", "/").rsplit("/", 1)[-1]


def ucf24_tubelets(
    annotations: Mapping[str, dict],
    width: int = 320,
    height: int = 240,
    fps: float = 25.0,
    box_format: str = "xywh",
) -> tuple[list[Tubelet], dict[str, tuple[int, int]]]:
    """Tubelets (one per tube, one box per second) and per-video time ranges.

    Args:
        annotations: output of :func:`load_ucf24_annotations`.
        width, height: frame size in pixels used to normalize boxes.
        fps: frame rate of the annotated frames.
        box_format: ``"xywh"`` (pyannot.pkl) or ``"xyxy"``.

    Returns:
        (tubelets sorted by (video, person, first second), ``{video_id: (0, numf // fps)}``).
        Tubes that cover no middle frame of a whole second give no tubelet.
    """
    if box_format not in ("xywh", "xyxy"):
        raise ValueError(f"box_format must be 'xywh' or 'xyxy', got {box_format!r}")
    scale = np.array([width, height, width, height], dtype=np.float64)
    tubes: list[Tubelet] = []
    ranges: dict[str, tuple[int, int]] = {}
    for name in sorted(annotations):
        entry = annotations[name]
        vid = video_id_of(name)
        if vid in ranges:
            raise ValueError(f"two UCF videos share the id {vid!r}")
        n_sec = int(entry["numf"] // fps)
        ranges[vid] = (0, max(n_sec, 1))
        for j, tube in enumerate(entry["annotations"]):
            secs = np.arange(n_sec)
            mid = np.floor((secs + 0.5) * fps).astype(np.int64)
            keep = (mid >= tube["sf"]) & (mid < tube["ef"])
            if not keep.any():
                continue
            b = tube["boxes"][mid[keep] - tube["sf"]].astype(np.float64)
            if box_format == "xywh":
                if (b[:, 2:] < 0).any():
                    raise ValueError(f"video {name!r} tube {j}: negative width/height (is box_format 'xyxy'?)")
                b = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)
            elif ((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])).any():
                raise ValueError(f"video {name!r} tube {j}: x2 < x1 or y2 < y1 (is box_format 'xywh'?)")
            b = np.clip(b / scale, 0.0, 1.0)
            tubes.append(Tubelet(vid, j, (int(tube["label"]),), secs[keep].tolist(), b))
    tubes.sort(key=lambda t: t.key)
    return tubes, ranges


def split_classes(class_ids: Sequence[int], seed: int = 0) -> dict[str, list[int]]:
    """Deterministic class split: sorted ids permuted by ``default_rng(seed)``.

    24 classes -> 14 train / 5 val / 5 test. Other counts keep the proportions
    (val = test = max(1, round(n * 5 / 24)), the rest train; needs n >= 3).
    """
    ids = sorted({int(c) for c in class_ids})
    n = len(ids)
    if n < 3:
        raise ValueError(f"need at least 3 classes for a train/val/test split, got {n}")
    k = 5 if n == 24 else max(1, round(n * 5 / 24))
    if n - 2 * k < 1:
        k = (n - 1) // 2
    perm = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    return {"train": sorted(perm[: n - 2 * k]), "val": sorted(perm[n - 2 * k : n - k]), "test": sorted(perm[n - k :])}


#: :func:`split_classes` of the 24 classes with seed 0 (checked by the tests).
UCF24_SPLIT_SEED0: dict[str, list[int]] = split_classes(range(24), seed=0)


def tubelet_rows(tubelets: Sequence[Tubelet]) -> list[AvaRow]:
    """AVA-format rows (one per second and action) of tubelets."""
    rows = []
    for t in tubelets:
        for s, b in zip(t.seconds, t.boxes):
            for a in t.label:
                rows.append(AvaRow(t.video_id, int(s), tuple(float(v) for v in b), int(a), int(t.person_id)))
    rows.sort(key=lambda r: (r.video_id, r.second, r.person_id, r.action_id))
    return rows


def _find_video(videos_dir: Path, name: str) -> Path | None:
    vid = video_id_of(name)
    for stem in (name, vid):
        for ext in (".avi", ".mp4", ".mkv", ".webm", ".mov"):
            p = videos_dir / f"{stem}{ext}"
            if p.is_file():
                return p
    found = sorted(videos_dir.rglob(f"{vid}.*"))
    return found[0] if found else None


def write_ucf24_root(
    annotation_path: str | Path,
    out_root: str | Path,
    videos_dir: str | Path | None = None,
    seed: int = 0,
    width: int = 320,
    height: int = 240,
    fps: float = 25.0,
    box_format: str = "xywh",
) -> dict:
    """Write a dataset root for UCF-101-24 and build its tubelets, pairs and stats.

    Classes are split with :func:`split_classes` (``seed``); ``annotations/train.csv``
    holds the videos of the training classes, ``annotations/val.csv`` those of
    the val and test classes, ``label_split.json`` the val/test classes as
    single-id labels, ``dataset.json`` the videos found in ``videos_dir`` (absolute
    paths) and time ranges ``[0, numf // fps)``. Then
    :func:`stvr.data.pairs.build_dataset_root` writes the rest.

    Returns:
        The statistics, plus ``"missing_videos"``: ids not found in ``videos_dir``.
    """
    from ..utils import write_json
    from .pairs import build_dataset_root

    out = Path(out_root)
    ann = load_ucf24_annotations(annotation_path)
    tubes, ranges = ucf24_tubelets(ann, width, height, fps, box_format)
    classes = sorted({t.label[0] for t in tubes})
    split = split_classes(classes, seed=seed)
    train_cls = set(split["train"])
    train_t = [t for t in tubes if t.label[0] in train_cls]
    val_t = [t for t in tubes if t.label[0] not in train_cls]
    write_annotations(tubelet_rows(train_t), out / "annotations" / "train.csv")
    write_annotations(tubelet_rows(val_t), out / "annotations" / "val.csv")
    write_json(out / "label_split.json", {"val": [[c] for c in split["val"]], "test": [[c] for c in split["test"]],
                                          "train_classes": split["train"]}, indent=1)
    videos: dict[str, str] = {}
    missing: list[str] = []
    if videos_dir is not None:
        for name in sorted(ann):
            p = _find_video(Path(videos_dir), name)
            if p is None:
                missing.append(video_id_of(name))
            else:
                videos[video_id_of(name)] = str(p.resolve())
    dataset = {
        "name": "ucf24",
        "fps": 24,
        "source_fps": fps,
        "frame_size": [width, height],
        "videos": videos,
        "time_ranges": {k: list(v) for k, v in sorted(ranges.items())},
        "train_videos": sorted({t.video_id for t in train_t}),
        "val_videos": sorted({t.video_id for t in val_t}),
        "label_names": {str(c): UCF24_CLASSES[c] if 0 <= c < len(UCF24_CLASSES) else f"class {c}" for c in classes},
    }
    write_json(out / "dataset.json", dataset, indent=1)
    stats = build_dataset_root(out, seed=seed)
    stats["missing_videos"] = missing
    return stats
