"""Shared code of the serving peers in ``bench/peers/`` (no Ray).

Every peer (``bare.py``, ``bare_batched.py``, ``litserve_server.py``, ``triton_server.py``)
serves the same mve checkpoint with the same per-image work, all of it defined here:

- :func:`load` reads the checkpoint, sets ``torch.set_num_threads`` and the TTA mode
  (:func:`set_tta`, the one place it is set) and warms the model up with one forward;
- :func:`decode` turns PNG/JPEG bytes into the model input: Pillow to RGB ``uint8`` HWC,
  ``/255``, ``(x - mean) / std``, NCHW ``float32`` (the app's own decoder and limits);
- :func:`Served.predict` runs one forward and returns softmax probabilities ``[N, K]``;
- :func:`classify_response` is the ``/v1/classify`` JSON of the Ray Serve app (top-5);
- :func:`oip_parse` / :func:`oip_encode` are the app's Open Inference Protocol v2
  parser/encoder (``serve_app.oip``, Triton's binary tensor extension included);
- :func:`oip_binary_body` builds the body ``tritonclient.http`` sends, for ``wrk``.

The command line is the same for every peer: :func:`parse_args`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mve.checkpoint import load_checkpoint
from mve.data import normalize
from serve_app.errors import ApiError
from serve_app.images import decode_base64, decode_images
from serve_app.oip import (
    HEADER_LENGTH,
    InferRequest,
    encode_infer_response,
    outputs_for,
    parse_infer_request,
)
from serve_app.schemas import Limits

__all__ = [
    "MODEL", "HEADER_LENGTH", "LIMITS", "ApiError", "InferRequest", "Served", "Stats", "parse_args", "load",
    "set_tta", "decode", "classify_blobs", "classify_response", "oip_parse", "oip_images",
    "oip_encode", "oip_binary_body", "error_json", "cifar_like_jpeg",
]

MODEL = "classifier"
LIMITS = Limits()
TOP_K = 5
TTA_CHOICES = ("none", "flip", "flip_translate")
RAW_TYPES = ("image/jpeg", "image/jpg", "image/png", "application/octet-stream")


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The command line every peer shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    p.add_argument("--checkpoint", required=True, help="mve checkpoint directory")
    p.add_argument("--tta", choices=TTA_CHOICES, default="none", help="test-time augmentation")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--max-batch-size", type=int, default=32, help="images per forward (batching)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="batching wait (where used)")
    p.add_argument("--optimize", action="store_true", help="what mve serve does to the model "
                   "(mve.inference: channels-last weights, bf16 where the CPU has it natively); "
                   "off: the model as loaded")
    return p.parse_args(argv)


@dataclass
class Stats:
    """Forward passes and images seen, for ``GET /stats`` (mean batch = images / batches)."""

    batches: int = 0
    images: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, images: int) -> None:
        with self._lock:
            self.batches += 1
            self.images += images

    def as_dict(self) -> dict[str, int]:
        return {"batches": self.batches, "images": self.images}


@dataclass
class Served:
    """A loaded checkpoint ready to serve."""

    model: torch.nn.Module
    preprocessing: dict[str, Any]
    class_names: list[str]
    checkpoint_id: str
    stats: Stats = field(default_factory=Stats)

    def predict(self, x: torch.Tensor) -> np.ndarray:
        """Softmax probabilities ``float32 [N, K]`` for model input ``x`` (one forward)."""
        with torch.inference_mode():
            probs = self.model(x).float().softmax(dim=-1)
        self.stats.add(int(x.shape[0]))
        return probs.numpy()

    def result(self, probs: np.ndarray) -> dict[str, Any]:
        """The model deployment's result dict that ``serve_app.oip.outputs_for`` takes."""
        return {"probabilities": probs, "class_names": self.class_names,
                "checkpoint_id": self.checkpoint_id}


def serve_peer(doc: str, build: Callable[[Served, argparse.Namespace], Any]) -> None:
    """The ``main`` of a FastAPI peer: its options, the shipped model, uvicorn on loopback."""
    import uvicorn

    args = parse_args(doc.splitlines()[0])
    served = load(args.checkpoint, args.tta, args.threads, args.optimize)
    uvicorn.run(build(served, args), host="127.0.0.1", port=args.port, log_level="warning")


def set_tta(model: torch.nn.Module, mode: str) -> None:
    """Sets the checkpoint model's test-time augmentation (a frozen config field)."""
    model.config = dataclasses.replace(model.config, tta=mode)


