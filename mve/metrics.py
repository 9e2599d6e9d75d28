"""Evaluation metrics: confusion matrix, classification summaries and image-quality measures.

Everything here is pure PyTorch, device-agnostic and returns plain Python / CPU values so the
results can be logged or JSON-serialised directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "PSNR_MAX_DB",
    "ConfusionMatrix",
    "MeanAccumulator",
    "accuracy_from_logits",
    "bits_per_dim",
    "classification_metrics",
    "per_class_table",
    "psnr",
    "ssim",
]

PSNR_MAX_DB = 100.0
"""PSNR value reported for identical images (mse == 0), and the upper clamp for all PSNRs."""


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Element-wise ``num / den`` that yields 0.0 wherever ``den == 0``."""
    den_safe = torch.where(den == 0, torch.ones_like(den), den)
    return torch.where(den == 0, torch.zeros_like(num), num / den_safe)


class ConfusionMatrix:
    """Accumulates a ``num_classes x num_classes`` int64 confusion matrix.

    Rows index the true class, columns the predicted class.

    Args:
        num_classes: Number of classes ``K`` (>= 1).
    """

    def __init__(self, num_classes: int) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self._cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        """Adds a batch of predictions.

        Args:
            preds: 1-D integer class predictions ``[N]`` (any device). As a convenience a 2-D
                ``[N, K]`` score/logit tensor is also accepted and reduced with ``argmax``.
            targets: 1-D integer true labels ``[N]``.

        Raises:
            ValueError: On shape mismatch, non-integer dtypes or labels outside ``[0, K)``.
        """
        preds = torch.as_tensor(preds)
        targets = torch.as_tensor(targets)
        if preds.ndim == 2 and preds.shape[1] == self.num_classes:
            preds = preds.argmax(dim=1)
        if preds.ndim != 1 or targets.ndim != 1 or preds.shape != targets.shape:
            raise ValueError(
                f"preds and targets must be 1-D tensors of equal length, got "
                f"{tuple(preds.shape)} and {tuple(targets.shape)}"
            )
        for name, t in (("preds", preds), ("targets", targets)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")
        if preds.numel() == 0:
            return
        targets = targets.to(device=preds.device, dtype=torch.int64)
        preds = preds.to(torch.int64)
        k = self.num_classes
        lo = torch.minimum(preds.min(), targets.min()).item()
        hi = torch.maximum(preds.max(), targets.max()).item()
        if lo < 0 or hi >= k:
            raise ValueError(f"class indices must lie in [0, {k}), got values in [{lo}, {hi}]")
        counts = torch.bincount(targets * k + preds, minlength=k * k)
        self._cm += counts.reshape(k, k).cpu()

    def merge(self, other: ConfusionMatrix) -> None:
        """Adds the counts of another confusion matrix with the same number of classes."""
        if not isinstance(other, ConfusionMatrix) or other.num_classes != self.num_classes:
            raise ValueError("can only merge a ConfusionMatrix with the same num_classes")
        self._cm += other._cm

    def reset(self) -> None:
        """Zeroes all counts."""
        self._cm.zero_()

    @property
    def matrix(self) -> torch.Tensor:
        """A copy of the int64 ``[K, K]`` counts, on CPU."""
        return self._cm.clone()

    def compute(self, class_names: Sequence[str] | None = None) -> dict:
        """Summarises the counts; see :func:`classification_metrics`.

        Args:
            class_names: Names for the ``K`` classes; defaults to ``"0" .. "K-1"``.
        """
        names = (
            list(class_names)
            if class_names is not None
            else [str(i) for i in range(self.num_classes)]
        )
        return classification_metrics(self._cm, names)


def classification_metrics(cm: torch.Tensor, class_names: Sequence[str]) -> dict:
    """Computes summary metrics from a confusion matrix (rows = true, cols = predicted).

    Args:
        cm: ``[K, K]`` non-negative counts (tensor or nested sequence).
        class_names: ``K`` class names.

    Returns:
        JSON-serialisable dict with ``accuracy`` (overall, 0..1), ``mean_class_accuracy``
        (macro recall), ``macro_f1``, ``macro_precision``, ``per_class``
        (``{name: {"accuracy": recall, "precision", "f1", "support"}}``),
        ``confusion_matrix`` (``list[list[int]]``) and ``num_samples``. Zero divisions (a class
        without support or without predictions) give 0.0, never NaN.

    Raises:
        ValueError: If ``cm`` is not square or ``class_names`` has the wrong length.
    """
    cm = torch.as_tensor(cm).detach().cpu().to(torch.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square [K, K], got {tuple(cm.shape)}")
    names = [str(n) for n in class_names]
    if len(names) != cm.shape[0]:
        raise ValueError(f"got {len(names)} class names for a {cm.shape[0]}-class confusion matrix")
    cmf = cm.to(torch.float64)
    tp = cmf.diagonal()
    support = cmf.sum(dim=1)
    predicted = cmf.sum(dim=0)
    total = cmf.sum()
    recall = _safe_div(tp, support)
    precision = _safe_div(tp, predicted)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    per_class = {
        name: {
            "accuracy": float(recall[i]),
            "precision": float(precision[i]),
            "f1": float(f1[i]),
            "support": int(cm[i].sum()),
        }
        for i, name in enumerate(names)
    }
    return {
        "accuracy": float(_safe_div(tp.sum(), total)),
        "mean_class_accuracy": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "macro_precision": float(precision.mean()),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "num_samples": int(cm.sum()),
    }


def per_class_table(metrics: dict, *, digits: int = 1) -> str:
    """Renders :func:`classification_metrics` output as a Markdown table plus summary lines.

    Args:
        metrics: Dict from :func:`classification_metrics` (optionally with a ``"loss"`` key).
        digits: Decimal places for the percentages.

    Returns:
        The table (one row per class, percentages), a blank line, then overall accuracy,
        mean per-class accuracy, macro F1 and (if present) the loss.
    """
    header = ["Class", "Accuracy (%)", "Precision (%)", "F1 (%)", "Support"]
    rows = [
        [
            name,
            f"{100 * m['accuracy']:.{digits}f}",
            f"{100 * m['precision']:.{digits}f}",
            f"{100 * m['f1']:.{digits}f}",
            str(int(m["support"])),
        ]
        for name, m in metrics["per_class"].items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    lines = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(r) for r in rows]
    lines += [
        "",
        f"Overall accuracy: {100 * metrics['accuracy']:.{digits}f}%",
        f"Mean per-class accuracy: {100 * metrics['mean_class_accuracy']:.{digits}f}%",
        f"Macro F1: {100 * metrics['macro_f1']:.{digits}f}%",
    ]
    if metrics.get("loss") is not None:
        lines.append(f"Loss: {float(metrics['loss']):.4f}")
    return "\n".join(lines)


def accuracy_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy (fraction 0..1) of ``[N, K]`` logits against ``[N]`` labels; 0.0 if N == 0."""
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected logits [N, K] and targets [N], got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if targets.numel() == 0:
        return 0.0
    correct = (logits.argmax(dim=1) == targets.to(logits.device)).sum().item()
    return correct / targets.numel()


def _as_image_batch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim == 3:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W] or [C, H, W], got {tuple(x.shape)}")
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    return x.to(dtype), y.to(device=x.device, dtype=dtype)


def psnr(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Per-image peak signal-to-noise ratio in dB: ``10 * log10(data_range**2 / mse)``.

    Identical images (mse == 0, i.e. infinite PSNR) are reported as ``PSNR_MAX_DB`` (100 dB),
    and every value is clamped to at most 100 dB, so averages stay finite.

    Args:
        x, y: Images ``[B, C, H, W]`` (or ``[C, H, W]``) on the same scale.
        data_range: Maximum possible value range (1.0 for [0, 1] floats, 255 for uint8).

    Returns:
        ``[B]`` float tensor of PSNRs.
    """
    x, y = _as_image_batch(x, y)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    max_db = torch.full_like(mse, PSNR_MAX_DB)
    val = 10 * torch.log10(data_range**2 / torch.where(mse == 0, torch.ones_like(mse), mse))
    return torch.where(mse == 0, max_db, torch.minimum(val, max_db))


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device):
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Per-image structural similarity (Wang et al. 2004) with a Gaussian window.

    Uses K1=0.01, K2=0.03 and population (Gaussian-weighted) statistics. Local statistics are
    computed with a *valid* convolution (no padding): this matches
    ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=...)``, which crops the border of the SSIM map.
    For 32x32 inputs and an 11x11 window the map is 22x22. SSIM is computed per channel and
    averaged over channels and positions.

    Args:
        x, y: Images ``[B, C, H, W]`` (or ``[C, H, W]``) with ``H, W >= window_size``.
        data_range: Value range of the images (1.0 for [0, 1] floats, 255 for uint8).
        window_size: Side of the (odd) Gaussian window.
        sigma: Standard deviation of the Gaussian window.

    Returns:
        ``[B]`` float tensor of SSIM values (1.0 for identical images).
    """
    x, y = _as_image_batch(x, y)
    if torch.is_autocast_enabled(x.device.type):  # bf16 convolutions make the variances garbage
        with torch.autocast(device_type=x.device.type, enabled=False):
            return ssim(x.float(), y.float(), data_range=data_range, window_size=window_size,
                        sigma=sigma)
    b, c, h, w = x.shape
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd integer, got {window_size}")
    if h < window_size or w < window_size:
        raise ValueError(
            f"images ({h}x{w}) are smaller than the {window_size}x{window_size} window"
        )
    win = _gaussian_window(window_size, sigma, x.dtype, x.device)
    return _ssim_map(x, y, win.expand(c, 1, window_size, window_size).contiguous(),
                     data_range).flatten(1).mean(dim=1)


def _ssim_map(x: torch.Tensor, y: torch.Tensor, win: torch.Tensor,
              data_range: float) -> torch.Tensor:
    """The SSIM map of ``[B, C, H, W]`` images under the per-channel window ``win``."""
    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=x.shape[1])

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    # (Co)variances are shift-invariant: centre each image channel on its mean first to avoid
    # catastrophic cancellation in E[x^2] - E[x]^2 (matters in float32).
    mx = x.mean(dim=(2, 3), keepdim=True)
    my = y.mean(dim=(2, 3), keepdim=True)
    xc, yc = x - mx, y - my
    fx, fy = filt(xc), filt(yc)
    mu_x, mu_y = fx + mx, fy + my
    sxx = filt(xc * xc) - fx**2
    syy = filt(yc * yc) - fy**2
    sxy = filt(xc * yc) - fx * fy
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return num / den


def bits_per_dim(nll_nats_per_image: torch.Tensor | float, num_dims: int) -> float:
    """Converts a per-image negative log-likelihood in nats to bits per dimension.

    Args:
        nll_nats_per_image: NLL in nats per image (a tensor of several images is averaged).
        num_dims: Dimensions per image, e.g. ``3 * 32 * 32``.

    Returns:
        ``nll / (num_dims * ln 2)``.
    """
    if num_dims <= 0:
        raise ValueError(f"num_dims must be positive, got {num_dims}")
    if isinstance(nll_nats_per_image, torch.Tensor):
        nll = float(nll_nats_per_image.detach().double().mean())
    else:
        nll = float(nll_nats_per_image)
    return nll / (num_dims * math.log(2))


class MeanAccumulator:
    """Sample-weighted running means of named scalars.

    Example:
        >>> acc = MeanAccumulator()
        >>> acc.update({"loss": 0.5}, n=32)
        >>> acc.compute()
        {'loss': 0.5}

    Keys need not appear in every update; each key is averaged over the samples it was given for.
    """

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def update(self, values: Mapping[str, float | torch.Tensor], n: int = 1) -> None:
        """Adds per-sample-mean ``values`` measured over ``n`` samples."""
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        if n == 0:
            return
        for key, v in values.items():
            fv = float(v.detach().item()) if isinstance(v, torch.Tensor) else float(v)
            self._sums[key] = self._sums.get(key, 0.0) + fv * n
            self._counts[key] = self._counts.get(key, 0) + n

    def merge(self, other: MeanAccumulator) -> None:
        """Adds the sums and counts of another accumulator."""
        for key, s in other._sums.items():
            self._sums[key] = self._sums.get(key, 0.0) + s
            self._counts[key] = self._counts.get(key, 0) + other._counts[key]

    def reset(self) -> None:
        """Forgets all values."""
        self._sums.clear()
        self._counts.clear()

    @property
    def count(self) -> int:
        """Samples seen (the largest count of any key; 0 when empty)."""
        return max(self._counts.values(), default=0)

    def compute(self) -> dict[str, float]:
        """Returns ``{name: weighted mean}`` for every key seen so far."""
        return {k: self._sums[k] / self._counts[k] for k in self._sums}
