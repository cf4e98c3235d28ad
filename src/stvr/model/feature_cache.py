"""An in-memory cache of a *frozen* backbone's per-clip feature maps.

With ``model.freeze_backbone`` the backbone is a fixed function of its input clip,
so the map of a clip identified by ``(video id, second, clip of the second,
flipped)`` is the same every time that clip is drawn. Training on the synthetic
benchmark draws the same few thousand training clips again and again (each pair:
a query tubelet of up to 10 s and a 2 s reference, 3 clips per second), and on
2 CPU cores the backbone is about half of a step: :class:`FeatureCache` keeps the
maps of the clips seen so far (least recently used first out, within a byte
budget) and the model (``STVRModel._batch_features``, through :func:`gather_features`)
runs the backbone only on the clips it does not hold. Enabled by ``train.feature_cache_mb`` (cpu preset);
never used for a backbone that trains.

Keys come with the batch (:attr:`stvr.data.batch.PairBatch.clip_keys`, built by the
pair datasets); a clip without a key is always computed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import torch
from torch import Tensor

__all__ = ["FeatureCache", "gather_features"]


class FeatureCache:
    """Least-recently-used map ``key -> [C, h, w]`` feature tensor within ``max_bytes``.

    Attributes:
        hits, misses: lookups answered from the cache / computed, since creation.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"FeatureCache needs a positive byte budget, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._maps: OrderedDict[Hashable, Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._maps)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._maps

    def lookup(self, keys: Sequence[Hashable | None]) -> tuple[list[Tensor | None], list[int]]:
        """The cached map of each key (None where absent) and the positions to compute."""
        found: list[Tensor | None] = []
        missing: list[int] = []
        for i, k in enumerate(keys):
            t = self._maps.get(k) if k is not None else None
            if t is None:
                missing.append(i)
            else:
                self._maps.move_to_end(k)
            found.append(t)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return found, missing

    def store(self, keys: Sequence[Hashable | None], maps: Tensor) -> None:
        """Keep ``maps [N, C, h, w]`` under ``keys`` (N of them; None keys are skipped),
        dropping the least recently used maps beyond the budget."""
        for k, m in zip(keys, maps):
            if k is None or k in self._maps:
                continue
            m = m.detach().clone()
            size = m.numel() * m.element_size()
            if size > self.max_bytes:
                continue
            self._maps[k] = m
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._maps.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self._maps.clear()
        self.bytes = 0

    def stats(self) -> dict[str, float]:
        """``{"entries", "mb", "hits", "misses", "hit_rate"}``."""
        n = self.hits + self.misses
        return {"entries": len(self._maps), "mb": self.bytes / 2**20, "hits": self.hits,
                "misses": self.misses, "hit_rate": self.hits / n if n else 0.0}


def gather_features(cache: FeatureCache, keys: Sequence[Hashable | None],
                    compute: Callable[[list[int]], Tensor]) -> Tensor:
    """Maps ``[N, C, h, w]`` of N clips named by ``keys``: the cached ones from ``cache``,
    the others from ``compute(positions) -> [len(positions), C, h, w]`` (then stored)."""
    found, missing = cache.lookup(keys)
    if missing:
        new = compute(missing)
        cache.store([keys[i] for i in missing], new)
        for j, i in enumerate(missing):
            found[i] = new[j]
    return torch.stack(found)  # type: ignore[arg-type]
