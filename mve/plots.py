"""PNG plots for reports: confusion matrices, learning curves and image grids.

Matplotlib is imported lazily inside each function and only its object-oriented API
(``Figure`` + ``FigureCanvasAgg``) is used, so importing this module is cheap and no global
pyplot state or backend selection is involved. Every function writes its PNG atomically (temp
file in the destination folder, then ``os.replace``) and creates missing parent folders.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mve.atomic import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["new_figure", "save_figure", "plot_confusion_matrix", "plot_image_grid",
           "plot_learning_curves"]

_SPLIT_PREFIXES = ("train_", "val_", "test_")
_SPLIT_STYLE = {"train": ("tab:blue", "-"), "val": ("tab:orange", "-"), "test": ("tab:green", "--")}


def new_figure(**kwargs: Any) -> Figure:
    """A pyplot-free Agg figure (no global state, no backend selection)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], **savefig_kwargs: Any) -> Path:
    """Saves ``fig`` as a PNG at ``path``, atomically."""
    savefig_kwargs.setdefault("bbox_inches", "tight")
    savefig_kwargs.setdefault("pad_inches", 0.1)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", **savefig_kwargs))


def plot_confusion_matrix(
    cm: torch.Tensor | Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Draws a confusion-matrix heatmap (rows = true class, columns = predicted class).

    Args:
        cm: ``[K, K]`` counts.
        class_names: ``K`` class names, used on both axes.
        path: Destination PNG path.
        normalize: Colour and annotate row-normalised percentages (else raw counts).
        title: Figure title; a sensible default is used when ``None``.

    Returns:
        The written path.

    Raises:
        ValueError: If ``cm`` is not square or ``class_names`` has the wrong length.
    """
    mat = torch.as_tensor(cm).detach().cpu().to(torch.float64)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1] or mat.shape[0] == 0:
        raise ValueError(f"confusion matrix must be square [K, K], got shape {tuple(mat.shape)}")
    k = mat.shape[0]
    names = [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"got {len(names)} class names for a {k}-class confusion matrix")
    data, vmax, cbar_label = _cell_values(mat, normalize)
    side = max(4.0, 0.55 * k + 2.5)
    fig = new_figure(figsize=(side + 1.0, side), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(data, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label(cbar_label)
    ax.set_xticks(range(k), labels=names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), labels=names)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    if title is None:
        title = "Confusion matrix" + (" (row-normalised %)" if normalize else " (counts)")
    ax.set_title(title)
    if k <= 30:  # beyond that the numbers would not be readable
        _annotate_cells(ax, data, vmax, normalize)
    return save_figure(fig, path)


def _cell_values(mat: torch.Tensor, normalize: bool) -> tuple[Any, float, str]:
    """The matrix to colour, its colour-scale maximum and the colour bar's label."""
    if normalize:
        rows = mat.sum(dim=1, keepdim=True)
        values = torch.where(rows > 0, 100 * mat / rows.clamp(min=1), torch.zeros_like(mat))
        return values.numpy(), 100.0, "% of true class"
    return mat.numpy(), max(float(mat.max()), 1.0), "count"


def _annotate_cells(ax: Any, data: Any, vmax: float, normalize: bool) -> None:
    k = data.shape[0]
    fontsize = 8 if k <= 12 else 6
    for i in range(k):
        for j in range(k):
            v = data[i, j]
            text = f"{v:.1f}" if normalize else f"{int(round(v))}"
            color = "white" if v > 0.55 * vmax else "black"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)


