"""The HTTP API on a real Ray Serve (one instance for the module): every route in every input
form, the Open Inference Protocol through ``tritonclient.http``, HTTP-vs-in-process parity, API
keys, absent models, and a bad-input suite (table-driven and hypothesis-generated)."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from mve.checkpoint import load_checkpoint
from mve.data import normalize
from serve_app.dataplane import applied, embedded_env
from serve_app.deploy import app_config, deploy, load_config
from serve_app.testing import (
    archive_images,
    free_port,
    haproxy_servers,
    make_classifier,
    make_vae,
    png_bytes,
    random_images,
    replica_address,
)

pytestmark = pytest.mark.ray
KEY = "test-key-8c1f"


@dataclass
class Server:
    url: str
    clf: Path
    vae: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The app with both models at ``/`` and a classifier-only, API-key app at ``/secure``."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    d = tmp_path_factory.mktemp("serve-api")
    clf, vae = make_classifier(d / "clf", seed=1), make_vae(d / "vae", seed=2)
    (d / "key").write_text(KEY + "\n")
    port = free_port()
    base = load_config()
    # fp32: these tests hold the HTTP answers to the in-process model's within 1e-5
    # (bfloat16 serving has its own test in test_serve_swap.py)
    cfg = app_config(base, {"classifier": str(clf), "vae": str(vae)}, host="127.0.0.1", port=port,
                     precision="fp32")
    secure = app_config(base, {"classifier": str(clf)}, name="secure", mount="/secure",
                        api_key_file=str(d / "key"), precision="fp32")
    cfg["applications"] += secure["applications"]
    env = embedded_env()
    with applied(env):
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 logging_level=logging.WARNING)
    try:
        deploy(cfg)
        yield Server(f"http://127.0.0.1:{port}", clf, vae, env)
    finally:
        serve.shutdown()
        ray.shutdown()


def post(server: Server, path: str, **kw) -> requests.Response:
    return requests.post(server.url + path, timeout=60, **kw)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return im.size


IMG = png_bytes(random_images(1, seed=5)[0])


# -- /v1 -------------------------------------------------------------------------------------

def test_models_reports_checkpoints(server: Server) -> None:
    out = requests.get(server.url + "/v1/models", timeout=30).json()
    by_name = {m["name"]: m for m in out["models"]}
    clf = load_checkpoint(server.clf)
    assert by_name["classifier"]["checkpoint_id"] == clf.checkpoint_id
    assert by_name["classifier"]["class_names"] == clf.class_names
    assert by_name["classifier"]["preprocessing"] == clf.preprocessing
    assert by_name["classifier"]["metrics"] == {"seed": 1}
    assert by_name["vae"]["checkpoint_id"].startswith("vae-")
    assert by_name["vae"]["swap"]["failed_swaps"] == 0


def test_classify_every_input_form(server: Server) -> None:
    imgs = random_images(3, seed=9)
    pngs = [png_bytes(i) for i in imgs]
    raw = post(server, "/v1/classify?top_k=3", data=pngs[0],
               headers={"Content-Type": "image/png"})
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert body["model"] == "classifier" and body["checkpoint_id"].startswith("classifier-")
    (pred,) = body["predictions"]
    assert len(pred["top_k"]) == 3 and pred["label"] == pred["top_k"][0]["label"]
    assert pred["top_k"][0]["probability"] >= pred["top_k"][1]["probability"]
    files = [("file", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
    multi = post(server, "/v1/classify", files=files, data={"top_k": "2"})
    assert multi.status_code == 200, multi.text
    js = post(server, "/v1/classify", json={"images": [b64(p) for p in pngs], "top_k": 2})
    data_url = post(server, "/v1/classify", json={"images": [
        f"data:image/png;base64,{b64(p)}" for p in pngs]})
    assert multi.json()["predictions"] == js.json()["predictions"]
    assert [p["label"] for p in data_url.json()["predictions"]] == [
        p["label"] for p in js.json()["predictions"]]
    assert js.json()["predictions"][0]["top_k"][0] == pred["top_k"][0]
    # Any size and JPEG: resized to the model's input.
    big = png_bytes(random_images(1, size=100)[0], "JPEG")
    r = post(server, "/v1/classify", data=big, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top_k"]) == 5


def test_http_matches_in_process(server: Server, shared_archive: Path) -> None:
    """50 archive images: one batched request and 50 concurrent single-image requests."""
    items = archive_images(shared_archive, per_class=5)
    ckpt = load_checkpoint(server.clf)
    served = requests.get(server.url + "/v1/models", timeout=30).json()["models"][0]
    assert served["tta"] == "flip"  # serve_app/config.yaml's serving default, not the model's
    ckpt.model.set_tta(served["tta"])
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for _, b in items])
    x = normalize(torch.from_numpy(pixels).permute(0, 3, 1, 2), ckpt.preprocessing["mean"],
                  ckpt.preprocessing["std"])
    ref = ckpt.model.predict_proba(x).numpy()
    one = post(server, "/v1/classify", json={"images": [b64(b) for _, b in items], "top_k": 10})
    assert one.status_code == 200, one.text

    def single(blob: bytes) -> dict:
        r = post(server, "/v1/classify?top_k=10", data=blob,
                 headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]

    with ThreadPoolExecutor(8) as pool:
        singles = list(pool.map(single, [b for _, b in items]))
    for preds in (one.json()["predictions"], singles):
        got = np.zeros_like(ref)
        for row, p in zip(got, preds, strict=True):
            for s in p["top_k"]:
                row[s["index"]] = s["probability"]
        np.testing.assert_allclose(got, ref, atol=1e-5)
        assert (got.argmax(1) == ref.argmax(1)).all()
    names = ckpt.class_names
    labels = [names.index(label) for label, _ in items]
    http_acc = np.mean([names.index(p["label"]) == y for p, y in zip(singles, labels,
                                                                       strict=True)])
    assert http_acc == pytest.approx(np.mean(ref.argmax(1) == labels))


def test_vae_routes(server: Server) -> None:
    a, b = (png_bytes(i) for i in random_images(2, seed=3))
    r = post(server, "/v1/vae/reconstruct", data=a, headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert png_size(r.content) == (32, 32) and r.headers["x-model-id"].startswith("vae-")
    grid = post(server, "/v1/vae/reconstruct", files=[("f", a), ("f", b), ("f", a)])
    assert grid.status_code == 200 and png_size(grid.content) == (2 + 2 * 34, 2 + 2 * 34)
    rec = post(server, "/v1/vae/reconstruct?format=json", json={"images": [b64(a), b64(b)]})
    assert rec.status_code == 200 and len(rec.json()["images"]) == 2
    s1 = post(server, "/v1/vae/sample", json={"n": 4, "seed": 7, "temperature": 0.9})
    s2 = post(server, "/v1/vae/sample?n=4&seed=7&temperature=0.9")
    s3 = post(server, "/v1/vae/sample?n=4&seed=8&temperature=0.9")
    assert s1.status_code == 200 and s1.content == s2.content != s3.content
    # `steps` is the diffusion sampler's (this VAE has none, so it changes nothing) and checked
    assert post(server, "/v1/vae/sample?n=4&seed=7&temperature=0.9&steps=2").content == s1.content
    bad = post(server, "/v1/vae/sample", json={"n": 2, "steps": 0})
    assert bad.status_code // 100 == 4 and "steps" in bad.text
    sj = post(server, "/v1/vae/sample?n=4&seed=7&temperature=0.9",
              headers={"Accept": "application/json"})
    assert sj.headers["content-type"] == "application/json"
    got = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(s))))
                    for s in sj.json()["images"]])
    model = load_checkpoint(server.vae).model
    ref = ((model.sample(4, temperature=0.9, seed=7).clamp(-1, 1) + 1) * 127.5).round()
    assert np.abs(got.astype(int) - ref.permute(0, 2, 3, 1).numpy()).max() <= 1
    var = post(server, "/v1/vae/variations?format=json&n=3&temperature=0", data=a,
               headers={"Content-Type": "image/png"})
    assert var.status_code == 200, var.text
    frames = [base64.b64decode(s) for s in var.json()["images"]]
    assert len(frames) == 3 and frames[0] == frames[1] == frames[2]
    var2 = post(server, "/v1/vae/variations", json={"image": b64(a), "n": 2, "seed": 1})
    assert var2.status_code == 200 and png_size(var2.content) == (2 + 2 * 34, 2 + 34)
    interp = post(server, "/v1/vae/interpolate", files=[("a", a), ("b", b)],
                  data={"steps": "5", "method": "lerp"})
    assert interp.status_code == 200 and png_size(interp.content) == (2 + 5 * 34, 2 + 34)
    ij = post(server, "/v1/vae/interpolate?format=json", json={"images": [b64(a), b64(b)]})
    assert ij.status_code == 200 and len(ij.json()["images"]) == 8


# -- Open Inference Protocol v2 ------------------------------------------------------------

def test_oip_with_tritonclient(server: Server) -> None:
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    client = th.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("classifier") and client.is_model_ready("vae")
    meta = client.get_model_metadata("classifier")
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}
    imgs = random_images(4, seed=11)
    ckpt = load_checkpoint(server.clf)
    x = normalize(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2),
                  ckpt.preprocessing["mean"], ckpt.preprocessing["std"]).numpy()
    ckpt.model.set_tta(requests.get(server.url + "/v1/models", timeout=30).json()["models"][0][
        "tta"])
    ref = ckpt.model.predict_proba(torch.from_numpy(x)).numpy()
    for binary in (True, False):
        inp = th.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        outs = [th.InferRequestedOutput("probabilities", binary_data=binary),
                th.InferRequestedOutput("label", binary_data=binary)]
        res = client.infer("classifier", [inp], outputs=outs)
        np.testing.assert_allclose(res.as_numpy("probabilities"), ref, atol=1e-5)
        labels = [v.decode() if isinstance(v, bytes) else v for v in res.as_numpy("label")]
        assert labels == [ckpt.class_names[i] for i in ref.argmax(1)]
    blobs = th.InferInput("image", [4], "BYTES")
    blobs.set_data_from_numpy(np.array([png_bytes(i) for i in imgs], dtype=np.object_))
    res = client.infer("classifier", [blobs], request_compression_algorithm="gzip",
                       model_version=ckpt.checkpoint_id)
    np.testing.assert_allclose(res.as_numpy("probabilities"), ref, atol=1e-5)
    vae_in = th.InferInput("input", [2, 3, 32, 32], "FP32")
    vae_in.set_data_from_numpy(np.zeros((2, 3, 32, 32), np.float32))
    assert client.infer("vae", [vae_in]).as_numpy("reconstruction").shape == (2, 3, 32, 32)
    bad = th.InferInput("input", [1, 3, 16, 16], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    for model, inputs, kw, status in [("classifier", [bad], {}, "400"),
                                      ("nope", [vae_in], {}, "404"),
                                      ("classifier", [vae_in], {"model_version": "v0"}, "404")]:
        with pytest.raises(InferenceServerException) as exc:
            client.infer(model, inputs, **kw)
        assert exc.value.status() == status
    assert not client.is_model_ready("nope")
    client.close()


# -- the data plane: one hop ----------------------------------------------------------------

def _replica_requests(server: Server) -> dict[str, int]:
    stats = haproxy_servers(int(server.env["RAY_SERVE_HAPROXY_STATS_PORT"]))
    return {name: int(row["stot"] or 0) for name, row in stats.items()}


def test_requests_reach_the_model_replica_without_the_python_proxy(server: Server) -> None:
    """HAProxy sends each route straight to a replica of the app that runs its model; the
    Python proxy (HAProxy's fallback server) sees none of them."""
    before = _replica_requests(server)
    jpeg = png_bytes(random_images(1, seed=8)[0], "JPEG")
    for _ in range(10):
        assert post(server, "/v1/classify", data=jpeg,
                    headers={"Content-Type": "image/jpeg"}).status_code == 200
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [b64(jpeg)]}]}
    for _ in range(4):
        assert post(server, "/v2/models/classifier/infer", json=body).status_code == 200
    for _ in range(3):
        assert post(server, "/v1/vae/reconstruct", data=jpeg,
                    headers={"Content-Type": "image/jpeg"}).status_code == 200
    after = _replica_requests(server)
    grew = {n: after[n] - before.get(n, 0) for n in after}

    def to(prefix: str) -> int:
        return sum(v for n, v in grew.items() if n.startswith(prefix))
    assert to("SERVE_REPLICA_classifier-Classifier-") == 10
    assert to("SERVE_REPLICA_classifier-oip-Classifier-") == 4
    assert to("SERVE_REPLICA_vae-VAE-") == 3
    assert to("SERVE_PROXY_ACTOR") == 0 and to("SERVE_REPLICA_mve-Front-") == 0
    # the replica's own port is an HTTP server that runs the model
    addr = replica_address("classifier", "Classifier",
                           int(server.env["RAY_SERVE_HAPROXY_STATS_PORT"]))
    direct = requests.post(f"http://{addr}/v1/classify", data=jpeg, timeout=30,
                           headers={"Content-Type": "image/jpeg"})
    assert direct.status_code == 200 and direct.json()["model"] == "classifier"


