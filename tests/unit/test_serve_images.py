"""Pure serving code (no Ray): safe image decoding and limits, preprocessing, the Open Inference
Protocol codec (checked against ``tritonclient``'s own encoder/decoder) and config editing."""

from __future__ import annotations

import base64
import gzip
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mve.data import normalize
from mve.images import make_grid, preprocess, to_uint8_hwc
from serve_app import oip
from serve_app.errors import ApiError
from serve_app.images import decode_base64, decode_image, decode_images
from serve_app.parsing import classify_body
from serve_app.schemas import ClassifyResponse, Limits
from serve_app.testing import png_bytes, random_images

LIMITS = Limits()


def _png_declaring(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims ``w x h`` pixels (a decompression-bomb shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
            + chunk(b"IEND", b""))


def _code(exc: pytest.ExceptionInfo[ApiError]) -> tuple[int, str]:
    return exc.value.status, exc.value.code


def test_decode_png_jpeg_and_modes() -> None:
    img = random_images(1, size=20)[0]
    assert np.array_equal(decode_image(png_bytes(img), LIMITS), img)
    jpg = decode_image(png_bytes(img, "JPEG"), LIMITS)
    assert jpg.shape == (20, 20, 3) and jpg.dtype == np.uint8
    gray = Image.fromarray(img[..., 0])
    rgba = Image.fromarray(np.dstack([img, np.full((20, 20), 128, np.uint8)]))
    for im in (gray, rgba):
        buf = __import__("io").BytesIO()
        im.save(buf, format="PNG")
        assert decode_image(buf.getvalue(), LIMITS).shape == (20, 20, 3)


@pytest.mark.parametrize("data, code", [
    (b"", "invalid_image"),
    (b"definitely not an image", "invalid_image"),
    (png_bytes(random_images(1)[0])[:60], "invalid_image"),  # truncated
    (png_bytes(random_images(1)[0], "GIF"), "invalid_image"),  # not an allowed format
    (png_bytes(random_images(1)[0], "BMP"), "invalid_image"),
])
def test_bad_images_are_400(data: bytes, code: str) -> None:
    with pytest.raises(ApiError) as exc:
        decode_image(data, LIMITS)
    assert _code(exc) == (400, code)


@pytest.mark.parametrize("w, h", [(20_000, 20_000), (100_000, 100_000), (1025, 1024)])
def test_decompression_bombs_are_413_before_decoding(w: int, h: int) -> None:
    with pytest.raises(ApiError) as exc:
        decode_image(_png_declaring(w, h), LIMITS)
    assert _code(exc) == (413, "image_too_large")


def test_request_limits() -> None:
    small = Limits(max_images=2, max_total_pixels=32 * 32 * 2, max_image_pixels=64 * 64)
    blob = png_bytes(random_images(1)[0])
    assert len(decode_images([blob, blob], small)) == 2
    with pytest.raises(ApiError) as exc:
        decode_images([blob] * 3, small)
    assert _code(exc) == (400, "too_many_images")
    with pytest.raises(ApiError) as exc:
        decode_images([blob, png_bytes(random_images(1, size=40)[0])], small)
    assert _code(exc) == (413, "too_many_pixels")
    with pytest.raises(ApiError) as exc:
        decode_images([], small)
    assert _code(exc) == (400, "no_images")


def test_base64() -> None:
    raw = b"\x89PNG-bytes"
    text = base64.b64encode(raw).decode()
    assert decode_base64(text) == raw
    assert decode_base64(f"data:image/png;base64,{text}") == raw
    assert decode_base64(text[:4] + "\n" + text[4:]) == raw
    for bad in ("***", "abc", 42, None):
        with pytest.raises(ApiError) as exc:
            decode_base64(bad)
        assert _code(exc) == (400, "invalid_base64")


def test_preprocess_applies_checkpoint_preprocessing() -> None:
    prep = {"input_size": [32, 32], "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    imgs = random_images(3)
    x = preprocess(imgs, prep)
    ref = normalize(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2), prep["mean"],
                    prep["std"])
    assert torch.equal(x, ref)
    resized = preprocess([random_images(1, size=100)[0], np.zeros((7, 50, 3), np.uint8)], prep)
    assert resized.shape == (2, 3, 32, 32)
    vae = {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}
    assert np.array_equal(to_uint8_hwc(preprocess(imgs, vae), vae), np.stack(imgs))


def test_grid_and_top_k() -> None:
    grid = make_grid(np.zeros((5, 8, 8, 3), np.uint8), pad=2)
    assert grid.shape == (2 + 2 * 10, 2 + 3 * 10, 3)
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32)
    body = ClassifyResponse.model_validate_json(classify_body(probs, ["a", "b", "c"], 5, "c-1"))
    preds = body.predictions
    assert body.checkpoint_id == "c-1" and [p.label for p in preds] == ["b", "a"]
    assert [s.label for s in preds[1].top_k] == ["a", "c", "b"]
    assert [s.index for s in preds[1].top_k] == [0, 2, 1]
    assert preds[0].probability == pytest.approx(0.7) and len(preds[0].top_k) == 3
    two = ClassifyResponse.model_validate_json(classify_body(probs, ["a", "b", "c"], 2, "c-1"))
    assert [len(p.top_k) for p in two.predictions] == [2, 2]


