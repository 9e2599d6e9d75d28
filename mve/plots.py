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
    if normalize:
        rows = mat.sum(dim=1, keepdim=True)
        values = torch.where(rows > 0, 100 * mat / rows.clamp(min=1), torch.zeros_like(mat))
        vmax, cbar_label = 100.0, "% of true class"
    else:
        values = mat
        vmax, cbar_label = max(float(values.max()), 1.0), "count"
    data = values.numpy()

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
    if k <= 30:
        fontsize = 8 if k <= 12 else 6
        for i in range(k):
            for j in range(k):
                v = data[i, j]
                text = f"{v:.1f}" if normalize else f"{int(round(v))}"
                color = "white" if v > 0.55 * vmax else "black"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)
    return save_figure(fig, path)


def _is_number(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.dtype.is_complex and v.dtype != torch.bool
    return isinstance(v, int | float) and not isinstance(v, bool)


def _split_key(key: str) -> tuple[str, str]:
    for prefix in _SPLIT_PREFIXES:
        if key.startswith(prefix) and len(key) > len(prefix):
            return key[len(prefix) :], prefix[:-1]
    return key, ""


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
    if len(history) == 0:
        raise ValueError("history is empty: nothing to plot")
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for idx, row in enumerate(history):
        if not isinstance(row, Mapping):
            raise ValueError(f"history[{idx}] must be a mapping, got {type(row).__name__}")
        epoch = row.get("epoch", idx + 1)
        x = float(epoch) if _is_number(epoch) else float(idx + 1)
        for key, val in row.items():
            if key == "epoch" or not _is_number(val):
                continue
            y = float(val)
            if not math.isfinite(y):
                continue
            base, split = _split_key(str(key))
            xs, ys = series.setdefault(base, {}).setdefault(split, ([], []))
            xs.append(x)
            ys.append(y)
    if not series:
        raise ValueError("history contains no numeric metrics besides 'epoch'")
    from matplotlib.ticker import MaxNLocator

    bases = sorted(series, key=lambda b: (b != "loss", b == "lr"))  # loss first, lr last
    n = len(bases)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = new_figure(figsize=(4.2 * ncols, 3.2 * nrows), dpi=120, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, base in zip(axes, bases, strict=False):
        positives = []
        for split, (xs, ys) in sorted(series[base].items(), key=lambda kv: kv[0] != "train"):
            color, style = _SPLIT_STYLE.get(split, ("tab:purple", "-"))
            label = f"{split}_{base}" if split else base
            ax.plot(
                xs,
                ys,
                style,
                color=color,
                marker="o",
                markersize=3 if len(xs) > 1 else 6,
                label=label,
            )
            positives.extend(ys)
        if base == "lr" and positives and min(positives) > 0:
            if max(positives) / min(positives) > 10:
                ax.set_yscale("log")
        ax.set_title(base)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        xs_all = [x for xs, _ in series[base].values() for x in xs]
        if max(xs_all) - min(xs_all) < 2:  # e.g. a single epoch: avoid a 0.96..1.04 axis
            ax.set_xlim(min(xs_all) - 1, max(xs_all) + 1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
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
    ncol = min(ncol, n)
    rows = math.ceil(n / ncol)
    scale = max(1, min(round(96 / max(h, w)), 2400 // (ncol * max(h, w))))
    th, tw = h * scale, w * scale
    pad = 2
    band = 16 if labels is not None else 0
    cell_h, cell_w = th + band + pad, tw + pad
    grid = torch.full((3, rows * cell_h + pad, ncol * cell_w + pad), 255, dtype=torch.uint8)
    tiles = imgs.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    for i in range(n):
        r, c = divmod(i, ncol)
        y0, x0 = pad + r * cell_h, pad + c * cell_w
        grid[:, y0 : y0 + th, x0 : x0 + tw] = tiles[i]
    gh, gw = grid.shape[1:]
    dpi = 100
    title_h = 30 if title else 0
    fig = new_figure(figsize=(gw / dpi, (gh + title_h) / dpi), dpi=dpi)
    ax = fig.add_axes((0.0, 0.0, 1.0, gh / (gh + title_h)))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    if labels is not None:
        for i, label in enumerate(labels):
            r, c = divmod(i, ncol)
            x = pad + c * cell_w + tw / 2
            y = pad + r * cell_h + th + band / 2
            ax.text(x, y, str(label), ha="center", va="center", fontsize=8, clip_on=True)
    if title:
        fig.text(
            0.5, 1.0 - (title_h / 2) / (gh + title_h), title, ha="center", va="center", fontsize=11
        )
    return save_figure(fig, path)
