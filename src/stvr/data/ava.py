"""AVA annotations: CSV reading, tubelet linking, the official label split and
the STVR reorganization into training tubelets and evaluation pairs.

Follows the official ``gen_subsets.py`` of STVR (reference-facts.md section 1):

* one CSV row = one (person box, action) of a keyframe; rows of the same
  (video, second, person) must carry the same box;
* the *combined label* of a person at a second is the sorted tuple of its action
  ids; a :class:`Tubelet` is a maximal run of consecutive seconds of one person
  with one combined label (:func:`link_tubelets`);
* 54 combined labels (27 val + 27 test, :func:`load_label_split`) are held out;
  :func:`training_tubelets` removes them and every (video, second) they touch;
  :func:`evaluation_pairs` turns every tubelet of the held-out labels into one
  query/reference pair.

Boxes are normalized ``[x1, y1, x2, y2]`` in [0, 1] everywhere (AVA order);
seconds are integer keyframe times (second ``t`` = frames in ``[t, t+1)`` s).
"""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import numpy as np

__all__ = [
    "AVA_TIME_RANGE",
    "AvaRow",
    "Tubelet",
    "read_annotations",
    "write_annotations",
    "link_tubelets",
    "label_key",
    "parse_label_key",
    "load_label_split",
    "load_label_map",
    "label_name",
    "training_tubelets",
    "evaluation_pairs",
]

#: AVA annotates keyframes 902..1798 of the 15-minute segment [900, 1800) s.
AVA_TIME_RANGE: tuple[int, int] = (900, 1800)

_VIDEO_ID = re.compile(r"^[A-Za-z0-9_\-]+$")
_BOX_TOL = 1e-9  # two rows of the same person box must agree to this tolerance


@dataclass(frozen=True)
class AvaRow:
    """One CSV row: a person box with one action at one keyframe.

    ``box`` is normalized ``(x1, y1, x2, y2)``; ``line`` is the 1-based line of
    the row in its file (0 when the row was built in code).
    """

    video_id: str
    second: int
    box: tuple[float, float, float, float]
    action_id: int
    person_id: int
    line: int = field(default=0, compare=False)


@dataclass
class Tubelet:
    """Consecutive seconds of one person with one combined label.

    Attributes:
        video_id: the video.
        person_id: the person id (unique within the video).
        label: sorted tuple of action ids (the combined label).
        seconds: consecutive increasing integer seconds, length n.
        boxes: ``[n, 4]`` float64 normalized ``x1, y1, x2, y2``, one per second.
    """

    video_id: str
    person_id: int
    label: tuple[int, ...]
    seconds: list[int]
    boxes: np.ndarray

    def __post_init__(self) -> None:
        self.label = tuple(sorted(int(a) for a in self.label))
        self.seconds = [int(s) for s in self.seconds]
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        if len(self.seconds) != len(self.boxes):
            raise ValueError(
                f"tubelet {self.video_id}/{self.person_id}: {len(self.seconds)} seconds "
                f"but {len(self.boxes)} boxes"
            )

    def __len__(self) -> int:
        return len(self.seconds)

    @property
    def key(self) -> tuple[str, int, int]:
        """Sort key ``(video_id, person_id, first second)``."""
        return (self.video_id, self.person_id, self.seconds[0] if self.seconds else -1)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tubelet):
            return NotImplemented
        return (
            self.video_id == other.video_id
            and self.person_id == other.person_id
            and self.label == other.label
            and self.seconds == other.seconds
            and self.boxes.shape == other.boxes.shape
            and bool(np.allclose(self.boxes, other.boxes, rtol=0, atol=1e-9))
        )

    def to_json(self) -> dict:
        """The dataset-root JSON form ``{"id", "person", "label", "seconds", "boxes"}``."""
        return {
            "id": self.video_id,
            "person": self.person_id,
            "label": list(self.label),
            "seconds": list(self.seconds),
            "boxes": [[float(v) for v in b] for b in self.boxes],
        }


# ----------------------------------------------------------------------------- labels


def label_key(label: Iterable[int]) -> str:
    """Dictionary key of a combined label: ``(11, 74, 80) -> "11+74+80"``."""
    return "+".join(str(int(a)) for a in sorted(int(a) for a in label))


def parse_label_key(key: str) -> tuple[int, ...]:
    """Inverse of :func:`label_key`."""
    return tuple(sorted(int(a) for a in key.split("+")))


