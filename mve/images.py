"""Images in and out of a model: the checkpoint's preprocessing, its inverse, PNG grids.

One implementation serves the Python API (:mod:`mve.api`), the local CLI commands and the HTTP
server (``serve_app`` decodes untrusted bytes under its limits, then calls :func:`preprocess`),
so a picture gets the same tensor whichever way it reaches the model.

:func:`to_rgb_arrays` accepts what users hold: PIL images, file paths, encoded PNG/JPEG bytes,
``uint8`` arrays ``[H, W, 3]`` and ``uint8`` tensors ``[3, H, W]`` or ``[N, 3, H, W]`` (the
layout torchvision's ``decode_image`` returns).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mve.data import denormalize_to_uint8, normalize
from mve.errors import UserError

__all__ = ["ImageInput", "to_rgb_arrays", "input_size", "preprocess", "to_uint8_hwc",
           "encode_png", "make_grid", "save_grid", "to_pil", "FORMATS"]

FORMATS = ("PNG", "JPEG")

#: One image, or several, in any form :func:`to_rgb_arrays` reads.
ImageInput = (str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor
              | Sequence[Any])


def _from_pil(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _from_encoded(data: bytes, what: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            return _from_pil(im)
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{what} is not a PNG or JPEG image Pillow can read ({exc})") from None


def _from_path(path: str | os.PathLike) -> np.ndarray:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    return _from_encoded(data, str(path))


def _from_array(a: np.ndarray | torch.Tensor) -> list[np.ndarray]:
    """uint8 ``[H, W, 3]`` arrays and ``[3, H, W]`` / ``[N, 3, H, W]`` tensors -> HWC arrays."""
    if isinstance(a, torch.Tensor):
        if a.dtype != torch.uint8:
            raise UserError(f"image tensors must be uint8 (0-255), got {a.dtype}; a float "
                            "tensor is already preprocessed: call the model on it directly")
        t = a.detach().cpu()
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4 or t.shape[1] not in (1, 3):
            raise UserError(f"an image tensor must be [3, H, W] or [N, 3, H, W], got "
                            f"{tuple(a.shape)}")
        t = t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t
        return list(t.permute(0, 2, 3, 1).contiguous().numpy())
    if a.dtype != np.uint8:
        raise UserError(f"image arrays must be uint8 [H, W, 3], got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim == 4:
        return [_from_array(x)[0] for x in a]
    if a.ndim != 3 or a.shape[2] != 3:
        raise UserError(f"an image array must be [H, W, 3], got {a.shape}")
    return [np.ascontiguousarray(a)]


def _one(item: Any) -> list[np.ndarray]:
    if isinstance(item, Image.Image):
        return [_from_pil(item)]
    if isinstance(item, str | os.PathLike):
        return [_from_path(item)]
    if isinstance(item, bytes | bytearray | memoryview):
        return [_from_encoded(bytes(item), "the image bytes")]
    if isinstance(item, np.ndarray | torch.Tensor):
        return _from_array(item)
    raise UserError(f"cannot read an image from a {type(item).__name__}: pass a path, PIL "
                    "image, PNG/JPEG bytes, uint8 array [H, W, 3] or uint8 tensor [3, H, W]")


def to_rgb_arrays(images: ImageInput) -> list[np.ndarray]:
    """RGB ``uint8 [H, W, 3]`` arrays of one image or a list of images in any accepted form."""
    items: Iterable[Any] = images if isinstance(images, list | tuple) else [images]
    out = [arr for item in items for arr in _one(item)]
    if not out:
        raise UserError("no image given")
    return out


def input_size(preprocessing: dict[str, Any]) -> tuple[int, int]:
    """``(H, W)`` from a checkpoint's preprocessing (an int means a square)."""
    size = preprocessing["input_size"]
    if isinstance(size, int):
        return size, size
    h, w = (int(v) for v in size)
    return h, w


def preprocess(images: Sequence[np.ndarray], preprocessing: dict[str, Any]) -> torch.Tensor:
    """RGB ``uint8 [H, W, 3]`` arrays of any size -> the model's float input ``[N, 3, H, W]``.

    Applies the checkpoint's own preprocessing: bilinear resize to ``input_size`` (as the
    training data pipeline does; images already at that size are untouched), ``/255`` and
    ``(x - mean) / std``.
    """
    h, w = input_size(preprocessing)
    batch = np.empty((len(images), h, w, 3), dtype=np.uint8)
    for i, arr in enumerate(images):
        if arr.shape[:2] != (h, w):
            arr = np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR))
        batch[i] = arr
    x = torch.from_numpy(batch).permute(0, 3, 1, 2)
    return normalize(x, preprocessing["mean"], preprocessing["std"])


def to_uint8_hwc(x: torch.Tensor, preprocessing: dict[str, Any]) -> np.ndarray:
    """Model-space ``[N, 3, H, W]`` -> ``uint8 [N, H, W, 3]`` by inverting the preprocessing."""
    pixels = denormalize_to_uint8(x.detach().float().cpu(), preprocessing["mean"],
                                  preprocessing["std"])
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def encode_png(image: np.ndarray) -> bytes:
    """``uint8 [H, W, 3]`` -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def make_grid(images: np.ndarray, *, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles ``uint8 [N, H, W, 3]`` into one image on a white background."""
    n, h, w, _ = images.shape
    ncol = max(1, min(n, nrow or math.ceil(math.sqrt(n))))
    rows = math.ceil(n / ncol)
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def _hwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``uint8 [N, 3, H, W]`` tensors (the Python API's images) or ``[N, H, W, 3]`` arrays."""
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu()
        t = t.unsqueeze(0) if t.ndim == 3 else t
        return t.permute(0, 2, 3, 1).contiguous().numpy()
    return images[None] if images.ndim == 3 else images


def to_pil(images: torch.Tensor | np.ndarray) -> list[Image.Image]:
    """``uint8`` images (``[N, 3, H, W]`` tensor or ``[N, H, W, 3]`` array) -> PIL images."""
    return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in _hwc(images)]


def save_grid(images: torch.Tensor | np.ndarray, path: str | os.PathLike, *,
              nrow: int | None = None) -> Path:
    """Writes ``uint8`` images as one PNG grid (``nrow`` images per row); returns the path."""
    out = Path(path)
    out.write_bytes(encode_png(make_grid(_hwc(images), nrow=nrow)))
    return out
