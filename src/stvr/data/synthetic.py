"""A synthetic STVR benchmark: the embedded default data set (DESIGN.md).

Each video shows 2-4 textured *actors* (sprites with a distinct periodic
texture, a superellipse silhouette, and a rim and a bar through the centre, the
*spoke*, both dark or both light) that move along smooth curved paths, bouncing
off the frame edges, over a muted textured background that may pan; a vertical
bar sometimes sweeps through the frame and hides what is behind it. At every
second each actor performs a set of 1-3 *atomic actions* (atoms) that are
visible only over time:

====  ==========  ==============================================================
 id    name        what changes from frame to frame
====  ==========  ==============================================================
 1     spin        the sprite rotates steadily (6-9 rad/s, either direction)
 2     pulse       its size oscillates (+-35 %, 3 or 3.5 Hz)
 3     blink       its rim and spoke switch between dark and light (2.5 or 3 Hz)
 4     wobble      its position jitters in a figure eight (0.45 x its half side, 3 or 3.5 Hz)
 5     colorcycle  its hues rotate (3 turns per second)
 6     scroll      its texture slides inside the still silhouette and spoke (2.5 periods/s),
                   across the texture's stripes
 7     shake       it rocks back and forth (+-0.8 rad, 3.5 or 4 Hz)
 8     squash      it stretches in x while shrinking in y and back (+-40 %, 3 or 3.5 Hz)
====  ==========  ==============================================================

Every oscillation has a frequency that is a multiple of 0.5 Hz and is zero at
integer seconds, so atoms switch on and off (at integer seconds) without jumps.
Generator version 2 made every atom strong and fast enough to be recognized
within one 8-frame clip (1/3 s): at least one full oscillation, or a rotation /
hue turn / texture shift of a large fraction, per clip (version 1's atoms were
too faint: an atom probe named only blink and shake on validation actors;
``benchmarks/bench_atoms.py``). Generator version 3 moves the actors at a
third of version 2's speed (8-16 px/s instead of 24-48), so that the one box per
second of the annotation still frames the actor in the outer clips of that second
(see the geometry note). Generator version 4 makes the atoms separable when they
are combined (the probe named them alone but not in held-out combinations):
the spoke shows the actor's orientation in every frame (spin and shake turn it,
scroll does not), scroll slides the texture across its stripes (along them it
was invisible), blink switches only the rim and the spoke (version 3 darkened
the whole sprite and hid a colour cycle), every actor has a dark or a light rim
of its own (drawn from a random stream of its own; so one frame does not tell
blink), colorcycle turns twice as fast, and a data set has 48 training videos
by default (24 before; 96 since the sixth pass of issue 11, with the rendering
unchanged: twice the training tubelets gave the cpu preset +1 to +4 test
frame-mAP@0.5 on most seeds, ``benchmarks/README.md``). The held-out labels, the
validation videos' labels and layout (so the validation / test pairs and the
chance frame-mAP) and the first 24 training videos' labels and layout of a seed
are the same in all versions.
The atoms of an actor change every 2-5 seconds; the *combined label* of an
actor at a second is the sorted tuple of its atom ids (as for AVA persons).

Annotations follow AVA: one CSV row per (video, second, actor, atom) with the
actor's box at that second (normalized ``x1, y1, x2, y2``: its nominal extent,
before pulse/squash/wobble, at the middle of the second, ``t + 0.5``) and the
actor index as person id. ``label_split.json`` holds out 2- and 3-atom
combinations for validation and test: training videos never show them, while
in validation videos a share of the actor segments (``heldout_probability``)
shows them, spread evenly over the held-out labels, so that every held-out
label gets several pairs. Then :func:`stvr.data.pairs.build_dataset_root` makes
training tubelets and val/test pairs exactly as for AVA.

Geometry note: the protocol (AVA's) evaluates all three clips of a second
against the one box of that second, annotated at its middle, while an actor
moving at ``v`` px/s is ``v / 3`` px away from it at the middle of the first and
the last clip. At version 2's 24-48 px/s with 32-49 px boxes a *perfect* per-clip
tracker overlapped the annotated box by IoU 0.51 on average in those clips and
missed IoU 0.5 in 44 % of them: with random scores it scored frame-mAP@0.5 10.0
on seed 0's test pairs, with scores of match AUC 0.8 25.7 (exact annotated boxes:
18.7 and 48.8), so localization, not matching, capped every model. The default
speeds of version 3 (8-16 px/s, 0.5-1 cell of a 16-px feature map per second)
keep that IoU at 0.79 on average and >= 0.5 everywhere; the camera pan moves only
the background (4-12 px/s) and the atoms wobble / pulse / squash still change
the visible extent around the annotated one.

Determinism: the same :class:`SynthConfig` gives byte-identical CSV and JSON
files and identical decoded frames (rendering is pure numpy seeded per video;
videos are encoded with :func:`stvr.data.video.write_video`'s deterministic
libx264 settings), independent of the number of worker processes.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .ava import AvaRow, label_key, write_annotations

__all__ = [
    "ATOMS",
    "GENERATOR_VERSION",
    "SynthConfig",
    "VideoScript",
    "plan_dataset",
    "render_frames",
    "generate_dataset",
    "is_complete",
]

#: atom id -> name (ids are the action ids of the CSV)
ATOMS: dict[int, str] = {1: "spin", 2: "pulse", 3: "blink", 4: "wobble", 5: "colorcycle", 6: "scroll",
                         7: "shake", 8: "squash"}
#: bump when the rendering or the annotation rules change (invalidates cached roots)
GENERATOR_VERSION = 4

_TEX = 32  # texture size (periodic)
_HUE_TURNS_PER_S = 3.0  # colorcycle speed (version 4; 1.5 before)
_RIM = 0.6  # superellipse level beyond which a texel is rim (0.72 before version 4)
_SCROLL_PERIODS_PER_S = 2.5  # scroll speed in texture periods (sprite widths) per second (2 before version 4)
_SPOKE = 0.12  # half width of the bar through the sprite's centre, shaded like the rim (actor frame units; v4)


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of a synthetic data set (all sizes in pixels of the ``size x size`` frames).

    Attributes:
        seed: everything is a function of the config, the seed included.
        num_train_videos, num_val_videos: videos per split.
        seconds: length of every video (time range ``[0, seconds)``).
        size: frame side S.
        fps: frame rate of the files (24 = the model's rate).
        actors: inclusive range of actors per video.
        actor_size: range of the box side as a fraction of S (aspect 0.8-1.25 on top).
        speed: range of actor speeds in pixels per second.
        atoms_per_label: probabilities of 1, 2, 3 atoms per actor segment (train
            labels; held-out labels have 2 or 3 atoms).
        segment_seconds: inclusive range of seconds between atom changes.
        num_val_labels, num_test_labels: held-out combined labels per split.
        heldout_probability: share of actor segments in validation videos that
            show a held-out label.
        occlusion_probability: probability that a video has a moving occluder bar.
        camera_pan: pan the background (the camera drifts; actor paths are in
            image coordinates).
        pan_speed: range of the pan speed in pixels per second.
        crf, preset: libx264 quality and speed.
    """

    seed: int = 0
    num_train_videos: int = 96
    num_val_videos: int = 8
    seconds: int = 20
    size: int = 128
    fps: int = 24
    actors: tuple[int, int] = (2, 4)
    actor_size: tuple[float, float] = (0.25, 0.38)
    speed: tuple[float, float] = (8.0, 16.0)
    atoms_per_label: tuple[float, float, float] = (0.3, 0.45, 0.25)
    segment_seconds: tuple[int, int] = (2, 5)
    num_val_labels: int = 4
    num_test_labels: int = 4
    heldout_probability: float = 0.6
    occlusion_probability: float = 0.5
    camera_pan: bool = True
    pan_speed: tuple[float, float] = (4.0, 12.0)
    crf: int = 18
    preset: str = "veryfast"

    def validate(self) -> "SynthConfig":
        """Raise ``ValueError`` naming the first bad field; returns self."""
        def rng_ok(name, lo_min, cast=float):
            lo, hi = getattr(self, name)
            if not (cast(lo) >= lo_min and cast(hi) >= cast(lo)):
                raise ValueError(f"SynthConfig.{name} must be a range (lo, hi) with {lo_min} <= lo <= hi, "
                                 f"got {getattr(self, name)!r}")
        if self.num_train_videos < 1 or self.num_val_videos < 1:
            raise ValueError("SynthConfig needs num_train_videos >= 1 and num_val_videos >= 1")
        if self.seconds < 2:
            raise ValueError(f"SynthConfig.seconds must be >= 2, got {self.seconds}")
        if self.size < 32 or self.size % 2:
            raise ValueError(f"SynthConfig.size must be even and >= 32, got {self.size}")
        if self.fps < 1 or self.fps % 8:
            raise ValueError(f"SynthConfig.fps must be a positive multiple of 8 (8-frame clips), got {self.fps}")
        rng_ok("actors", 1, int)
        rng_ok("actor_size", 0.05)
        if self.actor_size[1] > 0.6:
            raise ValueError(f"SynthConfig.actor_size upper bound must be <= 0.6, got {self.actor_size[1]}")
        rng_ok("speed", 0.0)
        rng_ok("segment_seconds", 1, int)
        rng_ok("pan_speed", 0.0)
        p = np.asarray(self.atoms_per_label, dtype=float)
        if p.shape != (3,) or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"SynthConfig.atoms_per_label must be 3 non-negative weights, got {self.atoms_per_label}")
        n_pairs = math.comb(len(ATOMS), 2)  # half of the held-out labels are pairs (rounded up)
        if (self.num_val_labels < 1 or self.num_test_labels < 1
                or (self.num_val_labels + 1) // 2 + (self.num_test_labels + 1) // 2 > n_pairs // 2):
            raise ValueError("SynthConfig.num_val_labels and num_test_labels must be >= 1 and hold out at "
                             f"most {n_pairs // 2} of the {n_pairs} 2-atom labels together, got "
                             f"{self.num_val_labels} and {self.num_test_labels}")
        for name in ("heldout_probability", "occlusion_probability"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"SynthConfig.{name} must be in [0, 1], got {v}")
        return self

    def to_json(self) -> dict:
        """JSON form (tuples as lists), as stored in ``dataset.json``."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, d: dict) -> "SynthConfig":
        kw = {}
        for f in cls.__dataclass_fields__.values():
            if f.name in d:
                v = d[f.name]
                kw[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)


# ----------------------------------------------------------------------------- planning


@dataclass
class _Actor:
    person_id: int
    texture: np.ndarray          # float32 [T, T, 3] 0..255, periodic
    shape_p: float               # superellipse exponent (2 = ellipse)
    rx: float                    # half width (px)
    ry: float                    # half height (px)
    pos: np.ndarray              # float64 [N, 2] centre x, y per frame
    labels: list[tuple[int, ...]]  # per second
    theta0: float
    spin_w: float
    pulse_f: float
    blink_f: float
    wobble_f: float
    wobble_amp: float
    hue_speed: float
    scroll_v: np.ndarray         # [2] texture periods per second
    shake_f: float
    squash_f: float
    rim_light: bool = False      # rim and spoke light (else dark) when not blinking (version 4)


@dataclass
class VideoScript:
    """Everything needed to render one video and annotate it (deterministic)."""

    video_id: str
    split: str
    seconds: int
    size: int
    fps: int
    background: np.ndarray       # uint8 [2S, 2S, 3], a 2x2 tiling of a periodic texture
    pan: np.ndarray              # [2] px/s (x, y)
    pan_offset: np.ndarray       # [2] px
    occluder: dict | None        # {"x0", "v", "width", "period", "texture" [S, w, 3] uint8}
    actors: list[_Actor] = field(default_factory=list)

    def boxes(self) -> np.ndarray:
        """``[num_actors, seconds, 4]`` normalized boxes (nominal extent at ``t + 0.5``)."""
        mid = np.arange(self.seconds) * self.fps + self.fps // 2
        out = np.zeros((len(self.actors), self.seconds, 4))
        for i, a in enumerate(self.actors):
            c = a.pos[mid]
            out[i] = np.stack([c[:, 0] - a.rx, c[:, 1] - a.ry, c[:, 0] + a.rx, c[:, 1] + a.ry], axis=1) / self.size
        return np.clip(out, 0.0, 1.0)

    def rows(self) -> list[AvaRow]:
        """AVA rows: one per (second, actor, atom), seconds outer, actors, atoms inner."""
        boxes = self.boxes()
        rows = []
        for s in range(self.seconds):
            for i, a in enumerate(self.actors):
                box = tuple(float(round(v, 6)) for v in boxes[i, s])
                for atom in a.labels[s]:
                    rows.append(AvaRow(self.video_id, s, box, int(atom), a.person_id))
        return rows


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorized HSV (hue in turns, s and v in [0, 1]) -> RGB in [0, 255], shape ``[..., 3]``."""
    h, s, v = (np.asarray(x, dtype=np.float64)[..., None] for x in (h, s, v))
    k = np.mod(np.array([5.0, 3.0, 1.0]) + (h % 1.0) * 6.0, 6.0)
    return 255.0 * (v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))