# -- auth, absent models, page, docs ----------------------------------------------------------

def test_api_key_and_absent_model(server: Server) -> None:
    url = server.url + "/secure"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "nope"}):
        r = requests.post(url + "/v1/classify", data=IMG, timeout=30,
                          headers={"Content-Type": "image/png", **headers})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    assert requests.get(url + "/v1/models", timeout=30).status_code == 401
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
        r = requests.post(url + "/v1/classify", data=IMG, timeout=30,
                          headers={"Content-Type": "image/png", **headers})
        assert r.status_code == 200, r.text
    auth = {"X-API-Key": KEY}
    r = requests.post(url + "/v1/vae/sample", headers=auth, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = requests.get(url + "/v2/models/vae/ready", timeout=30)
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/classifier/ready", "/"):
        assert requests.get(url + path, timeout=30).status_code == 200, path
    assert [m["name"] for m in requests.get(url + "/v1/models", headers=auth,
                                            timeout=30).json()["models"]] == ["classifier"]


def test_page_and_docs(server: Server) -> None:
    page = requests.get(server.url + "/", timeout=30)
    assert page.status_code == 200 and 'data-base="/"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.split("<body")[0]  # no external assets
    assert requests.get(server.url + "/static/app.js", timeout=30).status_code == 200
    assert requests.get(server.url + "/static/../app.py", timeout=30).status_code == 404
    assert requests.get(server.url + "/docs", timeout=30).status_code == 200
    spec = requests.get(server.url + "/openapi.json", timeout=30).json()
    body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"image/png", "image/jpeg", "multipart/form-data", "application/json"} <= set(body)
    # every app's routes in one document (each model app declares its own OIP paths)
    assert {"/v2/models/classifier/infer", "/v2/models/vae/infer", "/v1/vae/sample",
            "/v1/models", "/v2/health/ready"} <= set(spec["paths"])


