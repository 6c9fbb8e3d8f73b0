"""Figures for people to read: training curves, the test confusion of the worst classes, and the
per-pair attention figures of ``fgattn-visualize`` (`fgattn.cli.visualize`).

matplotlib is optional (``pip install "fgattn[plots]"``): `require_matplotlib` raises one clear
ImportError without it. Figures are `matplotlib.figure.Figure` objects built without pyplot (no
global state, no GUI backend), so drawing is safe inside a training process; `save` writes a PNG
atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

INSTALL_HINT = 'pip install "fgattn[plots]"'
DPI = 100
PANEL_IN = 5.0  # side of one image panel in inches: 500 px at DPI (at least 448 after layout)

# What each training loss term is, by its key after "train_loss_" (fgattn's models' outputs).
LOSS_TERMS = {
    "cls": "cross-entropy; PCA-Net: the branches' sum",
    "cls_o": "CE, original images",
    "cls_w": "CE, co-attended (eq. 2)",
    "cls_e": "CE, erased images (eq. 5)",
    "cls_we": "CE, co-attended erased",
    "cls_cci": "CE on CCI features",
    "center": "center loss",
    "cont": "contrastive (eq. 7-8)",
}


def require_matplotlib() -> None:
    """Raise ImportError, naming the install command, when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            f"fgattn's figures need matplotlib, which is not installed: {INSTALL_HINT}"
        ) from None


def new_figure(width_in: float, height_in: float) -> Figure:
    """A constrained-layout figure of the given size in inches (at `DPI`), without pyplot."""
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path``, atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- training curves
def _series(history: Sequence[dict[str, float]], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["epoch"]), float(r[key])) for r in history if key in r]
    pts = [(e, v) for e, v in pts if math.isfinite(v)]
    return [e for e, _ in pts], [v for _, v in pts]