def _is_number(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.dtype.is_complex and v.dtype != torch.bool
    return isinstance(v, int | float) and not isinstance(v, bool)


def _split_key(key: str) -> tuple[str, str]:
    for prefix in _SPLIT_PREFIXES:
        if key.startswith(prefix) and len(key) > len(prefix):
            return key[len(prefix) :], prefix[:-1]
    return key, ""


_Series = dict[str, dict[str, tuple[list[float], list[float]]]]


def _collect_series(history: Sequence[Mapping[str, Any]]) -> _Series:
    """``{base metric: {split: (epochs, values)}}`` of the finite numbers in ``history``."""
    if len(history) == 0:
        raise ValueError("history is empty: nothing to plot")
    series: _Series = {}
    for idx, row in enumerate(history):
        if not isinstance(row, Mapping):
            raise ValueError(f"history[{idx}] must be a mapping, got {type(row).__name__}")
        epoch = row.get("epoch", idx + 1)
        x = float(epoch) if _is_number(epoch) else float(idx + 1)
        for key, val in row.items():
            if key == "epoch" or not _is_number(val) or not math.isfinite(float(val)):
                continue
            base, split = _split_key(str(key))
            xs, ys = series.setdefault(base, {}).setdefault(split, ([], []))
            xs.append(x)
            ys.append(float(val))
    if not series:
        raise ValueError("history contains no numeric metrics besides 'epoch'")
    return series


def _plot_metric(ax: Any, base: str, splits: dict[str, tuple[list[float], list[float]]]) -> None:
    """One subplot: a line per split of metric ``base`` (train first)."""
    from matplotlib.ticker import MaxNLocator

    values: list[float] = []
    for split, (xs, ys) in sorted(splits.items(), key=lambda kv: kv[0] != "train"):
        color, style = _SPLIT_STYLE.get(split, ("tab:purple", "-"))
        ax.plot(xs, ys, style, color=color, marker="o", markersize=3 if len(xs) > 1 else 6,
                label=f"{split}_{base}" if split else base)
        values.extend(ys)
    if base == "lr" and values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
    ax.set_title(base)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    xs_all = [x for xs, _ in splits.values() for x in xs]
    if max(xs_all) - min(xs_all) < 2:  # e.g. a single epoch: avoid a 0.96..1.04 axis
        ax.set_xlim(min(xs_all) - 1, max(xs_all) + 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def plot_learning_curves(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """Plots per-epoch metrics, one subplot per base metric with train/val(/test) lines.

    Keys are grouped by name with the ``train_``/``val_``/``test_`` prefix stripped (so
    ``train_loss`` and ``val_loss`` share a subplot); un-prefixed keys such as ``lr`` get their
    own subplot (``lr`` on a log scale when it spans > 10x). Non-numeric and non-finite values are
    skipped; keys may be missing from some epochs. x is ``epoch`` (1-based index if absent).

    Args:
        history: One mapping per epoch.
        path: Destination PNG path.
        title: Optional figure title.

    Returns:
        The written path.

    Raises:
        ValueError: If ``history`` is empty or holds no numeric metric.
    """
    series = _collect_series(history)
    bases = sorted(series, key=lambda b: (b != "loss", b == "lr"))  # loss first, lr last
    n = len(bases)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = new_figure(figsize=(4.2 * ncols, 3.2 * nrows), dpi=120, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, base in zip(axes, bases, strict=False):
        _plot_metric(ax, base, series[base])
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
    n, c, h, w = images.shape
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"images must be non-empty, got shape {tuple(images.shape)}")
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c} (shape {tuple(images.shape)})")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        out = images
    elif images.is_floating_point():
        out = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    elif images.dtype != torch.bool and not images.is_complex():
        out = images.clamp(0, 255).to(torch.uint8)
    else:
        raise ValueError(f"unsupported image dtype {images.dtype}")
    return out.expand(n, 3, h, w) if c == 1 else out


@dataclass(frozen=True)
class _GridLayout:
    """Where each tile of an image grid goes: ``ncol`` columns of ``scale``-times upscaled
    tiles, ``pad`` pixels apart, with a caption band below each tile when labelled."""

    n: int
    ncol: int
    th: int
    tw: int
    scale: int
    band: int
    pad: int = 2

    @classmethod
    def of(cls, n: int, ncol: int, h: int, w: int, *, labelled: bool) -> _GridLayout:
        scale = max(1, min(round(96 / max(h, w)), 2400 // (ncol * max(h, w))))
        return cls(n, ncol, h * scale, w * scale, scale, 16 if labelled else 0)

    @property
    def cell(self) -> tuple[int, int]:
        return self.th + self.band + self.pad, self.tw + self.pad

    def origin(self, i: int) -> tuple[int, int]:
        r, c = divmod(i, self.ncol)
        cell_h, cell_w = self.cell
        return self.pad + r * cell_h, self.pad + c * cell_w

    def tile(self, imgs: torch.Tensor) -> torch.Tensor:
        """The ``[3, H, W]`` uint8 grid of ``imgs`` on white."""
        cell_h, cell_w = self.cell
        rows = math.ceil(self.n / self.ncol)
        grid = torch.full((3, rows * cell_h + self.pad, self.ncol * cell_w + self.pad), 255,
                          dtype=torch.uint8)
        tiles = imgs.repeat_interleave(self.scale, dim=2).repeat_interleave(self.scale, dim=3)
        for i in range(self.n):
            y0, x0 = self.origin(i)
            grid[:, y0 : y0 + self.th, x0 : x0 + self.tw] = tiles[i]
        return grid

    def caption_at(self, i: int) -> tuple[float, float]:
        y0, x0 = self.origin(i)
        return x0 + self.tw / 2, y0 + self.th + self.band / 2


def plot_image_grid(
    images: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    nrow: int | None = None,
    title: str | None = None,
    labels: Sequence[str] | None = None,
) -> Path:
    """Tiles images into a grid, upscaled with nearest-neighbour so small tiles stay visible.

    Args:
        images: ``[N, C, H, W]`` with C in {1, 3}; uint8 (0..255) or float in [0, 1] (clamped).
        path: Destination PNG path.
        nrow: Images per row (like ``torchvision.utils.make_grid``); default ``ceil(sqrt(N))``.
        title: Optional title above the grid.
        labels: Optional ``N`` captions, drawn below each tile.

    Returns:
        The written path.

    Raises:
        ValueError: On a wrong tensor rank/channel count, or ``labels`` of the wrong length.
    """
    imgs = _to_uint8_images(images)
    n, _, h, w = imgs.shape
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} images")
    ncol = int(nrow) if nrow is not None else math.ceil(math.sqrt(n))
    if ncol < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    layout = _GridLayout.of(n, min(ncol, n), h, w, labelled=labels is not None)
    grid = layout.tile(imgs)
    gh, gw = grid.shape[1:]
    dpi = 100
    title_h = 30 if title else 0
    fig = new_figure(figsize=(gw / dpi, (gh + title_h) / dpi), dpi=dpi)
    ax = fig.add_axes((0.0, 0.0, 1.0, gh / (gh + title_h)))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    for i, label in enumerate(labels or []):
        x, y = layout.caption_at(i)
        ax.text(x, y, str(label), ha="center", va="center", fontsize=8, clip_on=True)
    if title:
        fig.text(
            0.5, 1.0 - (title_h / 2) / (gh + title_h), title, ha="center", va="center", fontsize=11
        )
    return save_figure(fig, path)