def _periodic_noise(rng: np.random.Generator, n: int, components: int, max_freq: int) -> np.ndarray:
    """Sum of random integer-frequency plane waves on an ``n x n`` torus, scaled to [0, 1]."""
    y, x = np.mgrid[0:n, 0:n] / n
    acc = np.zeros((n, n))
    for _ in range(components):
        kx, ky = 0, 0
        while kx == 0 and ky == 0:
            kx, ky = rng.integers(-max_freq, max_freq + 1, size=2)
        acc += rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * (kx * x + ky * y) + rng.uniform(0, 2 * np.pi))
    acc -= acc.min()
    return acc / max(acc.max(), 1e-9)


def _actor_texture(rng: np.random.Generator, hue0: float) -> np.ndarray:
    """A distinct periodic texture: two-colour smooth pattern plus a third-colour motif."""
    # analogous base pair (their blend stays saturated) + a contrasting motif colour
    hues = hue0 + np.array([0.0, rng.uniform(0.1, 0.22) * rng.choice([-1, 1]), rng.uniform(0.42, 0.58)])
    # a dark and a bright base colour (v2: luminance contrast makes motion inside the sprite visible)
    value = rng.uniform(0.0, 1.0, 3) * np.array([0.15, 0.15, 0.25]) + np.array([0.35, 0.85, 0.75])
    cols = _hsv_to_rgb(hues, rng.uniform(0.65, 1.0, 3), value)  # [3, 3]
    a = _periodic_noise(rng, _TEX, 3, 3)
    b = _periodic_noise(rng, _TEX, 2, 4)
    tex = cols[0] * (1 - a[..., None]) + cols[1] * a[..., None]
    motif = b > rng.uniform(0.6, 0.75)
    tex[motif] = cols[2]
    return tex.astype(np.float32)


