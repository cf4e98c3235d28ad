"""Figures of the paper and of training runs (matplotlib, Agg backend, PNG).

* Figure 7 -- the warp cell's warped grid over consecutive clips of a video:
  :func:`collect_warp_offsets` (run a video's clips through the model and read
  the warp cell's predicted control-point displacements after every step),
  :func:`warp_sampling_grid` (the displacements -> deformed grid lines, with the
  cell's own polyharmonic spline) and :func:`plot_warp_grid`.
* Figure 8 -- query strip and reference strip with ground truth and the top box
  of each method: :func:`plot_results` (data) / :func:`load_results_data` (files).
* Figure 6 -- samples per combined label per split: :func:`plot_label_distribution`
  (the figure of :mod:`stvr.data.stats`).
* Training curves of run folders: :func:`read_log` / :func:`load_run_logs` and
  :func:`plot_training_curves`.

``plot_*`` functions take arrays and dictionaries and write a PNG of a
documented size (``figsize * dpi`` pixels, no tight bounding box); ``figure_*``
helpers take files (checkpoints, videos, run folders, dataset roots) and are
what ``stvr viz`` and the demo call. Every function returns the PNG path.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "collect_warp_offsets",
    "warp_sampling_grid",
    "plot_warp_grid",
    "figure_warp_grid",
    "plot_results",
    "load_results_data",
    "figure_results",
    "plot_label_distribution",
    "figure_labels",
    "read_log",
    "load_run_logs",
    "plot_training_curves",
    "figure_curves",
]

_GT_COLOR = "#2ca02c"
_METHOD_COLORS = ["#d62728", "#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def _figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path, dpi: int) -> Path:
    from .utils import atomic_open

    p = Path(path)
    with atomic_open(p, "wb") as f:                 # an older figure stays whole until this one is
        fig.savefig(f, dpi=dpi, format="png")
    return p


def _rgb(frame: np.ndarray) -> np.ndarray:
    a = np.asarray(frame)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"frames must be [H, W, 3] RGB, got {a.shape}")
    return a


# --------------------------------------------------------------------------- Figure 7
@torch.no_grad()
def collect_warp_offsets(model: torch.nn.Module, clips: torch.Tensor, device: str | torch.device = "cpu",
                         chunk_clips: int = 16) -> dict[str, Any]:
    """Run reference clips through the backbone and the warp cell; record the warps.

    Args:
        model: an :class:`stvr.model.STVRModel` whose ``cfg.cell`` is ``"warp"``.
        clips: ``[L, 3, T, S, S]`` float in [-1, 1], consecutive clips of one video.
        chunk_clips: clips per backbone call (the cell state is carried across chunks).

    Returns a dict of numpy arrays:
        ``control_points`` ``[N, 2]`` (row, col) in feature cells;
        ``offsets`` ``[L, N, 2]`` (dy, dx) feature cells predicted at each step
        (step ``t`` warps the state of clip ``t - 1`` into clip ``t``);
        ``warped`` ``[L]`` bool (False for step 0: there is no state to warp yet);
        ``feature_size`` ``(h, w)``; ``image_size`` S; ``order`` and
        ``num_boundary_points`` of the cell's spline.
    """
    cell = getattr(model, "cell", None)
    if getattr(model, "cfg", None) is None or model.cfg.cell != "warp" or cell is None:
        kind = getattr(getattr(model, "cfg", None), "cell", None)
        raise ValueError(f"the warped-grid figure needs a model with the warp cell, this one has cell={kind!r}")
    if clips.dim() != 5 or clips.shape[0] < 1:
        raise ValueError(f"clips must be [L >= 1, 3, T, S, S], got {tuple(clips.shape)}")
    was_training, was_recording = model.training, model.record_offsets
    model.eval()
    model.record_offsets = True
    model.last_offsets = []
    state = None
    try:
        for chunk in clips.split(chunk_clips):
            feats = model.run_backbone(chunk.to(device))[None]     # [1, n, C, h, w]
            _, state = model.propagate(feats, state)
        offsets = torch.cat([o[0:1] for o in model.last_offsets]).cpu().numpy()  # [L, N, 2]
        points = model.control_points.cpu().numpy()
        h, w = feats.shape[-2:]
    finally:
        model.record_offsets = was_recording
        model.last_offsets = []
        model.train(was_training)
    warped = np.ones(offsets.shape[0], dtype=bool)
    warped[0] = False
    return {"control_points": points.astype(np.float64), "offsets": offsets.astype(np.float64),
            "warped": warped, "feature_size": (int(h), int(w)), "image_size": int(model.cfg.image_size),
            "order": int(cell.order), "num_boundary_points": int(cell.num_boundary_points)}


def warp_sampling_grid(control_points: Any, offsets: Any, feature_size: tuple[int, int], *,
                       order: int = 2, num_boundary_points: int = 4, lines: int = 9,
                       samples: int = 64) -> np.ndarray:
    """The deformed grid of one warp step, in feature cells.

    The warp cell fits a polyharmonic spline through ``flow(dest_i) = offset_i`` at
    ``dest_i = source_i + offset_i`` (plus zero flow at ``4 * num_boundary_points``
    border points), and the warped state at ``p`` reads the previous state at
    ``p - flow(p)``. This returns, for ``lines`` horizontal and ``lines`` vertical
    straight lines ``p`` spanning the map, the sampled positions ``p - flow(p)``:
    straight lines when all offsets are 0.

    Args:
        control_points: ``[N, 2]`` source points (row, col).
        offsets: ``[N, 2]`` displacements (dy, dx).
        feature_size: ``(h, w)`` of the map.
    Returns ``[2, lines, samples, 2]`` float64 (row, col) points: ``[0]`` the
    horizontal lines (constant row before warping), ``[1]`` the vertical ones.
    """
    from .warp import boundary_locations, interpolate_spline

    h, w = int(feature_size[0]), int(feature_size[1])
    src = torch.as_tensor(np.asarray(control_points, dtype=np.float64)).reshape(-1, 2)
    off = torch.as_tensor(np.asarray(offsets, dtype=np.float64)).reshape(-1, 2)
    if src.shape != off.shape:
        raise ValueError(f"control_points {tuple(src.shape)} and offsets {tuple(off.shape)} differ")
    dst = src + off
    centres, values = dst, off
    if num_boundary_points > 0:
        bnd = boundary_locations(h, w, num_boundary_points, dtype=torch.float64)
        centres = torch.cat([dst, bnd])
        values = torch.cat([off, torch.zeros_like(bnd)])
    rows = np.linspace(0.0, h - 1.0, lines)
    cols = np.linspace(0.0, w - 1.0, lines)
    t_r = np.linspace(0.0, h - 1.0, samples)
    t_c = np.linspace(0.0, w - 1.0, samples)
    horiz = np.stack(np.broadcast_arrays(rows[:, None], t_c[None, :]), axis=-1)   # [lines, samples, 2]
    vert = np.stack(np.broadcast_arrays(t_r[None, :], cols[:, None]), axis=-1)
    pts = np.stack([horiz, vert])                                                 # [2, lines, samples, 2]
    if not np.any(off.numpy()):
        return pts
    q = torch.as_tensor(pts.reshape(1, -1, 2))
    flow = interpolate_spline(centres[None], values[None], q, order).numpy().reshape(pts.shape)
    return pts - flow


def plot_warp_grid(frames: Sequence[np.ndarray], control_points: Any, offsets: Any,
                   feature_size: tuple[int, int], path: str | Path, *, order: int = 2,
                   num_boundary_points: int = 4, titles: Sequence[str] | None = None,
                   lines: int = 9, columns: int | None = None, panel_size: float = 2.5,
                   dpi: int = 100, grid_color: str = "#ffd400") -> Path:
    """Figure 7: deformed grids drawn over consecutive clips.

    Args:
        frames: ``n`` RGB uint8 frames ``[H, W, 3]`` (e.g. each clip's middle frame).
        control_points: ``[N, 2]`` (row, col) feature cells.
        offsets: ``[n, N, 2]`` (dy, dx) of the warp into each frame's clip.
        feature_size: ``(h, w)`` feature map size; cell ``(r, c)`` is drawn at pixel
            ``((c + 0.5) W / w, (r + 0.5) H / h)``.
        titles: one per panel (default ``"clip k"``).
        columns: panels per row (default: all in one row).
    Draws the sampled grid (:func:`warp_sampling_grid`) and arrows from each control
    point to its destination. Figure size ``(columns * panel_size, rows * panel_size)``
    inches at ``dpi``. Returns ``path``.
    """
    n = len(frames)
    off = np.asarray(offsets, dtype=np.float64).reshape(n, -1, 2) if n else np.zeros((0, 0, 2))
    if n == 0:
        raise ValueError("plot_warp_grid needs at least one frame")
    cols = int(columns or n)
    rows_n = int(math.ceil(n / cols))
    fig = _figure((cols * panel_size, rows_n * panel_size))
    h, w = feature_size
    pts = np.asarray(control_points, dtype=np.float64).reshape(-1, 2)
    for k in range(n):
        img = _rgb(frames[k])
        H, W = img.shape[:2]
        sy, sx = H / h, W / w
        ax = fig.add_subplot(rows_n, cols, k + 1)
        ax.imshow(img, extent=(0, W, H, 0), interpolation="bilinear")
        grid = warp_sampling_grid(pts, off[k], (h, w), order=order,
                                  num_boundary_points=num_boundary_points, lines=lines)
        for family in grid:
            for line in family:
                ax.plot((line[:, 1] + 0.5) * sx, (line[:, 0] + 0.5) * sy, color=grid_color, lw=0.9)
        px, py = (pts[:, 1] + 0.5) * sx, (pts[:, 0] + 0.5) * sy
        ax.quiver(px, py, off[k, :, 1] * sx, off[k, :, 0] * sy, angles="xy", scale_units="xy", scale=1,
                  color="#e41a1c", width=0.012)
        ax.scatter(px, py, s=6, color="#e41a1c")
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(titles[k] if titles is not None else f"clip {k}", fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92, wspace=0.03, hspace=0.12)
    return _save(fig, path, dpi)


def figure_warp_grid(model: torch.nn.Module, video_path: str | Path, path: str | Path, *,
                     start: float = 0.0, num_clips: int = 6, device: str | torch.device = "cpu",
                     display_size: int | None = None, **plot_kwargs: Any) -> Path:
    """Figure 7 of a video file: ``num_clips + 1`` clips from ``start`` (s) run through
    the model; the warps into clips ``1 .. num_clips`` are drawn over those clips'
    middle frames (decoded at the video's own size, or ``display_size``)."""
    from .data import video

    size = int(model.cfg.image_size)
    clip_frames = int(model.cfg.clip_frames)
    fps = 24
    n = int(num_clips) + 1
    end = start + n * clip_frames / fps
    info = video.probe(video_path)
    if end > info.duration + 1e-3:
        raise ValueError(f"{video_path}: {n} clips from {start:g} s need {end:g} s; the video has "
                         f"{info.duration:.3f} s (lower --clips or --start)")
    frames = np.asarray(video.read_frames(video_path, start=start, end=end, fps=fps, size=size))
    clips = video.frames_to_clips(frames, clip_frames=clip_frames)
    rec = collect_warp_offsets(model, clips, device=device)
    show = np.asarray(video.read_frames(video_path, start=start, end=end, fps=fps, size=display_size))
    mids = [show[k * clip_frames + clip_frames // 2] for k in range(1, n)]
    titles = [f"clip {k} ({start + k * clip_frames / fps:.2f} s)" for k in range(1, n)]
    return plot_warp_grid(mids, rec["control_points"], rec["offsets"][1:], rec["feature_size"], path,
                          order=rec["order"], num_boundary_points=rec["num_boundary_points"],
                          titles=titles, **plot_kwargs)


# --------------------------------------------------------------------------- Figure 8
def _draw_box(ax, box: Sequence[float], W: int, H: int, color: str, lw: float = 1.6,
              ls: str = "-", label: str | None = None) -> None:
    from matplotlib.patches import Rectangle

    x1, y1, x2, y2 = (float(v) for v in box[:4])
    ax.add_patch(Rectangle((x1 * W, y1 * H), (x2 - x1) * W, (y2 - y1) * H, fill=False,
                           edgecolor=color, lw=lw, ls=ls))
    if label:
        ax.text(x1 * W, y1 * H, label, color="white", fontsize=6, va="bottom",
                bbox={"facecolor": color, "edgecolor": "none", "pad": 0.8, "alpha": 0.85})


def plot_results(query_frames: Sequence[np.ndarray], query_boxes: Any,
                 reference_frames: Sequence[np.ndarray], gt_boxes: Sequence[Any],
                 method_boxes: Mapping[str, Sequence[Any]], path: str | Path, *,
                 query_titles: Sequence[str] | None = None,
                 reference_titles: Sequence[str] | None = None, title: str | None = None,
                 panel_size: float = 2.0, dpi: int = 100) -> Path:
    """Figure 8: the query strip (top) and the reference strip (bottom).

    Args:
        query_frames: ``nq`` RGB frames; ``query_boxes`` ``[nq, 4]`` normalized xyxy.
        reference_frames: ``nr`` RGB frames.
        gt_boxes: ``nr`` arrays ``[G, 4]`` normalized ground-truth boxes (G may be 0).
        method_boxes: method name -> ``nr`` entries, each the method's top box
            ``[x1, y1, x2, y2, score]`` (or ``[x1, y1, x2, y2]``) or None.
        query_titles, reference_titles, title: panel and figure titles.
    Ground truth is drawn in green, each method in its own colour with its score.
    Figure size ``(max(nq, nr) * panel_size, 2 * panel_size + 0.4)`` inches at ``dpi``.
    """
    from matplotlib.lines import Line2D

    nq, nr = len(query_frames), len(reference_frames)
    if nq == 0 or nr == 0:
        raise ValueError("plot_results needs at least one query frame and one reference frame")
    qb = np.asarray(query_boxes, dtype=np.float64).reshape(-1, 4)
    if qb.shape[0] != nq:
        raise ValueError(f"{nq} query frames but {qb.shape[0]} query boxes")
    if len(gt_boxes) != nr:
        raise ValueError(f"{nr} reference frames but {len(gt_boxes)} ground-truth entries")
    for name, boxes in method_boxes.items():
        if len(boxes) != nr:
            raise ValueError(f"method {name!r}: {len(boxes)} boxes for {nr} reference frames")
    cols = max(nq, nr)
    fig = _figure((cols * panel_size, 2 * panel_size + 0.4))
    gs = fig.add_gridspec(2, cols)
    for k in range(nq):
        img = _rgb(query_frames[k])
        H, W = img.shape[:2]
        ax = fig.add_subplot(gs[0, k])
        ax.imshow(img)
        _draw_box(ax, qb[k], W, H, _GT_COLOR, lw=2.0)
        ax.set_title(query_titles[k] if query_titles else f"query {k}", fontsize=7)
        ax.axis("off")
    colors = {name: _METHOD_COLORS[i % len(_METHOD_COLORS)] for i, name in enumerate(method_boxes)}
    for k in range(nr):
        img = _rgb(reference_frames[k])
        H, W = img.shape[:2]
        ax = fig.add_subplot(gs[1, k])
        ax.imshow(img)
        for g in np.asarray(gt_boxes[k], dtype=np.float64).reshape(-1, 4):
            _draw_box(ax, g, W, H, _GT_COLOR, lw=2.0)
        for name, boxes in method_boxes.items():
            b = boxes[k]
            if b is None or len(b) == 0:
                continue
            label = f"{float(b[4]):.2f}" if len(b) > 4 else None
            _draw_box(ax, b, W, H, colors[name], lw=1.4, ls="--", label=label)
        ax.set_title(reference_titles[k] if reference_titles else f"reference {k}", fontsize=7)
        ax.axis("off")
    handles = [Line2D([], [], color=_GT_COLOR, lw=2, label="ground truth")]
    handles += [Line2D([], [], color=c, lw=1.4, ls="--", label=n) for n, c in colors.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.12, top=0.88 if title else 0.93,
                        wspace=0.04, hspace=0.25)
    return _save(fig, path, dpi)


def _top_box(clip_dets: Any) -> list[float] | None:
    d = np.asarray(clip_dets, dtype=np.float64).reshape(-1, 5) if clip_dets is not None and len(clip_dets) else None
    if d is None or d.shape[0] == 0:
        return None
    return d[int(np.argmax(d[:, 4]))].tolist()


def load_results_data(pair: Mapping[str, Any], root: str | Path,
                      detections: Mapping[str, Sequence[Any]], *, max_query: int = 4,
                      max_reference: int = 6, fps: int = 24, clip_frames: int = 8,
                      videos_dir: str | Path | None = None) -> dict[str, Any]:
    """Decode the frames of Figure 8 for one pair of a pair file.

    Query: the middle frame of up to ``max_query`` of its seconds (evenly spread)
    with that second's box. Reference: up to ``max_reference`` clips evenly spread
    over the reference, each shown at its middle frame with the ground truth of its
    second and each method's top-scoring box for that clip.

    Args:
        pair: one pair (API.md section 3 layout).
        root: the dataset root (``dataset.json`` maps video ids to files).
        detections: method name -> that pair's detections (per clip lists of
            ``[x1, y1, x2, y2, score]``, as in a detections file entry).
        fps, clip_frames: the model's frame rate and clip length (``data.fps``,
            ``model.clip_frames``); ``fps // clip_frames`` clips per second.
    Returns the keyword arguments of :func:`plot_results` (minus ``path``).
    """
    from .data import video
    from .data.pairs import load_dataset_json, resolve_video_path

    ds = load_dataset_json(root)
    q, r = pair["query"], pair["reference"]
    qpath = resolve_video_path(root, ds, q["id"], videos_dir)
    rpath = resolve_video_path(root, ds, r["id"], videos_dir)
    q_seconds = list(q["frames"])
    qi = np.unique(np.linspace(0, len(q_seconds) - 1, min(max_query, len(q_seconds))).round().astype(int))
    clips_per_second = fps // clip_frames
    n_clips = (int(r["end"]) - int(r["start"])) * clips_per_second
    for name, d in detections.items():
        if len(d) < n_clips:
            raise ValueError(f"detections of {name!r}: {len(d)} clips, the reference has {n_clips}")
    ri = np.unique(np.linspace(0, n_clips - 1, min(max_reference, n_clips)).round().astype(int))

    def frame_at(path: Path, t: float) -> np.ndarray:
        f = np.asarray(video.read_frames(path, start=t, end=t + 1.0 / fps, fps=fps))
        if f.shape[0] == 0:
            raise ValueError(f"{path}: no frame at {t:.3f} s")
        return f[0]

    q_frames = [frame_at(qpath, q_seconds[i] + 0.5) for i in qi]
    q_boxes = np.asarray(q["boxes"], dtype=np.float64)[qi]
    r_times = [int(r["start"]) + (j * clip_frames + clip_frames // 2) / fps for j in ri]
    r_frames = [frame_at(rpath, t) for t in r_times]
    gt = [np.asarray(r["gt"][j // clips_per_second], dtype=np.float64).reshape(-1, 4) for j in ri]
    methods = {name: [_top_box(d[j]) for j in ri] for name, d in detections.items()}
    return {"query_frames": q_frames, "query_boxes": q_boxes, "reference_frames": r_frames,
            "gt_boxes": gt, "method_boxes": methods,
            "query_titles": [f"query {q_seconds[i]} s" for i in qi],
            "reference_titles": [f"{t:.2f} s" for t in r_times]}


def figure_results(pairs_path: str | Path, pair_index: int, detections: Mapping[str, str | Path],
                   path: str | Path, *, root: str | Path | None = None, label_names: Mapping[str, str] | None = None,
                   **kwargs: Any) -> Path:
    """Figure 8 from files: a pair file, one detections file per method (API.md
    section 4 layout) and the dataset root (default: the pair file's ``../..``
    when it holds ``dataset.json``, else its folder)."""
    from .data.pairs import load_dataset_json, load_pairs
    from .predict import load_detections

    pairs_path = Path(pairs_path)
    pairs = load_pairs(pairs_path)
    if not 0 <= pair_index < len(pairs):
        raise ValueError(f"--pair {pair_index}: {pairs_path} has {len(pairs)} pairs")
    if root is None:
        root = next((d for d in (pairs_path.parent.parent, pairs_path.parent) if (d / "dataset.json").exists()),
                    None)
        if root is None:
            raise FileNotFoundError(f"no dataset.json next to {pairs_path}; pass --data ROOT")
    dets = {}
    for name, f in detections.items():
        d = load_detections(f)
        if len(d) != len(pairs):
            raise ValueError(f"{f}: {len(d)} pairs of detections, {pairs_path} has {len(pairs)}")
        dets[name] = d[pair_index]
    pair = pairs[pair_index]
    data = load_results_data(pair, root, dets, **kwargs)
    key = "+".join(str(v) for v in pair["query"]["label"])
    names = dict(label_names or load_dataset_json(root).get("label_names", {}))
    title = f"pair {pair_index}: {names.get(key, key)}"
    return plot_results(path=path, title=title, **data)


# --------------------------------------------------------------------------- Figure 6
def plot_label_distribution(stats: Mapping[str, Any], path: str | Path, **kwargs: Any) -> Path:
    """Figure 6 (samples per combined label per split): :func:`stvr.data.stats.plot_label_distribution`."""
    from .data.stats import plot_label_distribution as _plot

    return _plot(stats, path, **kwargs)


def figure_labels(source: str | Path, path: str | Path, **kwargs: Any) -> Path:
    """Figure 6 from a dataset root (its ``stats.json``, label names from ``dataset.json``)
    or from a ``stats.json`` file."""
    from .data.stats import load_stats

    src = Path(source)
    stats_path = src / "stats.json" if src.is_dir() else src
    if not stats_path.exists():
        raise FileNotFoundError(f"{stats_path} does not exist (build the dataset root with `stvr data` first)")
    stats = load_stats(stats_path)
    names = None
    ds = stats_path.parent / "dataset.json"
    if ds.exists():
        import json

        names = json.loads(ds.read_text()).get("label_names") or None
    return plot_label_distribution(stats, path, label_names=names, **kwargs)


# --------------------------------------------------------------------------- training curves
def read_log(path: str | Path) -> dict[str, np.ndarray]:
    """A CSV log (header + numeric rows) as columns of float64 (empty cells -> NaN)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"log {p} does not exist")
    with p.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{p}: empty log (no header)")
    header = rows[0]
    cols: dict[str, list[float]] = {k: [] for k in header}
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(f"{p} line {lineno}: {len(row)} fields, header has {len(header)}")
        for k, v in zip(header, row):
            try:
                cols[k].append(float(v) if v != "" else math.nan)
            except ValueError:
                raise ValueError(f"{p} line {lineno}: {k}={v!r} is not a number") from None
    return {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}


def load_run_logs(run_dir: str | Path) -> dict[str, dict[str, np.ndarray] | None]:
    """``{"train": columns of train_log.csv, "val": columns of val_log.csv or None}``
    of a run folder written by :func:`stvr.train.train`."""
    d = Path(run_dir)
    if not (d / "train_log.csv").exists():
        raise FileNotFoundError(f"{d}: no train_log.csv (is this a run folder of `stvr train`?)")
    val = d / "val_log.csv"
    return {"train": read_log(d / "train_log.csv"), "val": read_log(val) if val.exists() else None}


def plot_training_curves(runs: Mapping[str, Mapping[str, Mapping[str, Any] | None]], path: str | Path, *,
                         figsize: tuple[float, float] = (11.0, 7.0), dpi: int = 100) -> Path:
    """Training curves of one or several runs (2 x 2 panels).

    Args:
        runs: run name -> ``{"train": columns, "val": columns or None}`` (as
            :func:`load_run_logs`): train columns ``step``, ``loss`` and optionally
            ``rpn_objectness``, ``rpn_box``, ``box_classifier``, ``box_reg``, ``box_iou``, ``lr``;
            val columns ``step`` and ``mAP@0.3`` / ``mAP@0.5`` / ``mAP@0.7``.
    Panels: total loss; loss components; learning rate; validation frame-mAP
    (solid 0.5, dashed 0.3, dotted 0.7). Figure size ``figsize`` inches at ``dpi``.
    """
    if not runs:
        raise ValueError("plot_training_curves needs at least one run")
    fig = _figure(figsize)
    ax_loss, ax_comp, ax_lr, ax_val = (fig.add_subplot(2, 2, i) for i in range(1, 5))
    comps = {"rpn_objectness": "-", "rpn_box": "--", "box_classifier": "-.", "box_reg": ":",
             "box_iou": (0, (5, 1, 1, 1))}
    any_val = False
    for i, (name, logs) in enumerate(runs.items()):
        color = _METHOD_COLORS[i % len(_METHOD_COLORS)]
        tr = logs.get("train") or {}
        if "step" not in tr or "loss" not in tr:
            raise ValueError(f"run {name!r}: the train log needs 'step' and 'loss' columns")
        step = np.asarray(tr["step"], dtype=np.float64)
        ax_loss.plot(step, np.asarray(tr["loss"], dtype=np.float64), color=color, lw=1.2, label=name)
        for k, ls in comps.items():
            if k in tr and not np.isnan(np.asarray(tr[k], dtype=np.float64)).all():
                ax_comp.plot(step, np.asarray(tr[k], dtype=np.float64), color=color, ls=ls, lw=1.0,
                             label=k if len(runs) == 1 else f"{name}: {k}")
        if "lr" in tr:
            ax_lr.plot(step, np.asarray(tr["lr"], dtype=np.float64), color=color, lw=1.2, label=name)
        va = logs.get("val")
        if va and "step" in va and len(va["step"]):
            any_val = True
            for key, ls in (("mAP@0.5", "-"), ("mAP@0.3", "--"), ("mAP@0.7", ":")):
                if key in va:
                    ax_val.plot(va["step"], va[key], color=color, ls=ls, marker="o", ms=3, lw=1.2,
                                label=f"{name} {key}" if len(runs) > 1 else key)
    ax_loss.set_title("training loss")
    ax_comp.set_title("loss components")
    ax_lr.set_title("learning rate")
    ax_val.set_title("validation frame-mAP")
    if not any_val:
        ax_val.text(0.5, 0.5, "no validation log", ha="center", va="center", transform=ax_val.transAxes)
    for ax in (ax_loss, ax_comp, ax_lr, ax_val):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax_val.set_ylim(0, 1)
    fig.tight_layout()
    return _save(fig, path, dpi)


def figure_curves(run_dirs: Sequence[str | Path], path: str | Path, labels: Sequence[str] | None = None,
                  **kwargs: Any) -> Path:
    """Training curves of run folders (labels default to the folder names)."""
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    names = list(labels) if labels is not None else [Path(d).name or str(d) for d in run_dirs]
    runs = {n: load_run_logs(d) for n, d in zip(names, run_dirs)}
    return plot_training_curves(runs, path, **kwargs)
