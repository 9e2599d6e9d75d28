"""KServe Open Inference Protocol (v2) REST: request parsing and response encoding.

Implements the JSON form and Triton's binary tensor extension (``Inference-Header-Content-Length``),
which ``tritonclient.http`` uses by default, plus gzip/deflate request bodies with a bounded
decompressor. Each model accepts exactly one input:

- ``input``: ``FP32 [N, 3, H, W]`` already in the model's input space, i.e. resized to the
  checkpoint's ``input_size`` and normalised with its mean/std (what Triton users send to a
  raw PyTorch model). Shape ``H, W`` must match; values must be finite.
- ``image``: ``BYTES [N]`` (or ``[N, 1]``), each element an encoded PNG/JPEG; the server applies
  the checkpoint's preprocessing. In the JSON form, BYTES elements are base64 strings.

Outputs: classifier ``probabilities`` ``FP32 [N, K]`` and ``label`` ``BYTES [N]`` (top-1 class
name); VAE ``reconstruction`` ``FP32 [N, 3, H, W]`` (model space). Pure numpy; no Ray.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mve.images import input_size
from mve.models import get_spec
from serve_app.errors import ApiError
from serve_app.images import decode_base64
from serve_app.schemas import Limits

__all__ = [
    "INPUT_TENSOR", "INPUT_IMAGE", "HEADER_LENGTH", "OUTPUTS", "InferRequest", "OutTensor",
    "parse_infer_request", "encode_infer_response", "model_metadata", "decompress_body",
    "outputs_for",
]

INPUT_TENSOR = "input"
INPUT_IMAGE = "image"
HEADER_LENGTH = "Inference-Header-Content-Length"
# By task (mve.models.ModelSpec.task), so a new family of a known task needs nothing here.
OUTPUTS = {"classification": ("probabilities", "label"), "generation": ("reconstruction",)}
_INPUT_TYPES = {INPUT_TENSOR: "FP32", INPUT_IMAGE: "BYTES"}


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_inference_request", message)


@dataclass
class InferRequest:
    """A parsed ``/infer`` request: a float tensor or encoded images, and output choices."""

    id: str | None
    tensor: np.ndarray | None = None
    images: list[bytes] | None = None
    outputs: list[str] | None = None  # None: all
    binary: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False


@dataclass
class OutTensor:
    """One response tensor: FP32 ``numpy`` data or BYTES ``list[bytes]``."""

    name: str
    datatype: str
    shape: list[int]
    data: Any


def decompress_body(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undoes ``Content-Encoding: gzip|deflate`` without inflating past ``limit`` bytes."""
    enc = (encoding or "identity").strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "deflate"):
        raise ApiError(415, "unsupported_encoding", f"Content-Encoding {enc!r} is not supported")
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if enc == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise _bad(f"body is not valid {enc}: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise ApiError(413, "payload_too_large",
                       f"the decompressed body exceeds the {limit}-byte limit")
    return out


def _shape(value: Any, name: str) -> list[int]:
    ok = isinstance(value, list) and 0 < len(value) <= 8 and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
    if not ok:
        raise _bad(f"input {name!r}: shape must be a list of 1-8 non-negative ints, got {value!r}")
    return value