def _scroll_direction(texture: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """Unit direction ``[2]`` (x, y) along which ``texture`` changes most: the leading
    eigenvector of its luminance structure tensor, signed like ``drawn``.

    Version 4: a texture slid along its own stripes does not change (the aperture
    problem; version 3's random directions made scroll invisible on striped textures).
    """
    lum = texture.mean(axis=2)
    gx = np.roll(lum, -1, axis=1) - np.roll(lum, 1, axis=1)   # periodic central differences
    gy = np.roll(lum, -1, axis=0) - np.roll(lum, 1, axis=0)
    j = np.array([[np.sum(gx * gx), np.sum(gx * gy)], [np.sum(gx * gy), np.sum(gy * gy)]])
    d = np.linalg.eigh(j)[1][:, -1]
    return d if float(d @ drawn) >= 0 else -d


def _fold(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect an unbounded coordinate into ``[lo, hi]`` (bouncing off the edges)."""
    span = hi - lo
    if span <= 0:
        return np.full_like(u, (lo + hi) / 2)
    m = np.mod(u - lo, 2 * span)
    return lo + np.where(m <= span, m, 2 * span - m)


def _path(rng: np.random.Generator, n: int, fps: int, size: int, rx: float, ry: float,
          speed: tuple[float, float]) -> np.ndarray:
    """Smooth curved path with bounces: ``[n, 2]`` centres (x, y) in px."""
    t = np.arange(n) / fps
    v0 = rng.uniform(*speed)
    phi = (rng.uniform(0, 2 * np.pi) + rng.uniform(-0.4, 0.4) * t
           + 0.5 * np.sin(2 * np.pi * t / rng.uniform(4, 9) + rng.uniform(0, 2 * np.pi)))
    v = v0 * (1 + 0.25 * np.sin(2 * np.pi * t / rng.uniform(3, 7) + rng.uniform(0, 2 * np.pi)))
    step = np.stack([v * np.cos(phi), v * np.sin(phi)], axis=1) / fps
    start = np.array([rng.uniform(rx, size - rx), rng.uniform(ry, size - ry)])
    u = start + np.concatenate([np.zeros((1, 2)), np.cumsum(step[:-1], axis=0)])
    return np.stack([_fold(u[:, 0], rx, size - rx), _fold(u[:, 1], ry, size - ry)], axis=1)


def _combos(k_values: Sequence[int]) -> list[tuple[int, ...]]:
    ids = sorted(ATOMS)
    return [c for k in k_values for c in itertools.combinations(ids, k)]


def _choose_heldout(cfg: SynthConfig) -> dict[str, list[tuple[int, ...]]]:
    """Held-out labels: per split, half 2-atom and half 3-atom combinations (seeded)."""
    rng = np.random.default_rng([cfg.seed & 0xFFFFFFFF, 0x5EED, 1])
    pools = {k: [_combos((k,))[i] for i in rng.permutation(len(_combos((k,))))] for k in (2, 3)}
    out = {}
    for name, n in (("val", cfg.num_val_labels), ("test", cfg.num_test_labels)):
        n2 = (n + 1) // 2
        out[name] = sorted([pools[2].pop() for _ in range(n2)] + [pools[3].pop() for _ in range(n - n2)])
    return out


class _LabelSource:
    """Draws combined labels: train labels by size weights, held-out ones from a balanced cycle."""

    def __init__(self, cfg: SynthConfig, heldout: list[tuple[int, ...]], rng: np.random.Generator):
        held = set(heldout)
        self.by_k = {k: [c for c in _combos((k,)) if c not in held] for k in (1, 2, 3)}
        w = np.asarray(cfg.atoms_per_label, dtype=float)
        self.k_probs = w / w.sum()
        self.heldout = list(heldout)
        self.queue: list[tuple[int, ...]] = []
        self.rng = rng

    def train(self, rng: np.random.Generator) -> tuple[int, ...]:
        k = int(rng.choice(3, p=self.k_probs)) + 1
        opts = self.by_k[k]
        return opts[int(rng.integers(len(opts)))]

    def held(self) -> tuple[int, ...]:
        if not self.queue:
            self.queue = [self.heldout[i] for i in self.rng.permutation(len(self.heldout))]
        return self.queue.pop()


def _plan_video(cfg: SynthConfig, split: str, index: int, labels: _LabelSource) -> VideoScript:
    S, fps, secs = cfg.size, cfg.fps, cfg.seconds
    n = secs * fps
    rng = np.random.default_rng([cfg.seed & 0xFFFFFFFF, 0 if split == "train" else 1, index])
    vid = f"synth_{split}_{index:03d}"
    # background: muted periodic texture, tiled 2x2 for cheap panning
    bh = rng.uniform(0, 1)
    base = _hsv_to_rgb(np.array([bh, bh + 0.1]), np.array([rng.uniform(0.1, 0.3)] * 2),
                       np.array([rng.uniform(0.3, 0.45), rng.uniform(0.5, 0.65)]))
    a = _periodic_noise(rng, S, 4, 4)[..., None]
    bg = (base[0] * (1 - a) + base[1] * a).astype(np.uint8)
    background = np.tile(bg, (2, 2, 1))
    if cfg.camera_pan:
        ang = rng.uniform(0, 2 * np.pi)
        pan = rng.uniform(*cfg.pan_speed) * np.array([np.cos(ang), np.sin(ang)])
    else:
        pan = np.zeros(2)
    pan_offset = rng.uniform(0, S, size=2)
    occluder = None
    if rng.random() < cfg.occlusion_probability:
        w = max(4, int(round(0.12 * S)))
        y = np.arange(S)[:, None]
        stripes = ((y // max(2, S // 16)) % 2).astype(np.float32)
        shade = rng.uniform(40, 70)
        tex = np.repeat((shade + 35 * stripes)[..., None], 3, axis=2) * np.ones((1, w, 1))
        tex[:, [0, -1]] *= 0.6
        occluder = {"x0": float(rng.uniform(0, 2 * S)), "v": float(rng.uniform(30, 60) * rng.choice([-1, 1])),
                    "width": w, "period": float(2 * S + w), "texture": tex.astype(np.uint8)}
    actors = []
    # draws added in version 4 come from their own stream: the layout, labels and pairs of a seed stay the same
    rng_v4 = np.random.default_rng([cfg.seed & 0xFFFFFFFF, 0 if split == "train" else 1, index, 4])
    n_act = int(rng.integers(cfg.actors[0], cfg.actors[1] + 1))
    hue0 = rng.uniform(0, 1)
    for pid in range(n_act):
        side = rng.uniform(*cfg.actor_size) * S
        aspect = rng.uniform(0.8, 1.25)
        rx, ry = side / 2 * math.sqrt(aspect), side / 2 / math.sqrt(aspect)
        rx, ry = min(rx, S / 2 - 1), min(ry, S / 2 - 1)
        # per-second labels in segments of segment_seconds
        per_sec: list[tuple[int, ...]] = []
        prev = None
        while len(per_sec) < secs:
            length = int(rng.integers(cfg.segment_seconds[0], cfg.segment_seconds[1] + 1))
            for _ in range(20):
                if split == "val" and rng.random() < cfg.heldout_probability:
                    lab = labels.held()
                else:
                    lab = labels.train(rng)
                if lab != prev:
                    break
            per_sec.extend([lab] * length)
            prev = lab
        scroll = rng.normal(size=2)
        actor_texture = _actor_texture(rng, hue0 + pid / n_act + rng.uniform(-0.05, 0.05))
        actors.append(_Actor(
            person_id=pid,
            texture=actor_texture,
            shape_p=float(rng.choice([2.0, 3.0, 4.0])),
            rx=float(rx), ry=float(ry),
            pos=_path(rng, n, fps, S, rx, ry, cfg.speed),
            labels=per_sec[:secs],
            theta0=float(rng.uniform(0, 2 * np.pi)),
            spin_w=float(rng.uniform(6.0, 9.0) * rng.choice([-1, 1])),
            pulse_f=float(rng.choice([3.0, 3.5])),
            blink_f=float(rng.choice([2.5, 3.0])),
            wobble_f=float(rng.choice([3.0, 3.5])),
            wobble_amp=float(0.45 * min(rx, ry)),
            hue_speed=float(2 * np.pi * _HUE_TURNS_PER_S * rng.choice([-1, 1])),
            scroll_v=_SCROLL_PERIODS_PER_S * _scroll_direction(actor_texture, scroll),
            shake_f=float(rng.choice([3.5, 4.0])),
            squash_f=float(rng.choice([3.0, 3.5])),
            rim_light=bool(rng_v4.random() < 0.5),
        ))
    return VideoScript(vid, split, secs, S, fps, background, pan, pan_offset, occluder, actors)


def plan_dataset(cfg: SynthConfig) -> tuple[list[VideoScript], dict[str, list[tuple[int, ...]]]]:
    """All video scripts (train then val) and the held-out label split of a config."""
    cfg.validate()
    split = _choose_heldout(cfg)
    heldout = split["val"] + split["test"]
    labels = _LabelSource(cfg, heldout, np.random.default_rng([cfg.seed & 0xFFFFFFFF, 0x5EED, 2]))
    scripts = [_plan_video(cfg, "train", i, labels) for i in range(cfg.num_train_videos)]
    scripts += [_plan_video(cfg, "val", i, labels) for i in range(cfg.num_val_videos)]
    return scripts, split


# ----------------------------------------------------------------------------- rendering


def _active(actor: _Actor, seconds: np.ndarray, atom: int) -> np.ndarray:
    """Float mask [len(seconds)] of whether ``atom`` is active at each second."""
    return np.array([1.0 if atom in actor.labels[s] else 0.0 for s in seconds])


class _ActorTrack:
    """Per-frame parameters of one actor over the whole video (cumulative angles etc.)."""

    def __init__(self, a: _Actor, seconds: int, fps: int):
        n = seconds * fps
        self.t = np.arange(n) / fps
        sec = np.arange(n) // fps
        act = {k: _active(a, np.arange(seconds), k)[sec] for k in ATOMS}
        t = self.t
        s2p = 2 * np.pi
        osc = lambda f: np.sin(s2p * f * t)  # noqa: E731 - zero at integer seconds for f in 0.5 Z
        self.angle = (a.theta0 + np.concatenate([[0.0], np.cumsum(act[1][:-1])]) * a.spin_w / fps
                      + act[7] * 0.8 * osc(a.shake_f))
        pulse = 1 + act[2] * 0.35 * osc(a.pulse_f)
        sq = act[8] * 0.4 * osc(a.squash_f)
        self.sx = pulse * (1 + sq)
        self.sy = pulse * (1 - sq)
        # rim shade per frame (0 dark, 1 light): blink switches it in the 2nd half of every period
        self.blink_phase = (act[3] > 0) & (np.mod(a.blink_f * t + 1e-9, 1.0) >= 0.5)
        self.rim_state = self.blink_phase ^ a.rim_light
        self.center = a.pos + act[4][:, None] * a.wobble_amp * np.stack(
            [osc(a.wobble_f), 0.5 * np.sin(2 * s2p * a.wobble_f * t)], axis=1)
        self.hue = np.concatenate([[0.0], np.cumsum(act[5][:-1])]) * a.hue_speed / fps
        self.scroll = np.concatenate([np.zeros((1, 2)), np.cumsum(act[6][:-1, None] * a.scroll_v[None], axis=0)]) / fps
        self.color_active = act[5] > 0
        self.r_max = 2.0 ** (0.5 - 1.0 / a.shape_p)  # farthest point of the unit superellipse
        # packed texel palettes without hue rotation: [rim state][rim?][T*T]
        self.palette = _pack(_shade(a.texture.reshape(-1, 3))).reshape(-1)


def _hue_matrices(angles: np.ndarray) -> np.ndarray:
    """``[n, 3, 3]`` rotations of RGB about the grey axis (hue rotation)."""
    c, s = np.cos(angles)[:, None, None], np.sin(angles)[:, None, None]
    eye = np.eye(3)[None]
    ones = np.full((1, 3, 3), 1.0 / 3.0)
    k = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], dtype=float)[None] / math.sqrt(3.0)
    return c * eye + (1 - c) * ones + s * k


def _superellipse(u: np.ndarray, p: float) -> np.ndarray:
    """``|u| ** p`` for the exponents used (2, 3, 4) without the slow generic power."""
    u2 = u * u
    if p == 2.0:
        return u2
    if p == 4.0:
        return u2 * u2
    if p == 3.0:
        return np.abs(u) * u2
    return np.abs(u) ** p


def _pack(rgb: np.ndarray) -> np.ndarray:
    """Float/uint8 RGB ``[..., 3]`` -> ``uint32 [...]`` (bytes R, G, B, 0 in memory order)."""
    a = np.zeros((*rgb.shape[:-1], 4), dtype=np.uint8)
    a[..., :3] = rgb if rgb.dtype == np.uint8 else np.clip(rgb + 0.5, 0, 255)  # round half up
    return a.view(np.uint32)[..., 0]


def _unpack(px: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack`: ``uint32 [...]`` -> contiguous ``uint8 [..., 3]``."""
    return np.ascontiguousarray(px[..., None].view(np.uint8)[..., :3])


# texel colour = texture * mul + add, indexed [rim state (0 dark, 1 light)][rim or spoke texel?]
_SHADE_MUL = np.array([[1.0, 0.45], [1.0, 0.3]])
_SHADE_ADD = np.array([[0.0, 0.0], [0.0, 178.5]])


def _shade(rgb: np.ndarray, states: np.ndarray | None = None) -> np.ndarray:
    """Shaded texel colours for [rim?] (rim / spoke texel or not).

    ``rgb [K, 3]`` -> ``[2, 2, K, 3]``: every [rim state][rim?] pair; with per-frame rim
    ``states [F]`` (0 dark, 1 light), ``rgb [F, K, 3]`` -> ``[F, 2, K, 3]``: each frame's own state.
    """
    mul, add = (_SHADE_MUL, _SHADE_ADD) if states is None else (_SHADE_MUL[states], _SHADE_ADD[states])
    return rgb[..., None, :, :] * mul[..., None, None] + add[..., None, None]


def _draw_actor(out: np.ndarray, a: _Actor, tr: _ActorTrack, g: np.ndarray) -> None:
    """Composite actor ``a`` into the packed canvas ``out`` ``uint32 [F, S, S]`` for global frames ``g``.

    Inverse mapping over a ``P x P`` patch around the actor in all ``F`` frames at
    once (``[F, P, P]`` float32 arrays): pixel centre -> actor frame (rotate,
    scale) -> superellipse inside test -> texture coordinates (with scroll) ->
    lookup in a palette of shaded texels (hue rotation, blink brightness and the
    dark rim are applied to the 1024 texels, not to every pixel) -> masked copy
    into each frame.
    """
    f32 = np.float32
    F, S = out.shape[0], out.shape[1]
    cx, cy = tr.center[g, 0], tr.center[g, 1]
    sx, sy = tr.sx[g], tr.sy[g]
    R = int(math.ceil(max(a.rx, a.ry) * float(max(sx.max(), sy.max())) * tr.r_max)) + 1
    P = 2 * R + 1
    d = np.arange(P)
    x0 = np.floor(cx).astype(np.int64) - R                    # [F] first patch column
    y0 = np.floor(cy).astype(np.int64) - R
    lx = (x0[:, None] + d[None, :] + 0.5 - cx[:, None]).astype(f32)[:, None, :]  # [F, 1, P]
    ly = (y0[:, None] + d[None, :] + 0.5 - cy[:, None]).astype(f32)[:, :, None]  # [F, P, 1]
    ang = tr.angle[g]
    c = np.cos(ang).astype(f32)[:, None, None]
    s = np.sin(ang).astype(f32)[:, None, None]
    irx = (1.0 / (a.rx * sx)).astype(f32)[:, None, None]
    iry = (1.0 / (a.ry * sy)).astype(f32)[:, None, None]
    u = (c * irx) * lx + (s * irx) * ly                       # [F, P, P] in [-1, 1] inside
    v = (c * iry) * ly - (s * iry) * lx
    q = _superellipse(u, a.shape_p) + _superellipse(v, a.shape_p)
    inside = q <= 1.0
    off = (tr.scroll[g] * _TEX).astype(f32)
    half = f32(0.5 * _TEX)
    tu = np.floor((u + 1) * half + off[:, 0, None, None]).astype(np.int32) & (_TEX - 1)
    tv = np.floor((v + 1) * half + off[:, 1, None, None]).astype(np.int32) & (_TEX - 1)
    texel = tv * _TEX + tu
    # rim and spoke texels are the second half; the spoke, a bar along the actor's own x axis,
    # turns with spin / shake but not with scroll (version 4: orientation visible in every frame)
    np.add(texel, _TEX * _TEX, out=texel, where=(q > _RIM) | (np.abs(v) < _SPOKE))
    state = tr.rim_state[g].astype(np.int64)
    if tr.color_active[g].any():                              # per-frame palettes [F, 2, T*T]
        m = _hue_matrices(tr.hue[g]).astype(f32)
        rot = a.texture.reshape(-1, 3) @ m.transpose(0, 2, 1)  # [F, T*T, 3]
        pal = _pack(_shade(rot, state)).reshape(-1)           # only the frame's own rim state
        texel += (np.arange(F, dtype=np.int32) * (2 * _TEX * _TEX))[:, None, None]
    else:                                                     # the 2 x 2 static palettes
        pal = tr.palette
        texel += (state.astype(np.int32) * (2 * _TEX * _TEX))[:, None, None]
    cols = np.take(pal, texel)                                # uint32 [F, P, P]
    for k in range(F):
        ya, yb = max(int(y0[k]), 0), min(int(y0[k]) + P, S)
        xa, xb = max(int(x0[k]), 0), min(int(x0[k]) + P, S)
        if ya >= yb or xa >= xb:
            continue
        py, px = slice(ya - y0[k], yb - y0[k]), slice(xa - x0[k], xb - x0[k])
        np.copyto(out[k, ya:yb, xa:xb], cols[k, py, px], where=inside[k, py, px])


def render_frames(script: VideoScript, second: int, tracks: list[_ActorTrack] | None = None) -> np.ndarray:
    """The ``fps`` frames of one second: ``uint8 [fps, S, S, 3]`` RGB.

    ``tracks`` (per-actor :class:`_ActorTrack`) can be passed to avoid
    recomputing them for every second.
    """
    S, fps = script.size, script.fps
    g = second * fps + np.arange(fps)
    t = g / fps
    out = np.empty((fps, S, S), dtype=np.uint32)
    bg = _pack(script.background)
    off = np.floor(script.pan_offset[None] + script.pan[None] * t[:, None]).astype(np.int64) % S
    for k in range(fps):
        out[k] = bg[off[k, 1]: off[k, 1] + S, off[k, 0]: off[k, 0] + S]
    if tracks is None:
        tracks = [_ActorTrack(a, script.seconds, fps) for a in script.actors]
    for a, tr in zip(script.actors, tracks):
        _draw_actor(out, a, tr, g)
    occ = script.occluder
    if occ is not None:
        w = occ["width"]
        tex = _pack(occ["texture"])
        xs = np.floor(np.mod(occ["x0"] + occ["v"] * t, occ["period"])).astype(np.int64) - w
        for k in range(fps):
            a0, b0 = max(xs[k], 0), min(xs[k] + w, S)
            if b0 > a0:
                out[k, :, a0:b0] = tex[:, a0 - xs[k]: b0 - xs[k]]
    return _unpack(out)


def _render_video(script: VideoScript, path: str, crf: int, preset: str) -> dict:
    """Render and encode one video (runs in worker processes); returns timings."""
    from .video import VideoWriter

    t0 = time.perf_counter()
    tracks = [_ActorTrack(a, script.seconds, script.fps) for a in script.actors]
    render_s = time.perf_counter() - t0
    encode_s = 0.0
    with VideoWriter(path, script.fps, script.size, script.size, crf=crf, preset=preset,
                     gop=script.fps, deterministic=True) as w:
        for s in range(script.seconds):
            t1 = time.perf_counter()
            frames = render_frames(script, s, tracks)
            t2 = time.perf_counter()
            w.write(frames)
            t3 = time.perf_counter()
            render_s += t2 - t1
            encode_s += t3 - t2
    t4 = time.perf_counter()
    return {"video_id": script.video_id, "render_s": render_s, "encode_s": encode_s + (t4 - t3),
            "bytes": os.path.getsize(path)}


def _mp_context():
    """``spawn`` (safe with threads and torch in the parent), or ``fork`` when the main
    module cannot be re-imported by path (a script read from stdin)."""
    import multiprocessing as mp
    import sys

    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.exists(main_file) and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _worker_init() -> None:
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover - cv2 is a dependency
        pass


# ----------------------------------------------------------------------------- the data set


_ROOT_FILES = ("annotations/train.csv", "annotations/val.csv", "label_split.json", "train_tubelets.json",
               "pairs/val.json", "pairs/test.json", "stats.json")


def is_complete(root: str | Path, cfg: SynthConfig) -> bool:
    """Whether ``root`` holds a finished data set generated from exactly ``cfg``
    by this generator version (every file present)."""
    root = Path(root)
    try:
        d = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    syn = d.get("synthetic") if isinstance(d, dict) else None
    if not isinstance(syn, dict) or not syn.get("complete"):
        return False
    if syn.get("version") != GENERATOR_VERSION or syn.get("config") != cfg.to_json():
        return False
    if not all((root / f).is_file() for f in _ROOT_FILES):
        return False
    videos = d.get("videos", {})
    if len(videos) != cfg.num_train_videos + cfg.num_val_videos:
        return False
    return all((root / p).is_file() and (root / p).stat().st_size > 0 for p in videos.values())


def _refuse_other_config(root: Path, old: dict, cfg: SynthConfig) -> None:
    """``ValueError`` when ``root`` holds a complete synthetic set whose config differs from ``cfg``."""
    old_cfg = old.get("config")
    if not old.get("complete") or not isinstance(old_cfg, dict):
        return
    new_cfg = cfg.to_json()
    diff = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
    if not diff:
        return
    what = ", ".join(f"{k} {json.dumps(old_cfg.get(k))} (asked: {json.dumps(new_cfg.get(k))})" for k in diff)
    raise ValueError(
        f"{root} holds a complete synthetic data set of other settings: {what}. Refusing to "
        f"overwrite it: use those settings to reuse it (e.g. `stvr demo --synth seed=...`), "
        f"another folder, or force=True / `stvr data synth --force` to regenerate it")


def _write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _summary(root: Path, d: dict, stats: dict, generated: bool, elapsed: float, timing: dict | None) -> dict:
    cfg = d["synthetic"]["config"]
    total_s = (cfg["num_train_videos"] + cfg["num_val_videos"]) * cfg["seconds"]
    sp = stats.get("splits", {})
    out = {
        "root": str(root),
        "generated": generated,
        "videos": {"train": len(d["train_videos"]), "val": len(d["val_videos"])},
        "seconds": {"train": cfg["num_train_videos"] * cfg["seconds"], "val": cfg["num_val_videos"] * cfg["seconds"]},
        "size": cfg["size"],
        "fps": d["fps"],
        "tubelets": {"train": sp.get("train", {}).get("tubelets", 0)},
        "pairs": {"val": sp.get("val", {}).get("pairs", 0), "test": sp.get("test", {}).get("pairs", 0)},
        "labels": {
            "train": sp.get("train", {}).get("labels", 0),
            "val": sp.get("val", {}).get("labels", 0),
            "test": sp.get("test", {}).get("labels", 0),
            "val_with_pairs": sp.get("val", {}).get("labels_with_pairs", 0),
            "test_with_pairs": sp.get("test", {}).get("labels_with_pairs", 0),
        },
        "held_out": d.get("held_out", {}),
        "elapsed_s": round(elapsed, 3),
    }
    if generated:
        out["realtime_factor"] = round(total_s / max(elapsed, 1e-9), 1)
    if timing:
        out["timing"] = timing
    return out


def generate_dataset(root: str | Path, cfg: SynthConfig | None = None, progress: bool = True,
                     workers: int | None = None, force: bool = False) -> dict:
    """Generate (or reuse) a synthetic data set root (COMMON dataset-root layout).

    Writes ``videos/<id>.mp4``, ``annotations/{train,val}.csv`` (AVA format),
    ``label_split.json``, ``dataset.json`` (with ``"synthetic": {"version",
    "config", "complete"}``) and, through :func:`stvr.data.pairs.build_dataset_root`
    (seeded with ``cfg.seed``), ``train_tubelets.json``, ``pairs/{val,test}.json``
    and ``stats.json``.

    When ``root`` already holds a complete data set of the same config and
    generator version, nothing is regenerated (``force=True`` regenerates).
    Without ``force`` a root is never overwritten (``ValueError``, naming the
    differing settings) when its ``dataset.json`` is not a synthetic data set or
    when it holds a complete synthetic set of *another* config (another seed, say):
    somebody made it on purpose. A complete set of the same config by an older
    generator version, or an unfinished one, is regenerated. On regeneration, old
    ``videos/synth_*.mp4`` files and the default clip cache ``<root>/cache`` are
    removed, since the videos change.

    Args:
        root: the dataset root.
        cfg: the config (default :class:`SynthConfig()`).
        progress: show a tqdm bar over the videos.
        workers: processes rendering videos in parallel (default: up to 4, at
            most the CPU count and the number of videos; 1 = in this process).
            The output does not depend on it.
        force: regenerate even when the root is complete.

    Returns:
        A summary: ``root``, ``generated``, ``videos``/``seconds`` per split,
        ``tubelets``, ``pairs`` per split, ``labels`` per split, ``held_out``,
        ``elapsed_s`` and, when generated, ``realtime_factor`` (video seconds per
        wall-clock second) and ``timing`` (render / encode seconds summed over videos).
    """
    from tqdm import tqdm

    from .pairs import build_dataset_root

    cfg = (cfg or SynthConfig()).validate()
    root = Path(root)
    t0 = time.perf_counter()
    if not force and is_complete(root, cfg):
        d = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
        stats = json.loads((root / "stats.json").read_text(encoding="utf-8"))
        return _summary(root, d, stats, False, time.perf_counter() - t0, None)
    ds_path = root / "dataset.json"
    if ds_path.is_file() and not force:
        try:
            old = json.loads(ds_path.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if not (isinstance(old, dict) and isinstance(old.get("synthetic"), dict)):
            raise ValueError(f"{ds_path} exists and is not a synthetic data set; refusing to overwrite "
                             f"it (use force=True / --force, or another root)")
        _refuse_other_config(root, old["synthetic"], cfg)
    # invalidate whatever was there before writing anything
    ds_path.unlink(missing_ok=True)
    if (root / "videos").is_dir():
        for old_video in (root / "videos").glob("synth_*.mp4"):
            old_video.unlink()
    shutil.rmtree(root / "cache", ignore_errors=True)
    (root / "videos").mkdir(parents=True, exist_ok=True)

    scripts, split = plan_dataset(cfg)
    tasks = [(s, str(root / "videos" / f"{s.video_id}.mp4"), cfg.crf, cfg.preset) for s in scripts]
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1, len(tasks))
    n_workers = max(1, min(int(n_workers), len(tasks)))
    bar = tqdm(total=len(tasks), desc="synth videos", unit="video", disable=not progress, dynamic_ncols=True)
    results = []
    try:
        if n_workers == 1:
            for task in tasks:
                results.append(_render_video(*task))
                bar.update(1)
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(n_workers, mp_context=_mp_context(), initializer=_worker_init) as ex:
                futs = [ex.submit(_render_video, *task) for task in tasks]
                for f in as_completed(futs):
                    results.append(f.result())
                    bar.update(1)
    finally:
        bar.close()

    train_rows = [r for s in scripts if s.split == "train" for r in s.rows()]
    val_rows = [r for s in scripts if s.split == "val" for r in s.rows()]
    write_annotations(train_rows, root / "annotations" / "train.csv")
    write_annotations(val_rows, root / "annotations" / "val.csv")
    _write_json({"val": [list(x) for x in split["val"]], "test": [list(x) for x in split["test"]]},
                root / "label_split.json")
    used = sorted({tuple(a.labels[s]) for sc in scripts for a in sc.actors for s in range(sc.seconds)}
                  | set(split["val"]) | set(split["test"]))
    dataset = {
        "name": "synthetic",
        "fps": cfg.fps,
        "size": cfg.size,
        "videos": {s.video_id: f"videos/{s.video_id}.mp4" for s in scripts},
        "time_ranges": {s.video_id: [0, cfg.seconds] for s in scripts},
        "train_videos": [s.video_id for s in scripts if s.split == "train"],
        "val_videos": [s.video_id for s in scripts if s.split == "val"],
        "label_names": {label_key(lab): "+".join(ATOMS[a] for a in lab) for lab in used},
        "atoms": {str(k): v for k, v in ATOMS.items()},
        "held_out": {name: [label_key(lab) for lab in split[name]] for name in ("val", "test")},
        "synthetic": {"version": GENERATOR_VERSION, "config": cfg.to_json(), "complete": False},
    }
    _write_json(dataset, ds_path)
    stats = build_dataset_root(root, seed=cfg.seed)
    dataset["synthetic"]["complete"] = True
    _write_json(dataset, ds_path)
    timing = {"render_s": round(sum(r["render_s"] for r in results), 3),
              "encode_s": round(sum(r["encode_s"] for r in results), 3),
              "video_bytes": int(sum(r["bytes"] for r in results)),
              "workers": n_workers}
    return _summary(root, dataset, stats, True, time.perf_counter() - t0, timing)
