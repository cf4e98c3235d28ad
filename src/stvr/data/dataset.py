"""Torch datasets of query/reference pairs and their collate function.

* :class:`TrainPairDataset`: one item per training tubelet (as the query),
  sampled as the official ``train_generator`` (reference-facts.md 3.1/3.2):
  query capped to ``query_max_seconds`` by a random window; reference = a
  random tubelet of the same combined label (possibly the query itself) cut to
  ``reference_seconds``; ground truth per reference second = every person
  annotated at that (video, second) among the training tubelets, class
  ``QUERY_MATCH`` (2) when their label equals the query label else
  ``OTHER_PERSON`` (1); independent horizontal flips of query and reference.
  Randomness of item ``i`` comes from ``numpy.random.default_rng([seed, epoch, i])``
  only, so a resumed run reproduces its samples (``set_epoch`` before each epoch).
  Deviation (documented fix): windows are drawn from ALL possible starts
  ``0..len-k`` (the official ``np.random.choice(len-k)`` never picks the last one).
* :class:`EvalPairDataset`: one item per pair of a pair file, full query and full
  reference, every gt box labelled 2, no flips.
* :func:`collate_pairs`: list of :class:`PairSample` -> :class:`stvr.data.batch.PairBatch`.

Frames come from a clip cache with the contract of ``stvr.data.video.ClipCache``:
``frames(video_id, path, start_second, end_second) -> uint8 [(end-start)*fps, S, S, 3]``
RGB. A sample whose video is missing or cannot be decoded is skipped, counted
(``dataset.failures``) and logged as a warning: ``TrainPairDataset`` then uses a
deterministic replacement item, ``EvalPairDataset`` returns ``None`` and
:func:`collate_pairs` drops it (a batch with no sample left collates to ``None``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..config import DataConfig
from .ava import Tubelet
from .batch import OTHER_PERSON, QUERY_MATCH, PairBatch
from .pairs import load_dataset_json, load_pairs, load_tubelets, resolve_video_path
from .video import VideoError, frames_to_clips

__all__ = ["PairSample", "TrainPairDataset", "EvalPairDataset", "collate_pairs", "frames_to_clips", "flip_boxes"]

log = logging.getLogger(__name__)

#: errors that mark one sample as bad (missing/corrupt video) instead of stopping a run
SAMPLE_ERRORS = (OSError, EOFError, VideoError)


@dataclass
class PairSample:
    """One query/reference pair, ready for :func:`collate_pairs`.

    Attributes:
        query_clips: ``[Nq, 3, T, S, S]`` float32 in [-1, 1].
        query_boxes: ``[Nq, 4]`` normalized xyxy (the second's box tiled to its clips).
        reference_clips: ``[Nr, 3, T, S, S]`` float32 in [-1, 1].
        gt_boxes: ``Nr`` tensors ``[n, 4]`` normalized xyxy float32.
        gt_labels: ``Nr`` tensors ``[n]`` int64 in {1, 2}.
        pair_id: index of the item (tubelet index / pair index).
        info: provenance (video ids, seconds, flips) for debugging and tests.
        failures: ``(index, error)`` of the items that failed to load before this
            one replaced them (``TrainPairDataset``); :func:`collate_pairs` puts
            them into the batch, so they are counted in the main process even
            when a DataLoader worker loaded the sample.
        query_keys, reference_keys: ``(video id, second, clip of the second, flipped)``
            of each query / reference clip (:attr:`stvr.data.batch.PairBatch.clip_keys`),
            or None.
    """

    query_clips: Tensor
    query_boxes: Tensor
    reference_clips: Tensor
    gt_boxes: list[Tensor]
    gt_labels: list[Tensor]
    pair_id: int
    info: dict = field(default_factory=dict)
    failures: list[tuple[int, str]] = field(default_factory=list)
    query_keys: list[tuple] | None = None
    reference_keys: list[tuple] | None = None


# ----------------------------------------------------------------------------- helpers


def flip_boxes(boxes: np.ndarray) -> np.ndarray:
    """Horizontal flip of normalized xyxy boxes ``[..., 4]``: ``x1' = 1 - x2``, ``x2' = 1 - x1``."""
    b = np.array(boxes, dtype=np.float64, copy=True)
    b[..., [0, 2]] = 1.0 - b[..., [2, 0]]
    return b


def _runs(seconds: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs ``[(start, end_exclusive), ...]`` of increasing seconds."""
    runs: list[tuple[int, int]] = []
    for s in seconds:
        if runs and s == runs[-1][1]:
            runs[-1] = (runs[-1][0], s + 1)
        else:
            runs.append((s, s + 1))
    return runs


class _VideoSource:
    """Frame loading shared by both datasets (lazy cache; worker-safe pickling)."""

    def _init_source(self, root: Path, dataset: dict, cache: Any, image_size: int, fps: int,
                     clip_frames: int, videos_dir: str | None, cache_dir: str | None) -> None:
        if fps % clip_frames:
            raise ValueError(f"fps ({fps}) must be a multiple of clip_frames ({clip_frames})")
        self.root = root
        self.dataset_info = dataset
        self.image_size = int(image_size)
        self.fps = int(fps)
        self.clip_frames = int(clip_frames)
        self.clips_per_second = self.fps // self.clip_frames
        self.videos_dir = videos_dir
        self.cache_dir = Path(cache_dir) if cache_dir else root / "cache"
        self._cache = cache
        self._own_cache = cache is None
        self.failures: list[tuple[int, str]] = []

    @property
    def cache(self) -> Any:
        """The clip cache (created on first use: ``stvr.data.video.ClipCache``)."""
        if self._cache is None:
            from .video import ClipCache

            self._cache = ClipCache(self.cache_dir, size=self.image_size, fps=self.fps)
        return self._cache

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if state.get("_own_cache"):
            state["_cache"] = None  # re-created lazily in each worker
        return state

    @property
    def num_failures(self) -> int:
        """Number of samples skipped because their video could not be loaded."""
        return len(self.failures)

    def _record_failure(self, index: int, err: BaseException) -> tuple[int, str]:
        """Count and log a failed load in this process's copy of the dataset (a loader
        worker's copy is not the main process's: the returned ``(index, message)`` is
        passed on with the sample or batch for the main process to count)."""
        msg = f"{type(err).__name__}: {err}"
        self.failures.append((int(index), msg))
        log.warning("%s: skipped sample %d (%s); %d skipped so far",
                    type(self).__name__, index, msg, len(self.failures))
        return int(index), msg

    def _frames(self, video_id: str, start: int, end: int) -> np.ndarray:
        path = resolve_video_path(self.root, self.dataset_info, video_id, self.videos_dir)
        frames = np.asarray(self.cache.frames(video_id, path, int(start), int(end)))
        want = ((end - start) * self.fps, self.image_size, self.image_size, 3)
        if frames.shape != want or frames.dtype != np.uint8:
            raise ValueError(
                f"clip cache returned {frames.dtype} {tuple(frames.shape)} for {video_id} "
                f"[{start}, {end}), expected uint8 {want}"
            )
        return frames

    def _seconds_frames(self, video_id: str, seconds: Sequence[int]) -> np.ndarray:
        """Frames of the given (increasing) seconds, run by run."""
        parts = [self._frames(video_id, a, b) for a, b in _runs(seconds)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def _clip_keys(self, video_id: str, seconds: Sequence[int], flip: bool) -> list[tuple]:
        """``(video id, second, clip of the second, flipped)`` of every clip of ``seconds``."""
        return [(video_id, int(s), k, bool(flip)) for s in seconds for k in range(self.clips_per_second)]

    def _clips(self, frames: np.ndarray, flip: bool) -> Tensor:
        if flip:
            frames = frames[:, :, ::-1, :]
        return frames_to_clips(np.ascontiguousarray(frames), clip_frames=self.clip_frames)


# ----------------------------------------------------------------------------- training


class TrainPairDataset(_VideoSource, Dataset):
    """Training pairs: one item per training tubelet of ``<root>/train_tubelets.json``.

    Args:
        root: dataset root (``dataset.json``, ``train_tubelets.json``).
        data_cfg: ``reference_seconds``, ``query_max_seconds``, ``flip_probability``,
            ``fps``, ``videos`` (video folder override), ``cache`` (cache folder).
        image_size: S, the square frame size of the clips.
        seed: base seed; item ``i`` of epoch ``e`` uses ``default_rng([seed, e, i])``.
        cache: a clip cache (``frames(video_id, path, start, end)``); default: a
            ``stvr.data.video.ClipCache`` under ``data_cfg.cache`` or ``<root>/cache``,
            created lazily (also in each DataLoader worker).
        tubelets: use these tubelets instead of reading ``train_tubelets.json``.
        clip_frames: frames per clip (8).
        max_retries: replacement items tried when a sample's video fails to load.
    """

    def __init__(self, root: str | Path, data_cfg: DataConfig | None = None, image_size: int = 320,
                 seed: int = 0, cache: Any = None, tubelets: Sequence[Tubelet] | None = None,
                 clip_frames: int = 8, max_retries: int = 5):
        root = Path(root)
        cfg = data_cfg if data_cfg is not None else DataConfig(root=str(root))
        self.cfg = cfg
        self.seed = int(seed)
        self.epoch = 0
        self.max_retries = int(max_retries)
        self._init_source(root, load_dataset_json(root), cache, image_size, cfg.fps, clip_frames,
                          cfg.videos, cfg.cache)
        self.tubelets = list(tubelets) if tubelets is not None else load_tubelets(root / "train_tubelets.json")
        if not self.tubelets:
            raise ValueError(f"{root / 'train_tubelets.json'}: no training tubelets")
        if cfg.reference_seconds < 1 or cfg.query_max_seconds < 1:
            raise ValueError("reference_seconds and query_max_seconds must be >= 1")
        by_label: dict[tuple[int, ...], list[int]] = {}
        people: dict[tuple[str, int], list[tuple[int, tuple[int, ...], np.ndarray]]] = {}
        for k, t in enumerate(self.tubelets):
            by_label.setdefault(t.label, []).append(k)
            for s, b in zip(t.seconds, t.boxes):
                people.setdefault((t.video_id, s), []).append((t.person_id, t.label, b))
        self.by_label = {lab: np.asarray(ix, dtype=np.int64) for lab, ix in by_label.items()}
        # per tubelet: an integer id of its (video, person), for references from another actor
        actor_ids: dict[tuple[str, int], int] = {}
        self._actor_key = np.array([actor_ids.setdefault((t.video_id, t.person_id), len(actor_ids))
                                    for t in self.tubelets], dtype=np.int64)
        # (video, second) -> (labels list, boxes [n, 4]) of all annotated persons, person order
        self.people: dict[tuple[str, int], tuple[list[tuple[int, ...]], np.ndarray]] = {}
        for key, entries in people.items():
            entries.sort(key=lambda e: e[0])
            self.people[key] = ([e[1] for e in entries], np.stack([e[2] for e in entries]))

    def __len__(self) -> int:
        return len(self.tubelets)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws ``__getitem__`` uses."""
        self.epoch = int(epoch)

    def _rng(self, i: int, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, int(i), *extra])

    def sample_spec(self, i: int) -> dict:
        """The random choices of item ``i`` (no video access): query and reference
        seconds/boxes, ground truth per reference second and the two flips.

        Boxes here are before flipping; ``gt_labels`` use 2 = same label as the query.
        """
        rng = self._rng(i)
        q = self.tubelets[i]
        qmax, rmax = self.cfg.query_max_seconds, self.cfg.reference_seconds
        qs = int(rng.integers(0, len(q) - qmax + 1)) if len(q) > qmax else 0
        qn = min(len(q), qmax)
        cands = self.by_label[q.label]
        if self.cfg.reference_other_actor:   # another person's tubelet when the label has one
            others = cands[self._actor_key[cands] != self._actor_key[i]]
            cands = others if len(others) else cands
        r_index = int(cands[rng.integers(len(cands))])
        r = self.tubelets[r_index]
        rs = int(rng.integers(0, len(r) - rmax + 1)) if len(r) > rmax else 0
        rn = min(len(r), rmax)
        flip_q = bool(rng.random() < self.cfg.flip_probability)
        flip_r = bool(rng.random() < self.cfg.flip_probability)
        ref_seconds = r.seconds[rs : rs + rn]
        gt_boxes, gt_labels = [], []
        for s in ref_seconds:
            labels, boxes = self.people[(r.video_id, s)]
            gt_boxes.append(boxes.copy())
            gt_labels.append(np.array([QUERY_MATCH if lab == q.label else OTHER_PERSON for lab in labels], dtype=np.int64))
        return {
            "query_index": i,
            "query_video": q.video_id,
            "query_seconds": q.seconds[qs : qs + qn],
            "query_boxes": q.boxes[qs : qs + qn].copy(),
            "label": q.label,
            "reference_index": r_index,
            "reference_video": r.video_id,
            "reference_seconds": ref_seconds,
            "gt_boxes": gt_boxes,
            "gt_labels": gt_labels,
            "flip_query": flip_q,
            "flip_reference": flip_r,
        }

    def _load(self, i: int) -> PairSample:
        spec = self.sample_spec(i)
        c = self.clips_per_second
        q_frames = self._seconds_frames(spec["query_video"], spec["query_seconds"])
        r_frames = self._seconds_frames(spec["reference_video"], spec["reference_seconds"])
        q_boxes = flip_boxes(spec["query_boxes"]) if spec["flip_query"] else spec["query_boxes"]
        gt = [flip_boxes(b) if spec["flip_reference"] else b for b in spec["gt_boxes"]]
        return PairSample(
            query_clips=self._clips(q_frames, spec["flip_query"]),
            query_boxes=torch.from_numpy(np.repeat(q_boxes, c, axis=0)).float(),
            reference_clips=self._clips(r_frames, spec["flip_reference"]),
            gt_boxes=[torch.from_numpy(b).float().reshape(-1, 4) for b in gt for _ in range(c)],
            gt_labels=[torch.from_numpy(lab) for lab in spec["gt_labels"] for _ in range(c)],
            pair_id=int(i),
            info={k: spec[k] for k in ("query_video", "query_seconds", "reference_video",
                                       "reference_seconds", "label", "flip_query", "flip_reference")},
            query_keys=self._clip_keys(spec["query_video"], spec["query_seconds"], spec["flip_query"]),
            reference_keys=self._clip_keys(spec["reference_video"], spec["reference_seconds"],
                                           spec["flip_reference"]),
        )

    def __getitem__(self, i: int) -> PairSample:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} training tubelets")
        retry = self._rng(i, 1)
        j = i
        failed: list[tuple[int, str]] = []
        for _ in range(self.max_retries + 1):
            try:
                sample = self._load(j)
            except SAMPLE_ERRORS as err:
                failed.append(self._record_failure(j, err))
                j = int(retry.integers(len(self)))
            else:
                sample.failures = failed
                return sample
        raise RuntimeError(
            f"TrainPairDataset: {self.max_retries + 1} samples in a row failed to load "
            f"(last: {self.failures[-1][1]}); check the videos of {self.root}"
        )


# ----------------------------------------------------------------------------- evaluation


def _find_root(pairs_path: Path) -> Path:
    for cand in (pairs_path.parent, pairs_path.parent.parent):
        if (cand / "dataset.json").is_file():
            return cand
    raise FileNotFoundError(
        f"no dataset.json next to {pairs_path} or in its parent folder; pass the dataset root "
        f"or a pair file inside <root>/pairs/"
    )


class EvalPairDataset(_VideoSource, Dataset):
    """Evaluation pairs: one item per pair, full query and full reference, no flips.

    Args:
        root_or_pairs_path: a dataset root (reads ``pairs/<split>.json``) or a pair
            file inside a root (``dataset.json`` next to it or one folder up).
        split: pair split of the root.
        image_size: S.
        cache: clip cache (default: lazily created ``ClipCache`` under ``<root>/cache``).
        data_cfg: optional, for ``fps``, ``videos`` and ``cache`` folders.
        box_order: ``"yxyx"`` to read an official STVR pair file.

    Attributes:
        pairs: the validated pairs (object form, xyxy), as for ``stvr.evaluation.frame_map``.
    """

    def __init__(self, root_or_pairs_path: str | Path, split: str = "test", image_size: int = 320,
                 cache: Any = None, data_cfg: DataConfig | None = None, box_order: str = "xyxy",
                 clip_frames: int = 8, pairs: Sequence[dict] | None = None):
        src = Path(root_or_pairs_path)
        if src.is_dir():
            root, pairs_path = src, src / "pairs" / f"{split}.json"
        else:
            root, pairs_path = _find_root(src), src
        cfg = data_cfg if data_cfg is not None else DataConfig(root=str(root))
        self.split = split
        self.pairs_path = pairs_path
        self._init_source(root, load_dataset_json(root), cache, image_size, cfg.fps, clip_frames,
                          cfg.videos, cfg.cache)
        self.pairs = list(pairs) if pairs is not None else load_pairs(pairs_path, box_order=box_order)

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, i: int) -> PairSample:
        pair = self.pairs[i]
        q, r = pair["query"], pair["reference"]
        c = self.clips_per_second
        q_frames = self._seconds_frames(q["id"], q["frames"])
        r_frames = self._frames(r["id"], r["start"], r["end"])
        qb = np.asarray(q["boxes"], dtype=np.float32).reshape(-1, 4)
        gt_boxes, gt_labels = [], []
        for boxes in r["gt"]:
            b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            lab = torch.full((b.shape[0],), QUERY_MATCH, dtype=torch.int64)
            for _ in range(c):
                gt_boxes.append(b)
                gt_labels.append(lab)
        return PairSample(
            query_clips=self._clips(q_frames, False),
            query_boxes=torch.from_numpy(np.repeat(qb, c, axis=0)),
            reference_clips=self._clips(r_frames, False),
            gt_boxes=gt_boxes,
            gt_labels=gt_labels,
            pair_id=int(i),
            info={"query_video": q["id"], "reference_video": r["id"], "label": tuple(q["label"])},
            query_keys=self._clip_keys(q["id"], q["frames"], False),
            reference_keys=self._clip_keys(r["id"], range(int(r["start"]), int(r["end"])), False),
        )

    def __getitem__(self, i: int) -> PairSample | None:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} pairs")
        try:
            return self._load(i)
        except SAMPLE_ERRORS as err:
            self._record_failure(i, err)
            return None


# ----------------------------------------------------------------------------- collate


def collate_pairs(samples: Sequence[PairSample | None], loss_clips: int | None = None) -> PairBatch | None:
    """Stack samples into a :class:`PairBatch`.

    Query clips of all samples are concatenated (``query_index`` = position of
    the sample in the batch); references are zero-padded at the end to the
    longest one with ``reference_mask``; padded clips get empty ground truth.
    ``None`` samples (failed loads) are dropped with a warning; returns ``None``
    when no sample is left. ``PairBatch.failures`` lists the failures of the
    batch: those carried by the samples (replaced items) and one ``(-1, ...)``
    per dropped ``None``.
    """
    kept = [s for s in samples if s is not None]
    if len(kept) < len(samples):
        log.warning("collate_pairs: dropped %d failed sample(s) of %d", len(samples) - len(kept), len(samples))
    if not kept:
        return None
    query_clips = torch.cat([s.query_clips for s in kept], dim=0)
    query_boxes = torch.cat([s.query_boxes for s in kept], dim=0).float()
    query_index = torch.repeat_interleave(
        torch.arange(len(kept), dtype=torch.int64),
        torch.tensor([s.query_clips.shape[0] for s in kept], dtype=torch.int64),
    )
    lengths = [s.reference_clips.shape[0] for s in kept]
    L = max(lengths)
    shape = kept[0].reference_clips.shape[1:]
    reference_clips = torch.zeros((len(kept), L, *shape), dtype=kept[0].reference_clips.dtype)
    reference_mask = torch.zeros((len(kept), L), dtype=torch.bool)
    gt_boxes: list[list[Tensor]] = []
    gt_labels: list[list[Tensor]] = []
    for b, s in enumerate(kept):
        n = lengths[b]
        reference_clips[b, :n] = s.reference_clips
        reference_mask[b, :n] = True
        if len(s.gt_boxes) != n or len(s.gt_labels) != n:
            raise ValueError(f"sample {s.pair_id}: {n} reference clips but {len(s.gt_boxes)} gt entries")
        pad = L - n
        gt_boxes.append(list(s.gt_boxes) + [torch.zeros((0, 4), dtype=torch.float32) for _ in range(pad)])
        gt_labels.append(list(s.gt_labels) + [torch.zeros((0,), dtype=torch.int64) for _ in range(pad)])
    keyed = all(s.query_keys is not None and s.reference_keys is not None for s in kept)
    clip_keys = ([k for s in kept for k in s.query_keys] + [k for s in kept for k in s.reference_keys]
                 if keyed else None)
    return PairBatch(
        query_clips=query_clips,
        query_boxes=query_boxes,
        query_index=query_index,
        reference_clips=reference_clips,
        reference_mask=reference_mask,
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        pair_ids=[int(s.pair_id) for s in kept],
        loss_clips=loss_clips,
        failures=[f for s in kept for f in s.failures]
        + [(-1, "the sample could not be loaded")] * (len(samples) - len(kept)),
        clip_keys=clip_keys,
    )
