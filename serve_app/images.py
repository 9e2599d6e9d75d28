"""Safe image decoding with limits, base64, PNG encoding and the checkpoint's preprocessing.

Decoding is defensive: only PNG and JPEG decoders run (``Image.open(formats=...)``), the
header-declared size is checked against ``max_image_pixels`` *before* any pixel data is
decoded (``Image.open`` reads only the header), Pillow's own decompression-bomb limit is
lowered for the process, and truncated files are errors (``LOAD_TRUNCATED_IMAGES`` stays
off). Every failure is an :class:`~serve_app.errors.ApiError` with a 4xx status.

Pure Pillow/torch/mve; never imports Ray. Tested by ``tests/unit/test_serve_images.py``.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile

from mve.data import denormalize_to_uint8, normalize
from serve_app.errors import ApiError
from serve_app.schemas import Limits

__all__ = [
    "FORMATS", "harden_pillow", "decode_image", "decode_images", "decode_base64",
    "encode_png", "make_grid", "preprocess", "to_uint8_hwc", "input_size",
]

FORMATS = ("PNG", "JPEG")
_PILLOW_PIXEL_CAP = 32 * 1024 * 1024  # Pillow warns above this and raises above 2x
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)


def harden_pillow() -> None:
    """Lowers Pillow's process-wide decompression-bomb threshold and keeps truncation strict."""
    current = Image.MAX_IMAGE_PIXELS
    if current is None or current > _PILLOW_PIXEL_CAP:
        Image.MAX_IMAGE_PIXELS = _PILLOW_PIXEL_CAP
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode_image(data: bytes, limits: Limits, *, index: int = 0) -> np.ndarray:
    """Decodes one PNG/JPEG into an RGB ``uint8`` array ``[H, W, 3]``.

    Raises:
        ApiError: 400 ``invalid_image`` (empty, not PNG/JPEG, corrupt or truncated), 413
            ``image_too_large`` (declared pixels above ``limits.max_image_pixels``).
    """
    what = f"image {index}"
    if not data:
        raise ApiError(400, "invalid_image", f"{what} is empty")
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise ApiError(413, "image_too_large", f"{what} declares too many pixels") from None
    except (OSError, SyntaxError, ValueError, TypeError):
        raise ApiError(400, "invalid_image",
                       f"{what} is not a PNG or JPEG image Pillow can read") from None
    with im:
        w, h = im.size
        if w < 1 or h < 1 or w * h > limits.max_image_pixels:
            raise ApiError(413, "image_too_large",
                           f"{what} is {w}x{h} = {w * h} pixels; the limit is "
                           f"{limits.max_image_pixels}")
        try:
            im.load()
            rgb = im.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ApiError(400, "invalid_image",
                           f"{what} is corrupt or truncated: {exc}") from None
    return np.asarray(rgb, dtype=np.uint8)


def decode_images(blobs: Sequence[bytes], limits: Limits) -> list[np.ndarray]:
    """Decodes a request's images, enforcing the count and total-pixel limits."""
    if not blobs:
        raise ApiError(400, "no_images", "the request holds no image")
    if len(blobs) > limits.max_images:
        raise ApiError(400, "too_many_images",
                       f"{len(blobs)} images in one request; the limit is {limits.max_images}")
    out: list[np.ndarray] = []
    total = 0
    for i, blob in enumerate(blobs):
        arr = decode_image(blob, limits, index=i)
        total += arr.shape[0] * arr.shape[1]
        if total > limits.max_total_pixels:
            raise ApiError(413, "too_many_pixels",
                           f"the request decodes to more than {limits.max_total_pixels} pixels")
        out.append(arr)
    return out


def decode_base64(text: Any, *, index: int = 0) -> bytes:
    """Decodes standard base64 (a ``data:...;base64,`` prefix and whitespace are allowed)."""
    if not isinstance(text, str):
        raise ApiError(400, "invalid_base64", f"image {index} must be a base64 string")
    s = _DATA_URL.sub("", text.strip(), count=1)
    s = "".join(s.split())
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", f"image {index} is not valid base64") from None


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
