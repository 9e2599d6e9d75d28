"""Batched tensor augmentation and normalisation (no per-image Python loops).

All functions take ``[B, 3, H, W]`` batches (uint8 or floating, on any device) and draw their
random numbers from a CPU :class:`torch.Generator`, so results are identical on CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["AugmentConfig", "augment_batch", "cutout", "denormalize_to_uint8", "normalize",
           "random_crop", "random_flip"]

_PAD_MODES = ("reflect", "zeros")


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation settings.

    Attributes:
        crop_padding: random-crop translation in pixels (pad then crop back); 0 disables it.
        pad_mode: ``"reflect"`` or ``"zeros"`` padding for the crop.
        flip: random horizontal flip with probability 0.5.
        alternating_flip: airbench's alternating flip (needs ``flip``): each image gets a fixed
            seeded random flip on even epochs and exactly the opposite on odd epochs.
        cutout: side of a zeroed square (centre uniform over the image, clipped); 0 disables it.
    """

    crop_padding: int = 4
    pad_mode: str = "reflect"
    flip: bool = True
    alternating_flip: bool = False
    cutout: int = 0

    def __post_init__(self) -> None:
        for name in ("crop_padding", "cutout"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"AugmentConfig.{name} must be a non-negative int, got {value!r}")
        if self.pad_mode not in _PAD_MODES:
            raise ValueError(f"AugmentConfig.pad_mode must be one of {_PAD_MODES}, "
                             f"got {self.pad_mode!r}")
        if self.alternating_flip and not self.flip:
            raise ValueError("AugmentConfig.alternating_flip=True needs flip=True")


def _stats(values: Sequence[float] | torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).to(x.device).flatten()
    if t.numel() not in (1, x.shape[1]):
        raise ValueError(f"{name} needs 1 or {x.shape[1]} values, got {t.numel()}")
    return t.view(1, -1, 1, 1)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Map a 0..255 batch (uint8, or float on that scale) to float32 ``(x/255 - mean) / std``."""
    m, s = _stats(mean, images, "mean"), _stats(std, images, "std")
    return (images.to(torch.float32) / 255.0 - m) / s


def denormalize_to_uint8(x: torch.Tensor, mean: Sequence[float],
                         std: Sequence[float]) -> torch.Tensor:
    """Invert :func:`normalize`: ``round((x*std + mean) * 255)`` clamped to uint8."""
    m, s = _stats(mean, x, "mean"), _stats(std, x, "std")
    return ((x.to(torch.float32) * s + m) * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def _check(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a [B, C, H, W] batch, got shape {tuple(x.shape)}")


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator,
                pad_mode: str = "reflect") -> torch.Tensor:
    """Pad each image by ``padding`` and crop back to ``H x W`` at a random offset (batched)."""
    _check(x)
    if pad_mode not in _PAD_MODES:
        raise ValueError(f"pad_mode must be one of {_PAD_MODES}, got {pad_mode!r}")
    if padding == 0:
        return x
    b, _, h, w = x.shape
    if pad_mode == "reflect" and padding >= min(h, w):
        raise ValueError(f"reflect padding {padding} must be smaller than the image ({h}x{w})")
    shifts = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(x.device)
    rows = shifts[0, :, None] + torch.arange(h, device=x.device) - padding  # [B, H] source rows
    cols = shifts[1, :, None] + torch.arange(w, device=x.device) - padding  # [B, W] source cols
    if pad_mode == "reflect":
        rows = torch.where(rows < 0, -rows, torch.where(rows >= h, 2 * (h - 1) - rows, rows))
        cols = torch.where(cols < 0, -cols, torch.where(cols >= w, 2 * (w - 1) - cols, cols))
        valid = None
    else:
        valid = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[
            :, None, None, :]
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    out = x.gather(2, rows[:, None, :, None].expand(b, x.shape[1], h, w))
    out = out.gather(3, cols[:, None, None, :].expand(b, x.shape[1], h, w))
    return out if valid is None else out * valid.to(out.dtype)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 0.5."""
    _check(x)
    mask = torch.rand(x.shape[0], generator=generator) < 0.5
    return _flip(x, mask)


def _flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(device=x.device, dtype=torch.bool).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(-1), x)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a ``size x size`` square per image, centred uniformly at random and clipped."""
    _check(x)
    if size <= 0:
        return x
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=generator).to(x.device)
    cx = torch.randint(0, w, (b,), generator=generator).to(x.device)
    y0, x0 = cy - size // 2, cx - size // 2
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_y = (ys >= y0[:, None]) & (ys < (y0 + size)[:, None])  # [B, H]
    in_x = (xs >= x0[:, None]) & (xs < (x0 + size)[:, None])  # [B, W]
    return x.masked_fill(in_y[:, None, :, None] & in_x[:, None, None, :], 0)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator, *,
                  flip_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Apply flip, then random crop, then cutout according to ``cfg``.

    Args:
        x: uint8 or floating batch ``[B, 3, H, W]``.
        cfg: augmentation settings.
        generator: CPU generator all random draws come from.
        flip_mask: bool ``[B]``; if given, exactly these images are flipped (used for the
            alternating flip) instead of a random flip.
    """
    _check(x)
    if flip_mask is not None:
        if flip_mask.shape != (x.shape[0],):
            raise ValueError(f"flip_mask must have shape ({x.shape[0]},), got "
                             f"{tuple(flip_mask.shape)}")
        x = _flip(x, flip_mask)
    elif cfg.flip:
        x = random_flip(x, generator)
    x = random_crop(x, cfg.crop_padding, generator, cfg.pad_mode)
    return cutout(x, cfg.cutout, generator)