# -- bad inputs: every one a 4xx with a JSON error, and the service keeps serving -------------

def _bomb(w: int = 30_000, h: int = 30_000) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


PNG_H = {"Content-Type": "image/png"}
JSON_H = {"Content-Type": "application/json"}
FP32 = {"name": "input", "datatype": "FP32"}
BAD = [
    # (method, path, request kwargs, status, code or None for the OIP string error)
    ("POST", "/v1/classify", {"data": b"not an image", "headers": PNG_H}, 400, "invalid_image"),
    ("POST", "/v1/classify", {"data": IMG[: len(IMG) // 2], "headers": PNG_H}, 400,
     "invalid_image"),
    ("POST", "/v1/classify", {"data": b"", "headers": PNG_H}, 400, "invalid_image"),
    ("POST", "/v1/classify", {"data": _bomb(), "headers": PNG_H}, 413, "image_too_large"),
    ("POST", "/v1/classify", {"json": {"images": ["%%%not-base64"]}}, 400, "invalid_base64"),
    ("POST", "/v1/classify", {"json": {"images": "abc"}}, 400, "invalid_request"),
    ("POST", "/v1/classify", {"json": {"images": []}}, 400, "no_images"),
    ("POST", "/v1/classify", {"json": {"images": [b64(IMG)] * 65}}, 400, "too_many_images"),
    ("POST", "/v1/classify", {"data": b"{", "headers": JSON_H}, 400, "invalid_json"),
    ("POST", "/v1/classify", {"json": {"images": [b64(IMG)], "top_k": 0}}, 422,
     "invalid_parameter"),
    ("POST", "/v1/classify", {"json": {"images": [b64(IMG)], "colour": 1}}, 422,
     "invalid_parameter"),
    ("POST", "/v1/classify", {"data": b"x", "headers": {"Content-Type": "text/plain"}}, 415,
     "unsupported_media_type"),
    ("POST", "/v1/classify", {"data": b"\0" * (4 * 1024 * 1024 + 1), "headers": PNG_H}, 413,
     "payload_too_large"),
    ("POST", "/v1/classify", {"data": iter([b"\0" * (1 << 20)] * 5), "headers": PNG_H}, 413,
     "payload_too_large"),  # chunked, no Content-Length: cut off while streaming
    ("POST", "/v1/classify", {"files": [("f", ("a.txt", b"x", "text/plain"))] * 65}, 400,
     "invalid_multipart"),
    ("POST", "/v1/classify", {"data": {"top_k": "3"}, "files": []}, 415,
     "unsupported_media_type"),
    ("GET", "/v1/classify", {}, 405, "method_not_allowed"),
    ("GET", "/v1/nothing", {}, 404, "not_found"),
    ("POST", "/v1/vae/sample", {"json": {"n": 65}}, 422, "invalid_parameter"),
    ("POST", "/v1/vae/sample", {"json": {"temperature": -1}}, 422, "invalid_parameter"),
    ("POST", "/v1/vae/sample?format=xml", {}, 422, "invalid_parameter"),
    ("POST", "/v1/vae/sample", {"data": b"n=3", "headers": {"Content-Type": "text/plain"}}, 415,
     "unsupported_media_type"),
    ("POST", "/v1/vae/variations", {"json": {"images": [b64(IMG)] * 2}}, 400,
     "wrong_image_count"),
    ("POST", "/v1/vae/interpolate", {"json": {"images": [b64(IMG)]}}, 400, "wrong_image_count"),
    ("POST", "/v1/vae/interpolate", {"json": {"images": [b64(IMG)] * 2, "steps": 1}}, 422,
     "invalid_parameter"),
    ("POST", "/v2/models/nope/infer", {"json": {"inputs": []}}, 404, None),
    ("POST", "/v2/models/classifier/infer", {"data": b"[]", "headers": JSON_H}, 400, None),
    ("POST", "/v2/models/classifier/infer", {"json": {"inputs": [
        {**FP32, "shape": [1, 3, 8, 8], "data": [0.0] * 192}]}}, 400, None),
    ("POST", "/v2/models/classifier/infer", {"json": {"inputs": [
        {**FP32, "datatype": "FP64", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}}, 400,
     None),
    ("POST", "/v2/models/vae/infer", {"json": {"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(b"junk")]}]}}, 400,
     None),
    ("POST", "/v2/models/classifier/infer", {"data": b"\x1f\x8b junk", "headers": {
        **JSON_H, "Content-Encoding": "gzip"}}, 400, None),
    ("GET", "/v2/models/classifier/versions/v0", {}, 404, None),
]


def _expect_error(r: requests.Response, status: int, code: str | None) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    if code is None:
        assert isinstance(err, str) and err
    else:
        assert err["code"] == code and err["message"]


@pytest.mark.parametrize("method, path, kwargs, status, code", BAD,
                         ids=[f"{b[0]} {b[1].split('?')[0]} {b[3]} {b[4]}" for b in BAD])
def test_bad_input_is_4xx_json(server: Server, method: str, path: str, kwargs: dict,
                               status: int, code: str | None) -> None:
    _expect_error(requests.request(method, server.url + path, timeout=60, **kwargs), status,
                  code)


def _valid_request_still_works(server: Server) -> None:
    r = post(server, "/v1/classify", data=IMG, headers=PNG_H)
    assert r.status_code == 200, r.text


def test_hypothesis_bodies_are_4xx(server: Server) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
        | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
            st.sampled_from(["images", "image", "top_k", "n", "inputs", "outputs", "x"]), inner,
            max_size=4), max_leaves=12)
    mutated_png = st.tuples(st.integers(0, len(IMG) - 1), st.binary(min_size=1, max_size=8)).map(
        lambda t: IMG[: t[0]] + t[1] + IMG[t[0] + len(t[1]):])
    tensors = st.fixed_dictionaries({
        "name": st.sampled_from(["input", "image", "x"]),
        "datatype": st.sampled_from(["FP32", "BYTES", "INT8", "FP16"]),
        "shape": st.lists(st.integers(-1, 40), max_size=5),
        "data": st.lists(st.floats(allow_nan=False, width=32) | st.text(max_size=4), max_size=20),
    })
    cases = st.one_of(
        st.tuples(st.just("/v1/classify"), st.just("image/png"), st.binary(max_size=512)),
        st.tuples(st.just("/v1/classify"), st.just("image/png"), mutated_png),
        st.tuples(st.sampled_from(["/v1/classify", "/v1/vae/variations", "/v1/vae/sample"]),
                  st.just("application/json"), json_values.map(lambda v: json.dumps(v).encode())),
        st.tuples(st.sampled_from(["/v2/models/classifier/infer", "/v2/models/vae/infer"]),
                  st.just("application/json"),
                  st.lists(tensors, max_size=2).map(lambda t: json.dumps({"inputs": t}).encode())),
    )

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases)
    def check(case: tuple[str, str, bytes]) -> None:
        path, ctype, body = case
        r = post(server, path, data=body, headers={"Content-Type": ctype})
        if r.status_code == 200:  # a harmless mutation of a valid PNG, or valid options
            return
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:200], body[:100])
        assert "error" in r.json()

    check()
    _valid_request_still_works(server)
