"""Safe decoding of untrusted image bytes under the server's limits, and base64.

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
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from mve.images import FORMATS
from serve_app.errors import ApiError
from serve_app.schemas import Limits

__all__ = ["harden_pillow", "decode_image", "decode_images", "decode_base64"]

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
