"""Actor clips: every annotated person of a dataset root as a (clip, box, action set) sample.

This is what backbone pretraining (:mod:`stvr.pretrain`, the analogue of the
paper's Kinetics pretraining) and the atom probe (``benchmarks/bench_atoms.py``)
learn from. A sample is one 8-frame clip of one annotated second of one
person: the clip, the person's box at that second and a multi-hot vector of the
person's action ids at that second. Only the annotations of the requested
videos are read (``train`` videos for pretraining: held-out combined labels of
validation videos stay unseen).

Works on any dataset root (AVA, UCF-101-24, synthetic): ``dataset.json``
names the videos of each split, ``annotations/<split>.csv`` holds AVA rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .ava import read_annotations
from .pairs import load_dataset_json, resolve_video_path
from .video import frames_to_clips

__all__ = ["ActorIndex", "actor_index", "ActorClipDataset"]


@dataclass
class ActorIndex:
    """Every annotated (video, second, person) of one split, as flat arrays.

    Attributes:
        video_ids: ``[N]`` video id of each entry.
        seconds: ``int64 [N]`` annotated second.
        person_ids: ``int64 [N]``.
        boxes: ``float32 [N, 4]`` normalized ``x1, y1, x2, y2``.
        targets: ``float32 [N, A]`` multi-hot over ``action_ids``.
        action_ids: ``[A]`` the action ids, sorted (the columns of ``targets``).
    """

    video_ids: list[str]
    seconds: np.ndarray
    person_ids: np.ndarray
    boxes: np.ndarray
    targets: np.ndarray
    action_ids: list[int]

    def __len__(self) -> int:
        return len(self.video_ids)


def actor_index(root: str | Path, split: str = "train", action_ids: Sequence[int] | None = None) -> ActorIndex:
    """Read ``<root>/annotations/<split>.csv`` into an :class:`ActorIndex`.

    Args:
        root: dataset root.
        split: ``"train"`` or ``"val"`` (the annotation file's name).
        action_ids: the columns of the targets (default: every action id of the file,
            sorted). Actions outside this list are ignored.
    """
    path = Path(root) / "annotations" / f"{split}.csv"
    rows = read_annotations(path)
    if not rows:
        raise ValueError(f"{path}: no annotation rows")
    ids = sorted({r.action_id for r in rows}) if action_ids is None else sorted(int(a) for a in action_ids)
    col = {a: k for k, a in enumerate(ids)}
    entries: dict[tuple[str, int, int], int] = {}
    boxes, targets = [], []
    for r in rows:
        key = (r.video_id, r.second, r.person_id)
        k = entries.get(key)
        if k is None:
            k = entries[key] = len(boxes)
            boxes.append(r.box)
            targets.append(np.zeros(len(ids), dtype=np.float32))
        if r.action_id in col:
            targets[k][col[r.action_id]] = 1.0
    keys = list(entries)
    return ActorIndex(
        video_ids=[k[0] for k in keys],
        seconds=np.array([k[1] for k in keys], dtype=np.int64),
        person_ids=np.array([k[2] for k in keys], dtype=np.int64),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        targets=np.stack(targets) if targets else np.zeros((0, len(ids)), np.float32),
        action_ids=ids,
    )


class ActorClipDataset(Dataset):
    """Item ``i`` = clip ``i % clips_per_second`` of entry ``i // clips_per_second``.

    Returns ``(clip float32 [3, T, S, S] in [-1, 1], box float32 [4], target float32 [A])``.
    With ``flip=True`` a deterministic half of the items (by ``seed``, the epoch and
    the index) is mirrored left-right, box included.

    Frames come from a ``stvr.data.video.ClipCache`` under ``<root>/cache``
    (created lazily, also in DataLoader workers); the first second of an entry's
    clip is ``seconds[k]`` and its frames are ``[second * fps, (second + 1) * fps)``.
    """

    def __init__(self, root: str | Path, index: ActorIndex, image_size: int, fps: int = 24,
                 clip_frames: int = 8, flip: bool = False, seed: int = 0, cache_dir: str | Path | None = None):
        self.root = Path(root)
        self.info = load_dataset_json(self.root)
        self.index = index
        self.image_size = int(image_size)
        self.fps = int(fps)
        self.clip_frames = int(clip_frames)
        self.per_second = self.fps // self.clip_frames
        self.flip = bool(flip)
        self.seed = int(seed)
        self.epoch = 0
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / "cache"
        self._cache = None

    def __len__(self) -> int:
        return len(self.index) * self.per_second

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    @property
    def cache(self):
        if self._cache is None:
            from .video import ClipCache

            self._cache = ClipCache(self.cache_dir, size=self.image_size, fps=self.fps)
        return self._cache

    def frames(self, i: int) -> np.ndarray:
        """``uint8 [T, S, S, 3]`` frames of item ``i`` (unflipped)."""
        k, j = divmod(int(i), self.per_second)
        return self._second_frames(k)[j * self.clip_frames:(j + 1) * self.clip_frames]

    def _second_frames(self, k: int) -> np.ndarray:
        """``uint8 [fps, S, S, 3]`` frames of entry ``k``'s second."""
        vid, sec = self.index.video_ids[k], int(self.index.seconds[k])
        return np.asarray(self.cache.frames(vid, resolve_video_path(self.root, self.info, vid), sec, sec + 1))

    def second_clips(self, k: int) -> Tensor:
        """All clips of entry ``k``'s second, unflipped: ``float32 [fps // T, 3, T, S, S]`` in [-1, 1]."""
        f = self._second_frames(k)[:self.per_second * self.clip_frames]
        return frames_to_clips(np.ascontiguousarray(f), self.clip_frames)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        k = int(i) // self.per_second
        frames = self.frames(i)
        box = self.index.boxes[k].copy()
        if self.flip and np.random.default_rng([self.seed, self.epoch, int(i)]).random() < 0.5:
            frames = frames[:, :, ::-1]
            box = np.array([1 - box[2], box[1], 1 - box[0], box[3]], dtype=np.float32)
        clip = frames_to_clips(np.ascontiguousarray(frames), self.clip_frames)[0]
        return clip, torch.from_numpy(box), torch.from_numpy(self.index.targets[k])