def _json_numbers(data: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise _bad(f"input {name!r}: data must be a (nested) list of numbers") from None
    if arr.dtype.kind not in "fiu":
        raise _bad(f"input {name!r}: FP32 data must be numbers, got {arr.dtype.kind!r} values")
    return arr.astype(np.float32).reshape(-1)


def _split_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise _bad(f"input {name!r}: truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise _bad(f"input {name!r}: BYTES element runs past the binary data")
        out.append(raw[pos:pos + n])
        pos += n
    if len(out) != count:
        raise _bad(f"input {name!r}: shape holds {count} elements, binary data has {len(out)}")
    return out


def _flat_strings(data: Any, name: str) -> list[str]:
    flat: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    if not all(isinstance(s, str) for s in flat):
        raise _bad(f"input {name!r}: BYTES data in JSON must be base64 strings")
    return flat


def _load_header(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        head, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise _bad(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise _bad(f"{HEADER_LENGTH}={n} does not fit a {len(body)}-byte body")
        head, binary = body[:n], body[n:]
    try:
        req = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(f"the request is not valid JSON: {exc}") from None
    if not isinstance(req, dict):
        raise _bad("the request must be a JSON object")
    return req, binary


def parse_infer_request(body: bytes, header_length: str | None, limits: Limits,
                        model: str) -> InferRequest:
    """Parses and validates an ``/infer`` body for the served family ``model``."""
    req, binary = _load_header(body, header_length)
    spec, name, shape = _input_spec(req, limits, model)
    size = _binary_size(spec, name, binary)
    out = InferRequest(id=req.get("id") if isinstance(req.get("id"), str) else None)
    if name == INPUT_TENSOR:
        out.tensor = _tensor_input(spec, name, shape, size, binary)
    else:
        out.images = _image_input(spec, name, shape, size, binary)
    _parse_outputs(req, out, model)
    return out


def _input_spec(req: dict[str, Any], limits: Limits,
                model: str) -> tuple[dict[str, Any], str, list[int]]:
    """The one input of ``req``, its name and its shape, checked against the limits."""
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad(f"expected exactly one input, named {INPUT_TENSOR!r} (FP32) or "
                   f"{INPUT_IMAGE!r} (BYTES)")
    spec = inputs[0]
    name, dtype = spec.get("name"), spec.get("datatype")
    if name not in _INPUT_TYPES:
        raise _bad(f"unknown input {name!r}; {model} takes {INPUT_TENSOR!r} (FP32 "
                   f"[N,3,H,W], normalised) or {INPUT_IMAGE!r} (BYTES [N], PNG/JPEG)")
    if dtype != _INPUT_TYPES[name]:
        raise _bad(f"input {name!r} must have datatype {_INPUT_TYPES[name]}, got {dtype!r}")
    shape = _shape(spec.get("shape"), name)
    if shape[0] < 1:
        raise _bad(f"input {name!r}: the batch dimension must be at least 1, got {shape}")
    if shape[0] > limits.max_images:
        raise ApiError(400, "too_many_images", f"input {name!r}: batch size {shape[0]} exceeds "
                       f"the limit of {limits.max_images}")
    return spec, name, shape


def _binary_size(spec: dict[str, Any], name: str, binary: bytes) -> int | None:
    """The input's ``binary_data_size`` (None when its data is inline JSON), checked against
    the bytes after the header."""
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad(f"input {name!r}: parameters must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in spec or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _bad(f"input {name!r}: binary_data_size must be a non-negative int "
                       "and excludes 'data'")
        if size != len(binary):
            raise _bad(f"input {name!r}: binary_data_size={size} but {len(binary)} bytes follow "
                       "the JSON header")
    elif "data" not in spec:
        raise _bad(f"input {name!r} has neither 'data' nor binary_data_size")
    elif binary:
        raise _bad("binary data follows the header but no input claims it")
    return size


def _tensor_input(spec: dict[str, Any], name: str, shape: list[int], size: int | None,
                  binary: bytes) -> np.ndarray:
    count = math.prod(shape)
    if len(shape) != 4 or shape[1] != 3:
        raise _bad(f"input {name!r} must have shape [N, 3, H, W], got {shape}")
    if size is not None:
        if size != 4 * count:
            raise _bad(f"input {name!r}: {size} bytes is not FP32 {shape}")
        flat = np.frombuffer(binary, dtype="<f4").astype(np.float32)
    else:
        flat = _json_numbers(spec["data"], name)
    if flat.size != count:
        raise _bad(f"input {name!r}: shape {shape} needs {count} values, got {flat.size}")
    if not np.isfinite(flat).all():
        raise _bad(f"input {name!r} holds NaN or infinite values")
    return flat.reshape(shape)


def _image_input(spec: dict[str, Any], name: str, shape: list[int], size: int | None,
                 binary: bytes) -> list[bytes]:
    count = math.prod(shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise _bad(f"input {name!r} must have shape [N] or [N, 1], got {shape}")
    if size is not None:
        return _split_bytes(binary, count, name)
    strings = _flat_strings(spec["data"], name)
    if len(strings) != count:
        raise _bad(f"input {name!r}: shape {shape} needs {count} elements, got {len(strings)}")
    return [decode_base64(s, index=i) for i, s in enumerate(strings)]


def _parse_outputs(req: dict[str, Any], out: InferRequest, model: str) -> None:
    params = req.get("parameters") or {}
    out.binary_default = bool(isinstance(params, dict) and params.get("binary_data_output"))
    requested = req.get("outputs")
    if requested is None:
        return
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise _bad("outputs must be a list of objects")
    names = []
    for o in requested:
        oname = o.get("name")
        known = OUTPUTS[get_spec(model).task]
        if oname not in known:
            raise _bad(f"unknown output {oname!r}; {model} has {list(known)}")
        oparams = o.get("parameters") or {}
        if isinstance(oparams, dict) and "binary_data" in oparams:
            out.binary[oname] = bool(oparams["binary_data"])
        names.append(oname)
    out.outputs = names


def _json_data(t: OutTensor) -> list[Any]:
    if t.datatype == "BYTES":
        return [b.decode("utf-8", "replace") for b in t.data]
    return np.asarray(t.data, dtype=np.float32).reshape(-1).tolist()


def _raw_data(t: OutTensor) -> bytes:
    if t.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in t.data)
    return np.ascontiguousarray(t.data, dtype="<f4").tobytes()


def encode_infer_response(model: str, version: str, req: InferRequest,
                          tensors: list[OutTensor]) -> tuple[bytes, dict[str, str]]:
    """The response body and headers; binary outputs follow the JSON header."""
    wanted = req.outputs or [t.name for t in tensors]
    by_name = {t.name: t for t in tensors}
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in wanted:
        t = by_name[name]
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if req.binary.get(name, req.binary_default):
            raw = _raw_data(t)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_data(t)
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if req.id is not None:
        head["id"] = req.id
    header = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream",
                                      HEADER_LENGTH: str(len(header))}


def model_metadata(model: str, info: dict[str, Any]) -> dict[str, Any]:
    """``GET /v2/models/{model}``: inputs/outputs with ``-1`` for the batch dimension."""
    h, w = input_size(info["preprocessing"])
    inputs = [{"name": INPUT_TENSOR, "datatype": "FP32", "shape": [-1, 3, h, w]},
              {"name": INPUT_IMAGE, "datatype": "BYTES", "shape": [-1]}]
    if get_spec(model).task == "classification":
        k = len(info.get("class_names") or [])
        outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
                   {"name": "label", "datatype": "BYTES", "shape": [-1]}]
    else:
        outputs = [{"name": "reconstruction", "datatype": "FP32", "shape": [-1, 3, h, w]}]
    return {"name": model, "versions": [info["checkpoint_id"]], "platform": "pytorch_mve",
            "inputs": inputs, "outputs": outputs}


def outputs_for(model: str, result: dict[str, Any]) -> list[OutTensor]:
    """Response tensors from a model deployment's result dict."""
    if get_spec(model).task == "classification":
        probs = np.asarray(result["probabilities"], dtype=np.float32)
        names = result["class_names"]
        labels = [names[i].encode() for i in probs.argmax(axis=1).tolist()]
        return [OutTensor("probabilities", "FP32", list(probs.shape), probs),
                OutTensor("label", "BYTES", [len(labels)], labels)]
    recon = np.asarray(result["reconstruction"], dtype=np.float32)
    return [OutTensor("reconstruction", "FP32", list(recon.shape), recon)]