# -- Open Inference Protocol codec --------------------------------------------------------------

def _triton_body(name: str, dtype: str, data: np.ndarray, binary: bool,
                 outputs: list[tuple[str, bool]] | None = None) -> tuple[bytes, str | None]:
    th = pytest.importorskip("tritonclient.http")
    InferenceServerClient, InferInput = th.InferenceServerClient, th.InferInput
    InferRequestedOutput = th.InferRequestedOutput
    inp = InferInput(name, list(data.shape), dtype)
    inp.set_data_from_numpy(data, binary_data=binary)
    outs = [InferRequestedOutput(n, binary_data=b) for n, b in outputs] if outputs else None
    body, length = InferenceServerClient.generate_request_body([inp], outputs=outs,
                                                              request_id="r1")
    return body, None if length is None else str(length)


@pytest.mark.parametrize("binary", [True, False])
def test_oip_fp32_roundtrip_with_tritonclient(binary: bool) -> None:
    InferenceServerClient = pytest.importorskip("tritonclient.http").InferenceServerClient

    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    body, length = _triton_body("input", "FP32", x, binary, [("probabilities", binary),
                                                            ("label", False)])
    req = oip.parse_infer_request(body, length, LIMITS, "classifier")
    assert req.id == "r1" and np.array_equal(req.tensor, x)
    probs = np.full((2, 10), 0.1, np.float32)
    result = {"probabilities": probs, "class_names": [f"c{i}" for i in range(10)],
              "checkpoint_id": "classifier-x"}
    out, headers = oip.encode_infer_response("classifier", "v", req,
                                             oip.outputs_for("classifier", result))
    res = InferenceServerClient.parse_response_body(
        out, header_length=headers.get(oip.HEADER_LENGTH) and int(headers[oip.HEADER_LENGTH]))
    assert np.array_equal(res.as_numpy("probabilities"), probs)
    assert [v.decode() if isinstance(v, bytes) else v for v in res.as_numpy("label")] == ["c0"] * 2


def test_oip_bytes_inputs() -> None:
    blobs = [png_bytes(im) for im in random_images(3)]
    body, length = _triton_body("image", "BYTES", np.array(blobs, dtype=np.object_), True)
    assert oip.parse_infer_request(body, length, LIMITS, "vae").images == blobs
    b64 = np.array([base64.b64encode(b) for b in blobs], dtype=np.object_)
    body, length = _triton_body("image", "BYTES", b64, False)
    assert oip.parse_infer_request(body, length, LIMITS, "classifier").images == blobs


def _json(inputs: list[dict], **extra: object) -> bytes:
    return __import__("json").dumps({"inputs": inputs, **extra}).encode()


@pytest.mark.parametrize("body", [
    b"{not json", b"[1, 2]", _json([]),
    _json([{"name": "input", "datatype": "INT64", "shape": [1, 3, 32, 32], "data": [0] * 3072}]),
    _json([{"name": "input", "datatype": "FP32", "shape": [1, 3, 32], "data": [0.0] * 96}]),
    _json([{"name": "input", "datatype": "FP32", "shape": [1, 3, 2, 2], "data": [0.0] * 11}]),
    _json([{"name": "input", "datatype": "FP32", "shape": [1, 3, 2, 2], "data": ["x"] * 12}]),
    _json([{"name": "input", "datatype": "FP32", "shape": [1, 3, 2, 2], "data": [True] * 12}]),
    _json([{"name": "input", "datatype": "FP32", "shape": [0, 3, 2, 2], "data": []}]),
    _json([{"name": "input", "datatype": "FP32", "shape": [-1, 3, 2, 2], "data": []}]),
    _json([{"name": "input", "datatype": "FP32", "shape": [65, 3, 1, 1], "data": [0.0] * 195}]),
    _json([{"name": "image", "datatype": "BYTES", "shape": [1], "data": [5]}]),
    _json([{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["aGk="]}]),
    _json([{"name": "pixels", "datatype": "UINT8", "shape": [1], "data": [1]}]),
    _json([{"name": "input", "datatype": "FP32", "shape": [1, 3, 1, 1], "data": [0.0] * 3}],
          outputs=[{"name": "nope"}]),
    b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1,3,1,1], '
    b'"data": [NaN, 0, 0]}]}',
])
def test_oip_bad_requests_are_400(body: bytes) -> None:
    with pytest.raises(ApiError) as exc:
        oip.parse_infer_request(body, None, LIMITS, "classifier")
    assert exc.value.status == 400