def _as_label(label: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted(int(a) for a in label))


# ----------------------------------------------------------------------------- CSV


def _parse_row(fields: list[str]) -> tuple[AvaRow | None, str | None]:
    """Parse the fields of one CSV line into an :class:`AvaRow` or an error text."""
    if len(fields) != 8:
        return None, f"expected 8 comma-separated columns, got {len(fields)}"
    vid = fields[0].strip()
    if not vid or not _VIDEO_ID.match(vid):
        return None, f"bad video id {fields[0]!r} (expected a YouTube-style id of letters, digits, '-', '_')"
    try:
        second = int(fields[1].strip())
    except ValueError:
        return None, f"timestamp {fields[1]!r} is not an integer number of seconds"
    box = []
    for name, text in zip(("x1", "y1", "x2", "y2"), fields[2:6]):
        try:
            v = float(text)
        except ValueError:
            return None, f"{name} {text!r} is not a number"
        if not math.isfinite(v) or v < 0.0 or v > 1.0:
            return None, f"{name} {text!r} is not in [0, 1]"
        box.append(v)
    if box[0] > box[2] or box[1] > box[3]:
        return None, f"box {tuple(fields[2:6])} has x1 > x2 or y1 > y2"
    try:
        action = int(fields[6].strip())
    except ValueError:
        return None, f"action id {fields[6]!r} is not an integer"
    try:
        person = int(fields[7].strip())
    except ValueError:
        return None, f"person id {fields[7]!r} is not an integer"
    return AvaRow(vid, second, (box[0], box[1], box[2], box[3]), action, person), None


def read_annotations(csv_path: str | Path, strict: bool = True) -> list[AvaRow]:
    """Read and validate an AVA CSV (8 columns, no header).

    Every row is checked: 8 columns, a non-empty id of letters/digits/``-``/``_``
    (YouTube ids have 11 characters; other lengths are accepted for synthetic
    data), an integer timestamp, 4 floats in [0, 1] with ``x1 <= x2`` and
    ``y1 <= y2``, an integer action id and an integer person id. Blank lines are
    skipped. Rows of the same (video, second, person) must repeat the same box
    (one row per action); a row whose box disagrees with the first row of its
    person box is malformed.

    Args:
        csv_path: the CSV file.
        strict: ``True`` raises ``ValueError`` (``"<file>:<line>: <problem>"``) at the
            first malformed row; ``False`` skips malformed rows, emits one
            ``UserWarning`` with their count and line numbers, and keeps every
            well-formed row.

    Returns:
        The rows in file order (``AvaRow.line`` = 1-based line number).
    """
    path = Path(csv_path)
    rows: list[AvaRow] = []
    bad: list[tuple[int, str]] = []
    first_box: dict[tuple[str, int, int], tuple[tuple[float, ...], int]] = {}
    try:
        return _read_rows(path, strict, rows, bad, first_box)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}:{_first_undecodable_line(path)}: not UTF-8 text ({err.reason}); "
                         f"AVA CSVs are UTF-8 (or ASCII)") from None


