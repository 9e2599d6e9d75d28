"""Checks a running peer: every route and body format, and the shape of each answer.

``GET /health``; ``POST /v1/classify`` with raw JPEG, raw PNG and JSON base64 (two images),
checking the app's JSON shape (top-5, probabilities summing to <= 1); OIP v2 through
``tritonclient.http`` (binary ``image`` BYTES in, binary outputs) checking ``probabilities``
``(N, 10)`` summing to 1 and ``label``; ``GET /stats``. Prints one line per check; exits 1 if
any failed. For Triton: ``--triton`` (no ``/v1``, ``image`` shape ``[N, 1]``, health at
``/v2/models/classifier/ready``, stats at ``/v2/models/classifier/stats``). Run::

    python bench/peers/check_peer.py --port 8101
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import urllib.error
import urllib.request
from typing import Any

import numpy as np
from PIL import Image

from common import cifar_like_jpeg


def _http(url: str, body: bytes | None = None, ctype: str = "") -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _check_classify(doc: Any, n: int) -> str:
    assert doc["model"] == "classifier" and isinstance(doc["checkpoint_id"], str), doc
    preds = doc["predictions"]
    assert len(preds) == n, f"{len(preds)} predictions for {n} images"
    for p in preds:
        assert set(p) == {"label", "probability", "top_k"}, sorted(p)
        assert len(p["top_k"]) == 5 and p["top_k"][0]["label"] == p["label"]
        assert all(set(s) == {"label", "index", "probability"} for s in p["top_k"])
        probs = [s["probability"] for s in p["top_k"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
    top = preds[0]["top_k"][0]
    return f"top1={top['label']} p={top['probability']:.4f}"


def check_v1(base: str, jpegs: list[bytes]) -> list[tuple[str, bool, str]]:
    """``/v1/classify`` with raw JPEG, raw PNG and JSON base64."""
    png = io.BytesIO()
    Image.open(io.BytesIO(jpegs[0])).convert("RGB").save(png, format="PNG")
    cases = [("v1 raw image/jpeg", jpegs[0], "image/jpeg", 1),
             ("v1 raw image/png", png.getvalue(), "image/png", 1),
             ("v1 json base64 x2", json.dumps(
                 {"images": [base64.b64encode(j).decode() for j in jpegs]}).encode(),
              "application/json", len(jpegs))]
    out = []
    for name, body, ctype, n in cases:
        status, data = _http(base + "/v1/classify", body, ctype)
        try:
            assert status == 200, f"HTTP {status}: {data[:300]!r}"
            out.append((name, True, _check_classify(json.loads(data), n)))
        except (AssertionError, KeyError, ValueError, TypeError) as exc:
            out.append((name, False, str(exc)[:300]))
    return out


def check_oip(port: int, jpegs: list[bytes], two_d: bool = False) -> list[tuple[str, bool, str]]:
    """OIP v2 ``/infer`` through ``tritonclient.http`` with binary data both ways."""
    import tritonclient.http as th

    out = []
    client = th.InferenceServerClient(f"127.0.0.1:{port}")
    for n in (1, len(jpegs)):
        shape = [n, 1] if two_d else [n]
        name = f"v2 tritonclient binary {shape}"
        try:
            inp = th.InferInput("image", shape, "BYTES")
            inp.set_data_from_numpy(np.array(jpegs[:n], dtype=object).reshape(shape),
                                    binary_data=True)
            outs = [th.InferRequestedOutput("probabilities", binary_data=True),
                    th.InferRequestedOutput("label", binary_data=True)]
            res = client.infer("classifier", [inp], outputs=outs)
            probs, labels = res.as_numpy("probabilities"), res.as_numpy("label")
            assert probs.shape == (n, 10) and probs.dtype == np.float32, probs.shape
            assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4), probs.sum(axis=1)
            assert labels.shape == tuple(shape), labels.shape
            out.append((name, True, f"label={labels[0]!r} max_p={probs[0].max():.4f}"))
        except Exception as exc:  # report every failure kind, keep checking
            out.append((name, False, f"{type(exc).__name__}: {str(exc)[:300]}"))
    client.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--triton", action="store_true", help="Triton's routes and shapes")
    args = p.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    health, stats = ("/v2/models/classifier/ready", "/v2/models/classifier/stats") if args.triton \
        else ("/health", "/stats")
    jpegs = [cifar_like_jpeg(0), cifar_like_jpeg(1)]
    status, data = _http(base + health)
    results = [(f"GET {health}", status == 200, f"HTTP {status} {data[:80]!r}")]
    if not args.triton:
        results += check_v1(base, jpegs)
    results += check_oip(args.port, jpegs, two_d=args.triton)
    status, data = _http(base + stats)
    results.append((f"GET {stats}", status == 200, f"HTTP {status} {data[:160]!r}"))
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name:28s} {detail}")
    sys.exit(0 if all(ok for _, ok, _ in results) else 1)


if __name__ == "__main__":
    main()