def load(checkpoint: str, tta: str, threads: int, optimize: bool = False) -> Served:
    """Loads the checkpoint, sets threads and TTA, and warms up with one forward."""
    torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    ckpt.model.eval()
    set_tta(ckpt.model, tta)
    model = ckpt.model
    if optimize:
        from mve.inference import Precision, for_inference

        model = Precision(for_inference(model), "auto")
    served = Served(model, dict(ckpt.preprocessing), list(ckpt.class_names),
                    ckpt.checkpoint_id)
    h, w = _size(served.preprocessing)
    with torch.inference_mode():
        served.model(torch.zeros(1, 3, h, w))
    return served


def _size(preprocessing: dict[str, Any]) -> tuple[int, int]:
    size = preprocessing["input_size"]
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def decode(blobs: list[bytes], preprocessing: dict[str, Any]) -> torch.Tensor:
    """PNG/JPEG bytes -> normalised NCHW ``float32`` (images must be ``input_size``)."""
    arrays = decode_images(blobs, LIMITS)  # RGB uint8 [H, W, 3], with the app's limits
    h, w = _size(preprocessing)
    for i, arr in enumerate(arrays):
        if arr.shape[:2] != (h, w):
            raise ApiError(400, "invalid_image", f"image {i} is {arr.shape[1]}x{arr.shape[0]}; "
                           f"this peer takes {w}x{h} (no resizing)")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return normalize(x, preprocessing["mean"], preprocessing["std"]).contiguous()


def classify_blobs(body: bytes, content_type: str | None) -> list[bytes]:
    """The encoded images of a ``/v1/classify`` body: raw PNG/JPEG or ``{"images": [b64]}``."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype in RAW_TYPES:
        return [body]
    if ctype != "application/json":
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type {ctype!r}: send image/jpeg, image/png or application/json")
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not images:
        raise ApiError(422, "invalid_parameter", "'images' must be a non-empty list")
    if len(images) > LIMITS.max_images:
        raise ApiError(400, "too_many_images", f"more than {LIMITS.max_images} images")
    return [decode_base64(s, index=i) for i, s in enumerate(images)]


def classify_response(served: Served, probs: np.ndarray) -> dict[str, Any]:
    """The app's ``/v1/classify`` JSON: top-1 and top-5 per row of ``probs``."""
    k = min(TOP_K, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    preds = []
    for row, idx in zip(probs, order, strict=True):
        scores = [{"label": served.class_names[i], "index": int(i),
                   "probability": float(row[i])} for i in idx]
        preds.append({"label": scores[0]["label"], "probability": scores[0]["probability"],
                      "top_k": scores})
    return {"model": MODEL, "checkpoint_id": served.checkpoint_id, "predictions": preds}


def oip_parse(body: bytes, header_length: str | None) -> InferRequest:
    """Parses an OIP v2 ``/infer`` body (JSON or binary extension) for the classifier."""
    return parse_infer_request(body, header_length, LIMITS, MODEL)


def oip_images(req: InferRequest) -> list[bytes]:
    """The encoded images of a parsed request; the ``input`` FP32 tensor is not served."""
    if req.images is None:
        raise ApiError(400, "invalid_inference_request",
                       "the peers take only the 'image' input (BYTES [N], PNG/JPEG)")
    return req.images


def oip_encode(served: Served, req: InferRequest,
               probs: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """The OIP response body and headers for ``probs`` (binary outputs as requested)."""
    tensors = outputs_for(MODEL, served.result(probs))
    return encode_infer_response(MODEL, served.checkpoint_id, req, tensors)


def oip_binary_body(jpeg: bytes | list[bytes], two_d: bool = False) -> tuple[bytes, int]:
    """The body ``tritonclient.http`` sends for ``image`` BYTES ``[N]`` with binary outputs.

    ``two_d``: shape ``[N, 1]`` (what Triton's batching models take). Returns ``(body,
    header_length)``; send ``header_length`` as the ``Inference-Header-Content-Length``
    header (the body is byte-identical to ``InferenceServerClient.generate_request_body``).
    """
    blobs = [jpeg] if isinstance(jpeg, bytes) else list(jpeg)
    raw = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    shape = [len(blobs), 1] if two_d else [len(blobs)]
    head = {"inputs": [{"name": "image", "shape": shape, "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}},
                        {"name": "label", "parameters": {"binary_data": True}}]}
    header = json.dumps(head, separators=(",", ":")).encode()
    return header + raw, len(header)


def error_json(exc: ApiError, oip: bool = False) -> dict[str, Any]:
    """The app's error JSON: ``/v1`` ``{"error": {code, message}}``, ``/v2`` ``{"error": msg}``."""
    if oip:
        return {"error": exc.message}
    return {"error": {"code": exc.code, "message": exc.message}}


def cifar_like_jpeg(seed: int = 0, quality: int = 75) -> bytes:
    """A random 32x32 RGB image (smooth blobs plus noise, CIFAR-like) as a JPEG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((32, 32), Image.Resampling.BICUBIC),
                      dtype=np.int16)
    noisy = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy, mode="RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