def test_oip_binary_framing_errors() -> None:
    x = np.zeros((1, 3, 32, 32), np.float32)
    body, length = _triton_body("input", "FP32", x, True)
    for bad_length in ("abc", "0", str(len(body) + 1)):
        with pytest.raises(ApiError):
            oip.parse_infer_request(body, bad_length, LIMITS, "classifier")
    with pytest.raises(ApiError):  # binary payload cut short
        oip.parse_infer_request(body[:-4], length, LIMITS, "classifier")
    blobs = np.array([b"abc"], dtype=np.object_)
    body, length = _triton_body("image", "BYTES", blobs, True)
    with pytest.raises(ApiError):
        oip.parse_infer_request(body[:-2], length, LIMITS, "classifier")


def test_bounded_decompression() -> None:
    assert oip.decompress_body(gzip.compress(b"abc"), "gzip", 10) == b"abc"
    assert oip.decompress_body(zlib.compress(b"abc"), "deflate", 10) == b"abc"
    with pytest.raises(ApiError) as exc:
        oip.decompress_body(gzip.compress(b"\0" * 10_000_000), "gzip", 4096)
    assert _code(exc) == (413, "payload_too_large")
    for enc, body in (("br", b"x"), ("gzip", b"not gzip")):
        with pytest.raises(ApiError):
            oip.decompress_body(body, enc, 4096)


def test_load_model_checks_family(tmp_path) -> None:
    from mve.checkpoint import CheckpointError
    from serve_app.loading import load_model
    from serve_app.testing import make_classifier, make_vae

    clf, vae = make_classifier(tmp_path / "clf"), make_vae(tmp_path / "vae")
    loaded = load_model(f"file://{clf}", "classifier")
    assert loaded.id.startswith("classifier-") and len(loaded.class_names) == 10
    assert load_model(str(vae), "vae").preprocessing["mean"] == [0.5] * 3
    with pytest.raises(CheckpointError, match="not a 'classifier'"):
        load_model(str(vae), "classifier")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "nope"), "vae")


def test_cli_and_client_modules_do_not_import_ray() -> None:
    import subprocess
    import sys

    code = ("import argparse, sys\n"
            "from serve_app import cli, client, deploy, images, oip, parsing, schemas, loading\n"
            "p = argparse.ArgumentParser(); s = p.add_subparsers()\n"
            "s.add_parser('serve', parents=[cli.serve_parent()])\n"
            "s.add_parser('predict', parents=[cli.predict_parent()])\n"
            "s.add_parser('generate', parents=[cli.generate_parent()])\n"
            "p.parse_args(['serve', '--classifier', 'x', '--metrics-port', '9'])\n"
            "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_load_model_serves_a_classifier_in_the_requested_precision(tmp_path) -> None:
    from serve_app.loading import load_model, with_precision
    from serve_app.testing import make_classifier, make_vae

    clf = make_classifier(tmp_path / "clf")
    fp32 = load_model(str(clf), "classifier", "fp32")
    assert fp32.precision == "fp32"
    bf16 = with_precision(fp32, "bf16")
    # a new LoadedModel of the same checkpoint (its requests never share a batch with fp32's)
    assert bf16 is not fp32 and bf16.ckpt is fp32.ckpt and bf16.precision == "bf16"
    assert with_precision(bf16, "bf16") is bf16
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(bf16.runner(x).softmax(-1), fp32.runner(x).softmax(-1), atol=0.02)
    # the VAE answers in fp32 whatever the setting, as it ignores tta
    assert load_model(str(make_vae(tmp_path / "vae")), "vae", "bf16").precision == "fp32"
