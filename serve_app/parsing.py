"""Request parsing and response rendering for the ``/v1`` routes (Starlette, no Ray).

Image routes accept three body forms:

- raw bytes with ``Content-Type: image/png``, ``image/jpeg`` or ``application/octet-stream``;
- ``multipart/form-data``: every file part is an image (in order), other parts are options;
- ``application/json``: ``{"images": [base64, ...]}`` (or ``"image": base64``) plus options.

Options may also come from the query string; body fields win. The body is capped at
``max_body_bytes``: a larger ``Content-Length`` is refused before reading, and the stream is
cut off as soon as it passes the limit.
"""

from __future__ import annotations

import base64
import json
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mve.images import encode_png, make_grid
from mve.inference import top_k
from serve_app.errors import ApiError
from serve_app.images import decode_base64
from serve_app.schemas import ImagesResponse, Limits

__all__ = ["read_body", "parse_images", "parse_params", "validate", "check_count", "wants_json",
           "classify_body", "render_images", "RAW_IMAGE_TYPES"]

RAW_IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "application/octet-stream")
_CONTROL_PARAMS = ("format",)
M = TypeVar("M", bound=BaseModel)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes with 413."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "invalid_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise ApiError(413, "payload_too_large",
                           f"the body is {int(declared)} bytes; the limit is {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "payload_too_large", f"the body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _query(request: Request) -> dict[str, Any]:
    return {k: v for k, v in request.query_params.items() if k not in _CONTROL_PARAMS}


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "invalid_json", "the JSON body must be an object")
    return obj


def _json_images(obj: dict[str, Any], limits: Limits) -> list[bytes]:
    images, one = obj.pop("images", None), obj.pop("image", None)
    if images is not None and one is not None:
        raise ApiError(400, "invalid_request", "give either 'images' or 'image', not both")
    if one is not None:
        images = [one]
    if images is None:
        return []
    if not isinstance(images, list):
        raise ApiError(400, "invalid_request", "'images' must be a list of base64 strings")
    if len(images) > limits.max_images:
        raise ApiError(400, "too_many_images",
                       f"{len(images)} images in one request; the limit is {limits.max_images}")
    return [decode_base64(s, index=i) for i, s in enumerate(images)]


async def _multipart(request: Request, body: bytes,
                     limits: Limits) -> tuple[list[bytes], dict[str, Any]]:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(
            max_files=limits.max_images, max_fields=32, max_part_size=64 * 1024)
    except Exception as exc:  # noqa: BLE001 - python-multipart/starlette raise several types
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        raise ApiError(400, "invalid_multipart",
                       f"cannot parse the multipart body: {detail}") from None
    images: list[bytes] = []
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            images.append(await value.read())
        else:
            fields[key] = value
    await form.close()
    return images, fields


async def parse_images(request: Request, limits: Limits) -> tuple[list[bytes], dict[str, Any]]:
    """Encoded images and option fields from any of the three body forms."""
    ctype = _content_type(request)
    body = await read_body(request, limits.max_body_bytes)
    fields = _query(request)
    if ctype in RAW_IMAGE_TYPES:
        return [body], fields
    if ctype == "multipart/form-data":
        images, form_fields = await _multipart(request, body, limits)
        return images, {**fields, **form_fields}
    if ctype == "application/json":
        obj = _json_object(body)
        images = _json_images(obj, limits)
        return images, {**fields, **obj}
    raise ApiError(415, "unsupported_media_type",
                   f"Content-Type {ctype or '(none)'} is not supported; send image/png, "
                   "image/jpeg, multipart/form-data or application/json")


async def parse_params(request: Request, limits: Limits) -> dict[str, Any]:
    """Options from the query string and an optional JSON body (routes without images)."""
    body = await read_body(request, limits.max_body_bytes)
    fields = _query(request)
    if not body.strip():
        return fields
    if _content_type(request) not in ("application/json", ""):
        raise ApiError(415, "unsupported_media_type", "send options as JSON or query parameters")
    return {**fields, **_json_object(body)}


def validate(model: type[M], fields: dict[str, Any]) -> M:
    """Validates option fields into ``model`` (422 ``invalid_parameter`` on failure)."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                        for e in exc.errors())
        raise ApiError(422, "invalid_parameter", msg) from None


def check_count(images: list[Any], expected: int, what: str) -> None:
    """Requires exactly ``expected`` images (400 otherwise)."""
    if len(images) != expected:
        raise ApiError(400, "wrong_image_count",
                       f"{what} takes exactly {expected} image(s), got {len(images)}")


def wants_json(request: Request) -> bool:
    """``?format=json`` or ``Accept: application/json`` (and not ``?format=png``)."""
    fmt = request.query_params.get("format")
    if fmt is not None:
        if fmt not in ("json", "png"):
            raise ApiError(422, "invalid_parameter", "format must be 'png' or 'json'")
        return fmt == "json"
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "image/png" not in accept


def classify_body(probs: np.ndarray, class_names: list[str], k: int,
                  checkpoint_id: str) -> bytes:
    """The ``/v1/classify`` JSON (:class:`~serve_app.schemas.ClassifyResponse`'s shape), built
    without pydantic: on the hot path, response validation costs more than the answer."""
    return json.dumps({"model": "classifier", "checkpoint_id": checkpoint_id,
                       "predictions": top_k(probs, class_names, k)},
                      separators=(",", ":")).encode()


def render_images(images: np.ndarray, checkpoint_id: str, *, as_json: bool,
                  nrow: int | None = None) -> Response:
    """PNG (one image, or a grid of several) or :class:`ImagesResponse` JSON."""
    headers = {"X-Model-Id": checkpoint_id, "X-Image-Count": str(len(images))}
    if as_json:
        body = ImagesResponse(checkpoint_id=checkpoint_id, height=int(images.shape[1]),
                              width=int(images.shape[2]),
                              images=[base64.b64encode(encode_png(im)).decode()
                                      for im in images])
        return JSONResponse(body.model_dump(), headers=headers)
    png = encode_png(images[0] if len(images) == 1 else make_grid(images, nrow=nrow))
    return Response(png, media_type="image/png", headers=headers)