def _first_undecodable_line(path: Path) -> int:
    """1-based number of the first line of ``path`` that is not valid UTF-8."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return 1


def _read_rows(path: Path, strict: bool, rows: list, bad: list, first_box: dict) -> list[AvaRow]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        for lineno, fields in enumerate(csv.reader(f), start=1):
            if not fields or all(not x.strip() for x in fields):
                continue
            row, err = _parse_row(fields)
            if row is not None:
                key = (row.video_id, row.second, row.person_id)
                seen = first_box.get(key)
                if seen is None:
                    first_box[key] = (row.box, lineno)
                elif max(abs(a - b) for a, b in zip(seen[0], row.box)) > _BOX_TOL:
                    row, err = None, (
                        f"box {row.box} of person {row.person_id} at {row.video_id} "
                        f"second {row.second} differs from the box {seen[0]} on line {seen[1]}"
                    )
            if row is None:
                if strict:
                    raise ValueError(f"{path}:{lineno}: malformed AVA row: {err}")
                bad.append((lineno, err or ""))
                continue
            rows.append(AvaRow(row.video_id, row.second, row.box, row.action_id, row.person_id, lineno))
    if bad:
        lines = ", ".join(str(n) for n, _ in bad[:50]) + (", ..." if len(bad) > 50 else "")
        warnings.warn(
            f"{path}: skipped {len(bad)} malformed row(s) on line(s) {lines} "
            f"(first problem: {bad[0][1]})",
            UserWarning,
            stacklevel=3,
        )
    return rows


def _fmt_coord(v: float) -> str:
    """``0.5 -> "0.500"``, ``0.1234 -> "0.1234"``: at least 3, at most 6 decimals."""
    text = f"{float(v):.6f}"
    while text.endswith("0") and len(text.split(".")[1]) > 3:
        text = text[:-1]
    return text


def write_annotations(rows: Iterable[AvaRow], csv_path: str | Path) -> None:
    """Write rows as an AVA CSV (4-digit timestamps, 3-decimal boxes, LF endings).

    Box values are written with up to 6 decimals (AVA uses 3; more keeps
    synthetic/UCF boxes exact enough) so that reading the file back gives the
    same rows up to 5e-7.
    """
    from ..utils import atomic_open

    with atomic_open(csv_path, "wb") as f:          # an older file stays whole until this one is
        for r in rows:
            box = ",".join(_fmt_coord(v) for v in r.box)
            f.write(f"{r.video_id},{r.second:04d},{box},{r.action_id},{r.person_id}\n".encode())


# ----------------------------------------------------------------------------- tubelets


def _person_seconds(rows: Iterable[AvaRow]) -> dict[tuple[str, int], dict[int, tuple[set, tuple]]]:
    """Group rows: (video, person) -> second -> (action set, box); checks box consistency."""
    people: dict[tuple[str, int], dict[int, tuple[set, tuple]]] = {}
    for r in rows:
        per = people.setdefault((r.video_id, r.person_id), {})
        entry = per.get(r.second)
        if entry is None:
            per[r.second] = ({int(r.action_id)}, tuple(float(v) for v in r.box))
        else:
            if max(abs(a - b) for a, b in zip(entry[1], r.box)) > _BOX_TOL:
                where = f" (line {r.line})" if r.line else ""
                raise ValueError(
                    f"person {r.person_id} of {r.video_id} at second {r.second} has two different "
                    f"boxes {entry[1]} and {tuple(r.box)}{where}"
                )
            entry[0].add(int(r.action_id))
    return people


def link_tubelets(rows: Iterable[AvaRow]) -> list[Tubelet]:
    """Link the annotated seconds of each person into tubelets.

    Two annotated seconds of the same (video, person) are linked when they are
    consecutive integers and carry exactly the same combined label (sorted tuple
    of the person's action ids at that second). Repeated rows of the same
    action are counted once. Raises ``ValueError`` when one person has two
    different boxes at one second.

    Returns:
        Tubelets sorted by ``(video_id, person_id, seconds[0])``.
    """
    out: list[Tubelet] = []
    for (vid, pid), per in _person_seconds(rows).items():
        secs = sorted(per)
        run: list[int] = []
        run_label: tuple[int, ...] | None = None
        for s in secs:
            lab = tuple(sorted(per[s][0]))
            if run and (s != run[-1] + 1 or lab != run_label):
                out.append(Tubelet(vid, pid, run_label, run, np.array([per[t][1] for t in run])))
                run = []
            run.append(s)
            run_label = lab
        if run:
            out.append(Tubelet(vid, pid, run_label, run, np.array([per[t][1] for t in run])))
    out.sort(key=lambda t: t.key)
    return out


def _tubelets_of(rows_or_tubelets: Sequence[AvaRow] | Sequence[Tubelet]) -> list[Tubelet]:
    items = list(rows_or_tubelets)
    if items and isinstance(items[0], Tubelet):
        return sorted(items, key=lambda t: t.key)
    return link_tubelets(items)


# ----------------------------------------------------------------------------- split + label map


def _parse_split_obj(obj, source: str) -> dict[str, list[tuple[int, ...]]]:
    """``{"val": [...], "test": [...]}`` or the official ``[test, val]`` list form."""
    if isinstance(obj, Mapping):
        missing = {"val", "test"} - set(obj)
        if missing:
            raise ValueError(f"{source}: label split lacks key(s) {sorted(missing)}")
        test, val = obj["test"], obj["val"]
    elif isinstance(obj, list) and len(obj) == 2:
        test, val = obj  # the official data/val_test.json stores test first
    else:
        raise ValueError(f"{source}: expected {{'val': [...], 'test': [...]}} or the official [test, val] lists")
    out = {}
    for name, labels in (("val", val), ("test", test)):
        if not isinstance(labels, list):
            raise ValueError(f"{source}: '{name}' must be a list of labels")
        conv = []
        for i, lab in enumerate(labels):
            if not isinstance(lab, (list, tuple)) or not lab or not all(isinstance(a, int) for a in lab):
                raise ValueError(f"{source}: {name} label {i} ({lab!r}) is not a non-empty list of ints")
            conv.append(_as_label(lab))
        out[name] = conv
    overlap = set(out["val"]) & set(out["test"])
    if overlap:
        raise ValueError(f"{source}: labels in both val and test: {sorted(overlap)}")
    return out


def load_label_split(path: str | Path | None = None) -> dict[str, list[tuple[int, ...]]]:
    """The held-out combined labels: ``{"val": [27 labels], "test": [27 labels]}``.

    ``path=None`` reads the packaged ``label_split.json`` (the official STVR
    ``data/val_test.json`` verbatim, reference-facts.md 1.4). A file may be in the
    project form ``{"val": [[ids..], ..], "test": [...]}`` or the official form,
    a list ``[test, val]`` (test first). Labels are returned as sorted tuples in
    file order.
    """
    if path is None:
        text = resources.files("stvr.data").joinpath("label_split.json").read_text()
        return _parse_split_obj(json.loads(text), "stvr/data/label_split.json")
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    return _parse_split_obj(obj, str(path))


def load_label_map(path: str | Path | None = None) -> dict[int, str]:
    """Action id -> name from an AVA label-map ``.pbtxt`` (``item { name: "..." id: N }``).

    ``path=None`` reads the packaged copy ``ava_action_list_v2.1.pbtxt`` (60
    evaluated AVA classes; see the README next to it for its license).
    """
    if path is None:
        text = resources.files("stvr.data").joinpath("ava_action_list_v2.1.pbtxt").read_text()
    else:
        text = Path(path).read_text()
    out: dict[int, str] = {}
    for m in re.finditer(r"item\s*\{(.*?)\}", text, flags=re.S):
        body = m.group(1)
        name = re.search(r'name:\s*"([^"]*)"', body)
        ident = re.search(r"\bid:\s*(\d+)", body)
        if name and ident:
            out[int(ident.group(1))] = name.group(1)
    return out


def label_name(label: Iterable[int], label_map: Mapping[int, str] | None = None) -> str:
    """Readable combined label, e.g. ``"walk+talk to (e.g., self, a person, a group)"``.

    Ids missing from ``label_map`` are written as ``#<id>``.
    """
    if label_map is None:
        return label_key(label)
    return "+".join(label_map.get(int(a), f"#{int(a)}") for a in _as_label(label))


# ----------------------------------------------------------------------------- reorganization


def training_tubelets(
    rows: Sequence[AvaRow] | Sequence[Tubelet], held_out_labels: Iterable[Iterable[int]]
) -> list[Tubelet]:
    """Training tubelets after removing the held-out labels (reference-facts.md 1.5).

    1. ``rm`` = every (video, second) covered by any tubelet (of any person)
       whose combined label is held out;
    2. tubelets of held-out labels are dropped;
    3. every other tubelet is cut at the seconds in ``rm`` (the second is removed
       and the tubelet split into the pieces before and after; empty pieces
       dropped).

    Args:
        rows: CSV rows (linked with :func:`link_tubelets`) or tubelets.
        held_out_labels: the val + test combined labels.

    Returns:
        Tubelets sorted by ``(video_id, person_id, seconds[0])``; no returned
        second of a video is annotated with a held-out label for any person.
    """
    held = {_as_label(lab) for lab in held_out_labels}
    tubes = _tubelets_of(rows)
    rm = {(t.video_id, s) for t in tubes if t.label in held for s in t.seconds}
    out: list[Tubelet] = []
    for t in tubes:
        if t.label in held:
            continue
        keep = np.array([(t.video_id, s) not in rm for s in t.seconds], dtype=bool)
        if keep.all():
            out.append(t)
            continue
        start = None
        for i, k in enumerate(list(keep) + [False]):
            if k and start is None:
                start = i
            elif not k and start is not None:
                out.append(Tubelet(t.video_id, t.person_id, t.label, t.seconds[start:i], t.boxes[start:i].copy()))
                start = None
    out.sort(key=lambda t: t.key)
    return out


TimeRanges = Union[Mapping[str, Sequence[int]], Sequence[int], None]


def _range_of(time_ranges: TimeRanges, video_id: str) -> tuple[int, int]:
    if time_ranges is None:
        return AVA_TIME_RANGE
    if isinstance(time_ranges, Mapping):
        if video_id not in time_ranges:
            raise ValueError(f"no time range for video {video_id!r}")
        lo, hi = time_ranges[video_id]
    else:
        lo, hi = time_ranges
    return int(lo), int(hi)


def _label_rng(seed: int, label: tuple[int, ...]) -> np.random.Generator:
    """A generator that depends only on (seed, label), never on iteration order."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, len(label), *label])


def evaluation_pairs(
    rows: Sequence[AvaRow] | Sequence[Tubelet],
    labels: Iterable[Iterable[int]],
    time_ranges: TimeRanges = None,
    seed: int = 0,
    pad_below_seconds: int = 10,
    single: str = "self",
) -> list[dict]:
    """One query/reference pair per tubelet of ``labels`` (reference-facts.md 1.6).

    For every tubelet of a label (the query, in full length):

    * reference = *another* tubelet of the same label, drawn uniformly with a
      generator seeded by ``(seed, label)``; when the label has a single
      tubelet, ``single="self"`` (default, the official behaviour) pairs the
      tubelet with itself and ``single="skip"`` makes no pair for it. (The
      official code draws from all tubelets incl. the query itself; the paper
      says "another tubelet", which we follow whenever possible.)
    * span: with ``n`` = reference length, ``[first - n, last + n + 1)`` when
      ``n < pad_below_seconds`` (context on both sides), else ``[first, last + 1)``;
      always clipped to the video's annotated range ``[lo, hi)``.
    * gt: for each second of the span, the boxes of ALL persons carrying exactly
      this label at that second in the reference video (sorted by person id),
      possibly empty.

    Args:
        rows: CSV rows or tubelets (of the evaluation videos).
        labels: the combined labels to pair (e.g. the 27 test labels).
        time_ranges: ``{video_id: (lo, hi)}``, one ``(lo, hi)`` for all videos, or
            ``None`` for AVA's ``[900, 1800)``.
        seed: the pairs are a function of (tubelets, labels, ranges, seed) only.

    Returns:
        Pairs in the API.md section 3 object form, grouped by label (labels in
        sorted order), queries in tubelet order within a label.
    """
    if single not in ("self", "skip"):
        raise ValueError(f"single must be 'self' or 'skip', got {single!r}")
    wanted = sorted({_as_label(lab) for lab in labels})
    tubes = _tubelets_of(rows)
    by_label: dict[tuple[int, ...], list[Tubelet]] = {}
    for t in tubes:
        by_label.setdefault(t.label, []).append(t)
    pairs: list[dict] = []
    for label in wanted:
        group = by_label.get(label, [])
        if not group:
            continue
        # (video, second) -> [(person, box)] for this label, person order
        gt_index: dict[tuple[str, int], list[tuple[int, list[float]]]] = {}
        for t in group:
            for s, b in zip(t.seconds, t.boxes):
                gt_index.setdefault((t.video_id, s), []).append((t.person_id, [float(v) for v in b]))
        for v in gt_index.values():
            v.sort(key=lambda pb: pb[0])
        rng = _label_rng(seed, label)
        n = len(group)
        for qi, q in enumerate(group):
            if n == 1:
                if single == "skip":
                    continue
                ri = qi
            else:
                ri = int(rng.integers(n - 1))
                if ri >= qi:
                    ri += 1
            ref = group[ri]
            lo, hi = _range_of(time_ranges, ref.video_id)
            first, last, length = ref.seconds[0], ref.seconds[-1], len(ref)
            if first < lo or last >= hi:
                raise ValueError(
                    f"tubelet of person {ref.person_id} in {ref.video_id} (seconds {first}..{last}) "
                    f"lies outside the video's annotated range [{lo}, {hi})"
                )
            if length < pad_below_seconds:
                start, end = max(first - length, lo), min(last + length + 1, hi)
            else:
                start, end = first, last + 1
            gt = [[b for _, b in gt_index.get((ref.video_id, s), [])] for s in range(start, end)]
            pairs.append(
                {
                    "query": {
                        "id": q.video_id,
                        "frames": list(q.seconds),
                        "boxes": [[float(v) for v in b] for b in q.boxes],
                        "label": list(label),
                    },
                    "reference": {"id": ref.video_id, "start": int(start), "end": int(end), "gt": gt},
                }
            )
    return pairs
