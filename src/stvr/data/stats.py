"""Statistics of a reorganized data set and the label-distribution figure (paper Fig. 6).

``stats.json`` layout::

    {"splits": {"train": {"labels", "tubelets", "seconds", "videos"},
                "val":   {"labels", "labels_with_pairs", "pairs", "query_seconds",
                          "reference_seconds", "gt_boxes", "videos"},
                "test":  {...same as val}},
     "labels": {"11+74+80": {"split": "test", "samples": n, ...}, ...},
     "label_names": {"11+74+80": "sit+listen to+watch", ...}}   (optional)

``samples`` is the number of training tubelets (train labels) or of pairs
(val/test labels) of the label; seconds are counted the same way (tubelet
seconds; query seconds for pairs).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Sequence

from ..utils import atomic_open
from .ava import Tubelet, label_key

__all__ = ["compute_stats", "load_stats", "format_stats", "plot_label_distribution"]

SPLIT_COLORS = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868"}


def compute_stats(
    train_tubelets: Sequence[Tubelet],
    pairs: Mapping[str, Sequence[dict]],
    label_split: Mapping[str, Sequence[Sequence[int]]] | None = None,
    label_names: Mapping[str, str] | None = None,
) -> dict:
    """Counts per split and per combined label.

    Args:
        train_tubelets: the training tubelets.
        pairs: ``{"val": pairs, "test": pairs}`` (object form).
        label_split: held-out labels; labels of the split without any pair are
            listed with 0 samples.
        label_names: optional readable names keyed by label key.
    """
    labels: dict[str, dict] = {}
    for t in train_tubelets:
        e = labels.setdefault(label_key(t.label), {"split": "train", "samples": 0, "tubelets": 0, "seconds": 0})
        e["samples"] += 1
        e["tubelets"] += 1
        e["seconds"] += len(t.seconds)
    splits: dict[str, dict] = {
        "train": {
            "labels": len(labels),
            "tubelets": len(train_tubelets),
            "seconds": int(sum(len(t.seconds) for t in train_tubelets)),
            "videos": len({t.video_id for t in train_tubelets}),
        }
    }
    for name in sorted(pairs, key=lambda n: (n != "val", n)):
        plist = pairs[name]
        keys = [label_key(lab) for lab in (label_split or {}).get(name, [])]
        for key in keys:
            labels.setdefault(key, {"split": name, "samples": 0, "pairs": 0, "query_seconds": 0, "reference_seconds": 0})
        for p in plist:
            key = label_key(p["query"]["label"])
            e = labels.setdefault(key, {"split": name, "samples": 0, "pairs": 0, "query_seconds": 0, "reference_seconds": 0})
            if e["split"] != name:
                raise ValueError(f"label {key} occurs in split {e['split']!r} and in {name!r}")
            e["samples"] += 1
            e["pairs"] += 1
            e["query_seconds"] += len(p["query"]["frames"])
            e["reference_seconds"] += int(p["reference"]["end"]) - int(p["reference"]["start"])
        with_pairs = {label_key(p["query"]["label"]) for p in plist}
        splits[name] = {
            "labels": len(set(keys) | with_pairs),
            "labels_with_pairs": len(with_pairs),
            "pairs": len(plist),
            "query_seconds": int(sum(len(p["query"]["frames"]) for p in plist)),
            "reference_seconds": int(sum(p["reference"]["end"] - p["reference"]["start"] for p in plist)),
            "gt_boxes": int(sum(len(g) for p in plist for g in p["reference"]["gt"])),
            "videos": len({p["reference"]["id"] for p in plist} | {p["query"]["id"] for p in plist}),
        }
    out = {"splits": splits, "labels": dict(sorted(labels.items(), key=lambda kv: (kv[1]["split"], -kv[1]["samples"], kv[0])))}
    if label_names:
        out["label_names"] = {k: str(label_names[k]) for k in out["labels"] if k in label_names}
    return out


def load_stats(path: str | Path) -> dict:
    """Read a ``stats.json``."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None


def format_stats(stats: Mapping, top: int = 10) -> str:
    """Human-readable summary: one line per split, then the largest labels of each split."""
    lines = []
    for name, s in stats["splits"].items():
        items = ", ".join(f"{k}={v}" for k, v in s.items())
        lines.append(f"{name:5s}: {items}")
    names = stats.get("label_names", {})
    for split in stats["splits"]:
        rows = [(k, e) for k, e in stats["labels"].items() if e["split"] == split]
        rows.sort(key=lambda kv: (-kv[1]["samples"], kv[0]))
        if not rows:
            continue
        lines.append(f"{split} labels (top {min(top, len(rows))} of {len(rows)} by samples):")
        for k, e in rows[:top]:
            nm = f"  {names[k]}" if k in names else ""
            lines.append(f"  {k:>18s} {e['samples']:6d}{nm}")
    return "\n".join(lines)


def _short(name: str) -> str:
    """Drop parenthesized remarks of AVA names: ``"talk to (e.g., self, ...)" -> "talk to"``."""
    return re.sub(r"\s*\([^)]*\)", "", name)


def plot_label_distribution(
    stats: Mapping,
    path: str | Path,
    label_names: Mapping[str, str] | None = None,
    max_train_labels: int = 40,
    log_scale: bool = True,
) -> Path:
    """Bar chart of samples per combined label, colour-coded by split (paper Fig. 6).

    Bars are grouped train / val / test, each group sorted by count (largest
    first); only the ``max_train_labels`` largest training labels are drawn (the
    title says how many were left out). Tick labels are readable names from
    ``label_names`` or ``stats["label_names"]`` when available, else label keys.
    Writes a PNG to ``path`` (matplotlib, Agg backend) and returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = dict(stats.get("label_names", {}))
    if label_names:
        names.update(label_names)
    bars: list[tuple[str, str, int]] = []
    left_out = 0
    for split in ("train", "val", "test"):
        rows = sorted(
            ((k, e["samples"]) for k, e in stats["labels"].items() if e["split"] == split),
            key=lambda kv: (-kv[1], kv[0]),
        )
        if split == "train" and len(rows) > max_train_labels:
            left_out = len(rows) - max_train_labels
            rows = rows[:max_train_labels]
        bars += [(split, k, n) for k, n in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width = max(6.0, 0.22 * len(bars) + 1.5)
    fig = Figure(figsize=(width, 7.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(bars))
    ax.bar(list(xs), [max(n, 0) for _, _, n in bars], color=[SPLIT_COLORS.get(s, "gray") for s, _, _ in bars], width=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([_short(names.get(k, k)) for _, k, _ in bars], rotation=90, fontsize=6)
    if log_scale and any(n > 0 for _, _, n in bars):
        ax.set_yscale("log")
    ax.set_ylabel("samples (train: tubelets, val/test: pairs)")
    title = "Samples per combined label"
    if left_out:
        title += f" ({left_out} smaller training labels not shown)"
    ax.set_title(title)
    present = [s for s in ("train", "val", "test") if any(b[0] == s for b in bars)]
    ax.legend(handles=[Patch(color=SPLIT_COLORS[s], label=s) for s in present])
    ax.set_xlim(-0.6, len(bars) - 0.4)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:              # an older figure stays whole until this one is
        fig.savefig(f, dpi=120, format="png")
    return path