def _epoch_axis(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _keys(history: Sequence[dict[str, float]]) -> list[str]:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    return keys


def _loss_label(key: str) -> str:
    term = key.removeprefix("train_loss_")
    return f"{key} ({LOSS_TERMS[term]})" if term in LOSS_TERMS else key


def loss_figure(history: Sequence[dict[str, float]]) -> Figure:
    """The losses of a run in three panels: total training loss, each training loss term (log
    scale when their ranges differ by more than 10×), and the test cross-entropy.

    Args:
        history: one dict per epoch with "epoch" and the summary.csv columns.
    """
    keys = _keys(history)
    panels = [
        ("training loss (total, minimised)", ["train_loss"]),
        ("training loss terms", [k for k in keys if k.startswith("train_loss_")]),
        ("test loss (cross-entropy)", [k for k in keys if k.endswith("test_loss")]),
    ]
    panels = [(t, [k for k in ks if k in keys]) for t, ks in panels]
    panels = [(t, ks) for t, ks in panels if ks]
    fig = new_figure(4.6 * max(len(panels), 1), 3.8)
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, (title, ks) in zip(axes, panels, strict=False):
        values = []
        for key in ks:
            epochs, ys = _series(history, key)
            values += ys
            ax.plot(epochs, ys, marker="o", markersize=3, label=_loss_label(key))
        positive = [v for v in values if v > 0]
        if len(ks) > 1 and len(positive) == len(values) and max(values) > 10 * min(values):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel("loss")
        _epoch_axis(ax)
        _legend_below(ax, fontsize=7)
    fig.suptitle("Losses per epoch (summary.csv)")
    return fig


def accuracy_figure(history: Sequence[dict[str, float]]) -> Figure:
    """Training accuracy and test top-1 / top-5 (and their EMA counterparts) per epoch, in %."""
    keys = [k for k in _keys(history) if k.endswith(("top1", "top5", "_acc"))]
    fig = new_figure(6.0, 4.0)
    ax = fig.subplots()
    for key in keys:
        epochs, ys = _series(history, key)
        ax.plot(epochs, ys, marker="o", markersize=3, label=key)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy per epoch (summary.csv)")
    _epoch_axis(ax)
    _legend_below(ax, fontsize=8, ncol=3)
    return fig


def _legend_below(ax: Axes, fontsize: float, ncol: int = 1) -> None:
    """The legend under the axes, outside the plotting area, so it never covers a curve
    (constrained layout makes room for it)."""
    ax.legend(fontsize=fontsize, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=ncol,
              frameon=False)  # fmt: skip


# ----------------------------------------------------------------------------- confusion
def worst_classes(confusion: np.ndarray, k: int) -> list[int]:
    """The (up to) ``k`` classes of lowest test accuracy (recall), among classes with test images;
    ties by class index. ``confusion[i, j]`` counts test images of class i predicted as j."""
    confusion = np.asarray(confusion)
    count = confusion.sum(axis=1)
    present = np.flatnonzero(count > 0)
    recall = np.diag(confusion)[present] / count[present]
    order = np.lexsort((present, recall))  # by recall, then index
    return [int(c) for c in present[order][:k]]


def confusion_figure(
    confusion: np.ndarray, classes: Sequence[str], k: int = 10, title: str = ""
) -> Figure:
    """Rows: the ``k`` classes of lowest test accuracy; columns: those classes, then the other
    classes their images are most often taken for (up to ``k``), then all remaining classes in one
    column. Cells: % of the row class's test images (colour) and the image count (text).

    Args:
        confusion: (K, K) counts, rows true class, columns predicted class.
        classes: the K class names.
        k: how many classes to show.
        title: first line of the figure title (e.g. the run and epoch).
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    rows = worst_classes(confusion, k)
    received = confusion[rows].sum(axis=0)
    received[rows] = 0
    extra = [int(c) for c in np.argsort(-received, kind="stable")[:k] if received[c] > 0]
    cols = rows + extra
    shown = confusion[np.ix_(rows, cols)]
    rest = confusion[rows].sum(axis=1) - shown.sum(axis=1)
    counts = np.concatenate([shown, rest[:, None]], axis=1)
    total = np.maximum(confusion[rows].sum(axis=1, keepdims=True), 1)
    percent = 100.0 * counts / total

    longest = max(len(classes[c]) for c in cols) + 12  # characters of the longest tick label
    cell = 0.5  # inches
    fig = new_figure(3.0 + 0.075 * longest + cell * (len(cols) + 1),
                     1.2 + 0.055 * longest + cell * len(rows))  # fmt: skip
    ax = fig.subplots()
    im = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    for (i, j), n in np.ndenumerate(counts):
        if n:
            color = "white" if percent[i, j] > 60 else "black"
            ax.text(j, i, str(n), ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(cols) + 1), [classes[c] for c in cols] + ["all others"])
    for label in ax.get_xticklabels():
        label.set(rotation=50, ha="right", rotation_mode="anchor")
    ax.set_yticks(
        range(len(rows)),
        [f"{classes[c]} ({100 * confusion[c, c] / total[i, 0]:.0f} % of {total[i, 0]})"
         for i, c in enumerate(rows)],
    )  # fmt: skip
    ax.axvline(len(rows) - 0.5, color="grey", lw=1)
    ax.axvline(len(cols) - 0.5, color="grey", lw=1)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (its test accuracy, of n images)")
    fig.colorbar(im, ax=ax, label="% of the true class's test images", shrink=0.9)
    heading = f"Test confusion of the {len(rows)} classes of lowest accuracy"
    fig.suptitle(f"{title}\n{heading}" if title else heading)
    return fig


# ----------------------------------------------------------------------------- attention figures
@dataclass
class MapColumn:
    """One column of a `pair_figure`: a map per image, drawn over the image.

    Attributes:
        title: column heading (what the map is, with its equation).
        maps: one (h, w) array per row, any resolution (bilinearly upsampled to the image).
        kind: "heat" (values ≥ 0, sequential colours), "signed" (diverging colours around 0) or
            "mask" (1 kept, 0 erased: the erased region is shaded and outlined).
        label: colour-bar label.
        notes: optional text under each row's panel (e.g. a per-image value).
        limits: fixed (low, high) of the colour scale; None: the range of the column's maps
            (symmetric around 0 for "signed").
    """

    title: str
    maps: Sequence[np.ndarray]
    kind: str = "heat"
    label: str = ""
    notes: Sequence[str] | None = None
    limits: tuple[float, float] | None = None


def _gray(image: np.ndarray) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114])


def _draw_map(ax: Axes, image: np.ndarray, m: np.ndarray, kind: str, norm, cmap: str):
    h, w = image.shape[:2]
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)
    if kind == "mask":
        ax.imshow(image, interpolation="nearest")
        erased = np.zeros((*m.shape, 4))
        erased[..., 3] = 0.65 * (m < 0.5)
        ax.imshow(erased, extent=extent, interpolation="nearest")
        ax.contour(m, levels=[0.5], colors="cyan", linewidths=1.5, extent=extent, origin="upper")
        return None
    # The image in grey, dimmed, so the colours belong to the map alone.
    ax.imshow(0.25 + 0.5 * _gray(image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    return ax.imshow(
        m, cmap=cmap, norm=norm, alpha=0.6, extent=extent, interpolation="bilinear",
        interpolation_stage="data",
    )  # fmt: skip


def _norm(maps: Sequence[np.ndarray], kind: str):
    """(Normalize over the finite values of ``maps``, colour map name) for a map ``kind``."""
    from matplotlib.colors import Normalize

    cmap = "RdBu_r" if kind == "signed" else "inferno"
    values = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps])
    values = values[np.isfinite(values)]
    if kind == "signed":
        bound = float(np.abs(values).max()) if values.size else 1.0
        return Normalize(-bound or -1.0, bound or 1.0), cmap
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    return Normalize(lo, hi if hi > lo else lo + 1e-12), cmap


def _draw_column(fig: Figure, axes, images: Sequence[np.ndarray], col: MapColumn) -> None:
    """One `MapColumn` down ``axes`` (one per image), with its colour bar(s) below."""
    from matplotlib.colors import Normalize

    shared = None
    if col.limits is not None:
        shared = Normalize(*col.limits), ("RdBu_r" if col.kind == "signed" else "inferno")
    for i, (ax, image) in enumerate(zip(axes, images, strict=True)):
        m = np.asarray(col.maps[i])
        norm, cmap = shared or _norm([m], col.kind)
        mappable = _draw_map(ax, image, m, col.kind, norm, cmap)
        if col.notes:
            ax.set_xlabel(col.notes[i], fontsize=11)
        if mappable is not None and shared is None:
            _colorbar(fig, mappable, ax, col.label)
    if mappable is not None and shared is not None:
        _colorbar(fig, mappable, list(axes), col.label)
    axes[0].set_title(col.title, fontsize=12)


def _colorbar(fig: Figure, mappable, ax, label: str) -> None:
    from matplotlib.ticker import MaxNLocator

    bar = fig.colorbar(mappable, ax=ax, location="bottom", shrink=0.8, aspect=25, label=label)
    bar.ax.xaxis.set_major_locator(MaxNLocator(5))
    _plain_ticks(bar.ax.xaxis)


def _plain_ticks(axis) -> None:
    """Each tick label written out in full ("1.0002", "3e-05"), so matplotlib never adds an
    offset or multiplier text at the end of the axis (over a colour bar's label)."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.5g}"))


def pair_figure(
    images: Sequence[np.ndarray],
    row_labels: Sequence[str],
    columns: Sequence[MapColumn],
    title: str = "",
) -> Figure:
    """One figure for a pair of images: a row per image, the image first, then one column per
    map drawn transparently over the dimmed image. Each map has its own colour scale and bar
    (so neither image's map washes out), except columns with fixed ``limits``, which share one.
    Panels are ≥ 448 px.

    Args:
        images: (H, W, 3) arrays in [0, 1], one per row.
        row_labels: text left of each row (e.g. class and prediction).
        columns: the maps, see `MapColumn`.
        title: figure title.
    """
    n_rows, n_cols = len(images), 1 + len(columns)
    fig = new_figure(PANEL_IN * n_cols + 0.8, (PANEL_IN + 1.1) * n_rows + 1.2)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i, (image, label) in enumerate(zip(images, row_labels, strict=True)):
        axes[i, 0].imshow(image, interpolation="nearest")
        axes[i, 0].set_ylabel(label, fontsize=12)
    axes[0, 0].set_title("image", fontsize=12)
    for j, col in enumerate(columns, start=1):
        _draw_column(fig, axes[:, j], images, col)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        # The trailing blank line keeps the title clear of the two-line column titles, which
        # constrained layout places a few pixels too high next to colour bars.
        fig.suptitle(f"{title}\n", fontsize=13)
    return fig


def channel_matrix_figure(
    log_weights: np.ndarray,
    energy: np.ndarray,
    top: int = 32,
    max_channels: int = 512,
    title: str = "",
) -> Figure:
    """A C × C channel attention matrix W made readable: channels sorted by their energy in the
    image, one matrix entry per screen pixel or more, colours on a log scale (log10 W).

    Panels: (a) W over the ``max_channels`` most energetic channels, clipped at 10⁻⁶ of its largest
    entry; (b) the ``top`` most energetic channels on their own (unclipped) scale, labelled with
    their indices; (c) how much of Y = W X each channel j supplies (the column mean of W) by
    energy rank, which shows whether the softmax reads from active channels or from silent /
    complementary ones.

    Args:
        log_weights: (C, C) natural log of the row-stochastic W (e.g. ``log_softmax``: entries
            far below float precision stay finite).
        energy: (C,) ‖X_c‖² of each channel over the feature map.
        top: channels in panel (b).
        max_channels: channels in panel (a) (all when C is smaller).
        title: figure title.
    """
    log_w, energy = np.asarray(log_weights, np.float64) / np.log(10), np.asarray(energy, np.float64)
    c = log_w.shape[0]
    order = np.argsort(-energy, kind="stable")
    sorted_w = log_w[np.ix_(order, order)]
    n_a, n_b = min(c, max_channels), min(c, top)

    fig = new_figure(18.0, 7.5)
    ax_a, ax_b, ax_c = fig.subplots(1, 3, width_ratios=[1.25, 1.0, 1.0])
    block = sorted_w[:n_a, :n_a]
    high = float(block.max())
    im = ax_a.imshow(block.clip(high - 6), vmin=high - 6, vmax=high, cmap="viridis",
                     interpolation="nearest")  # fmt: skip
    what = "all" if n_a == c else f"the {n_a} most energetic of"
    ax_a.set_title(f"(a) W over {what} {c} channels,\nsorted by energy ‖X_c‖² (descending)")
    ax_a.set_xlabel("channel j (energy rank)")
    ax_a.set_ylabel("channel i (energy rank)")
    bar = fig.colorbar(im, ax=ax_a, label="log₁₀ W_ij (clipped 6 decades below the max)",
                       shrink=0.8)  # fmt: skip
    _plain_ticks(bar.ax.yaxis)
    im = ax_b.imshow(sorted_w[:n_b, :n_b], cmap="viridis", interpolation="nearest")
    ticks = range(0, n_b, max(1, n_b // 16))
    ax_b.set_xticks(ticks, [str(order[t]) for t in ticks], rotation=90, fontsize=7)
    ax_b.set_yticks(ticks, [str(order[t]) for t in ticks], fontsize=7)
    ax_b.set_title(f"(b) the {n_b} most energetic channels\n(ticks: channel index)")
    _plain_ticks(fig.colorbar(im, ax=ax_b, label="log₁₀ W_ij", shrink=0.8).ax.yaxis)
    _supply_panel(ax_c, np.exp(log_weights)[:, order], energy[order])
    if title:
        fig.suptitle(title, fontsize=13)
    return fig


def _supply_panel(ax: Axes, weights: np.ndarray, energy: np.ndarray) -> None:
    """Column means of W (how much of Y = W X each channel supplies) by energy rank, silent
    channels (‖X_j‖ = 0 in this image) marked; columns of ``weights`` in descending energy."""
    supply = weights.mean(axis=0)
    rank = np.arange(len(energy))
    silent = energy <= 0
    ax.scatter(rank[~silent], supply[~silent], s=6, label="active channels")
    if silent.any():
        ax.scatter(rank[silent], supply[silent], s=6, color="tab:orange",
                   label="silent in this image (‖X_j‖ = 0)")  # fmt: skip
    ax.axhline(1.0 / len(energy), color="grey", ls="--", lw=1, label="uniform 1/C")
    ax.set_yscale("log")
    ax.set_xlabel("channel j (energy rank)")
    ax.set_ylabel("mean_i W_ij: share of Y = W X read from channel j")
    ax.set_title("(c) which channels SCI reads\n(column means of W)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
