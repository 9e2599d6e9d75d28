"""Bad input at scale: 1,100 generated malformed requests across every route (random bytes,
truncated images, decompression bombs, huge bodies, wrong JSON, wrong OIP tensors, wrong
content types, broken multipart, wrong methods and paths), 4 at a time, with a valid request
interleaved after every 10th.

Every malformed request must get a 4xx with a JSON error body (never a 5xx, never a hang:
each has a 60 s client timeout), every valid one a 200; the replicas and the proxy must be the
same processes at the end (nothing restarted), and their memory must stay bounded (RSS growth
below :data:`RSS_GROWTH_LIMIT_MIB` per process over all requests, and below half of that over
the second half of them). Figures: counts per category and status, RSS
before/after (see RELIABILITY.md)."""

from __future__ import annotations

import base64
import gzip
import io
import json
import struct
import threading
import time
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from serve_app.deploy import app_config, fixed_replicas, load_config
from serve_app.testing import free_port, make_classifier, make_vae, png_bytes, random_images

pytestmark = pytest.mark.ray

N_BAD = 1100
VALID_EVERY = 10
WORKERS = 4
TIMEOUT_S = 60.0
RSS_GROWTH_LIMIT_MIB = 256
LIMIT = 4 * 1024 * 1024  # max_body_bytes in serve_app/config.yaml
SERVER_CLASSES = {"front": "ServeReplica:mve:Front",
                  "classifier": "ServeReplica:classifier:Classifier",
                  "classifier-oip": "ServeReplica:classifier-oip:Classifier",
                  "vae": "ServeReplica:vae:VAE", "vae-oip": "ServeReplica:vae-oip:VAE",
                  "haproxy-manager": "HAProxyManager"}


@pytest.fixture(scope="module")
def url(serve_instance, tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("bad-input")
    checkpoints = {"classifier": str(make_classifier(d / "clf", seed=1)),
                   "vae": str(make_vae(d / "vae", seed=2))}
    config = app_config(load_config(), checkpoints, host="127.0.0.1", port=free_port())
    return serve_instance(fixed_replicas(config, 1))  # one replica each: stable RSS


# -- the malformed requests ------------------------------------------------------------------

@dataclass
class Case:
    category: str
    method: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)


IMAGE_ROUTES = ("/v1/classify", "/v1/vae/reconstruct", "/v1/vae/variations",
                "/v1/vae/interpolate")
OIP_ROUTES = ("/v2/models/classifier/infer", "/v2/models/vae/infer",
              "/v2/models/classifier/versions/{v}/infer")
ALL_POST = IMAGE_ROUTES + ("/v1/vae/sample",) + OIP_ROUTES
PNG = png_bytes(random_images(1, size=32, seed=5)[0])
JPEG = png_bytes(random_images(1, size=48, seed=6)[0], "JPEG")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bomb(w: int, h: int) -> bytes:
    """A tiny PNG whose header declares ``w`` x ``h`` pixels."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 256)) + _chunk(b"IEND", b""))


def jpeg_bomb(w: int, h: int) -> bytes:
    """A real JPEG with its frame header (SOF0) patched to declare ``w`` x ``h`` pixels."""
    data = bytearray(JPEG)
    at = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, at + 5, h, w)
    return bytes(data)


def solid_png(size: int) -> bytes:
    """A ``size``-pixel square of one colour: a few KB that decode to ``size``^2 pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


MEGA = solid_png(1000)  # 1,000,000 pixels: under the per-image limit, 17 are over the total


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def raw(data: bytes, ctype: str = "image/png") -> dict[str, Any]:
    return {"data": data, "headers": {"Content-Type": ctype}}


def as_json(obj: Any) -> dict[str, Any]:
    return {"data": json.dumps(obj).encode(), "headers": {"Content-Type": "application/json"}}


def image_forms(rng: np.random.Generator, blob: bytes) -> dict[str, Any]:
    """``blob`` as raw bytes, a multipart file or base64 JSON (picked at random)."""
    form = rng.integers(3)
    if form == 0:
        return raw(blob, str(rng.choice(["image/png", "image/jpeg",
                                          "application/octet-stream"])))
    if form == 1:
        return {"files": [("file", ("x.png", blob, "image/png"))]}
    return as_json({"images": [b64(blob)]})


def oip_bytes(blob: bytes) -> dict[str, Any]:
    return as_json({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                "data": [b64(blob)]}]})


def gen_random_bytes(rng: np.random.Generator) -> Case:
    blob = rng.bytes(int(rng.integers(1, 4096)))
    path = str(rng.choice(IMAGE_ROUTES + OIP_ROUTES))
    if path.startswith("/v2"):
        kwargs = raw(blob, "application/json") if rng.random() < 0.5 else oip_bytes(blob)
    else:
        kwargs = image_forms(rng, blob)
    return Case("random bytes", "POST", path, kwargs)


def gen_truncated(rng: np.random.Generator) -> Case:
    src = PNG if rng.random() < 0.5 else JPEG
    # The last ~20 bytes of a PNG are the IEND chunk: without it the image is still whole.
    blob = src[: int(rng.integers(1, len(src) - 24))]
    path = str(rng.choice(("/v1/classify", "/v1/vae/reconstruct", "/v1/vae/variations",
                           "/v2/models/classifier/infer", "/v2/models/vae/infer")))
    return Case("truncated image", "POST", path,
                oip_bytes(blob) if path.startswith("/v2") else image_forms(rng, blob))


def gen_bomb(rng: np.random.Generator) -> Case:
    kind = rng.integers(5)
    path = str(rng.choice(("/v1/classify", "/v1/vae/reconstruct", "/v2/models/classifier/infer")))
    if kind == 4:  # many small-on-the-wire images that decode past the total-pixel limit
        return Case("decompression bomb", "POST", "/v1/classify",
                    as_json({"images": [b64(MEGA)] * 17}))
    if kind == 3:  # a gzip body that inflates far past the body limit
        body = gzip.compress(b"{" + b" " * (64 * 1024 * 1024) + b"}", compresslevel=1)
        return Case("decompression bomb", "POST", "/v2/models/classifier/infer",
                    {"data": body, "headers": {"Content-Type": "application/json",
                                               "Content-Encoding": "gzip"}})
    w, h = [(50_000, 50_000), (20_000, 20_000), (1025, 1025), (100_000, 11), (65_535, 65_535)][
        int(rng.integers(5))]
    blob = png_bomb(w, h) if kind < 2 else jpeg_bomb(min(w, 65_535), min(h, 65_535))
    return Case("decompression bomb", "POST", path,
                oip_bytes(blob) if path.startswith("/v2") else image_forms(rng, blob))


def gen_huge(rng: np.random.Generator) -> Case:
    size = int(rng.choice([LIMIT + 1, 6 * 1024 * 1024, 16 * 1024 * 1024]))
    path = str(rng.choice(ALL_POST)).format(v="x")
    if rng.random() < 0.3:  # chunked: no Content-Length, cut off while streaming
        data: Any = iter([b"\0" * (1 << 20)] * (size // (1 << 20) + 1))
    else:
        data = b"\0" * size
    return Case("huge body", "POST", path, {"data": data, "headers": {
        "Content-Type": "application/json" if "/v2" in path or "sample" in path
        else "image/png"}})


WRONG_JSON_BODIES = [
    b"{", b"[]", b"null", b"42", b'"images"', b"{'images': []}", b'{"images": "abc"}',
    b'{"images": [1, 2]}', b'{"images": [null]}', b'{"images": []}', b'{"image": 5}',
    b'{"images": ["%%%"]}', b'{"images": ["aGVsbG8="], "image": "aGVsbG8="}',
    b'{"images": ["aGVsbG8="], "top_k": "x"}', b'{"top_k": 0}', b'{"colour": 1}',
    b"\xff\xfe{\x00}", b'{"a": ' * 50 + b"1" + b"}" * 49,
]


def gen_wrong_json(rng: np.random.Generator) -> Case:
    path = str(rng.choice(IMAGE_ROUTES + ("/v1/vae/sample",)))
    if rng.random() < 0.6:
        body = WRONG_JSON_BODIES[int(rng.integers(len(WRONG_JSON_BODIES)))]
        if path == "/v1/vae/sample" and body in (b'{"top_k": 0}', b'{"images": []}'):
            body = b'{"n": "many"}'
        return Case("wrong JSON", "POST", path, raw(body, "application/json"))
    if path == "/v1/vae/sample":
        bad = rng.choice([{"n": 0}, {"n": 65}, {"n": "x"}, {"temperature": -1},
                          {"seed": "s"}, {"n": 2, "what": 1}, {"n": [1]}])
        return Case("wrong JSON", "POST", path, as_json(dict(bad)))
    bad_params = {"/v1/classify": [{"top_k": 0}, {"top_k": 1001}, {"top_k": "x"}, {"k": 1}],
                  "/v1/vae/reconstruct": [{"n": 2}],
                  "/v1/vae/variations": [{"n": 65}, {"temperature": -2}],
                  "/v1/vae/interpolate": [{"steps": 1}, {"steps": 33}, {"method": "cubic"}]}
    images = [b64(PNG)] * (2 if path.endswith("interpolate") else 1)
    params = bad_params[path][int(rng.integers(len(bad_params[path])))]
    return Case("wrong JSON", "POST", path, as_json({"images": images, **params}))


def gen_oip(rng: np.random.Generator) -> Case:
    path = str(rng.choice(OIP_ROUTES)).format(v="not-the-version")
    n = int(rng.integers(1, 4))
    good = {"name": "input", "datatype": "FP32", "shape": [n, 3, 32, 32],
            "data": [0.0] * (n * 3072)}
    kind = int(rng.integers(14))
    spec = dict(good)
    extra: dict[str, Any] = {}
    headers = {"Content-Type": "application/json"}
    if kind == 0:
        spec["datatype"] = str(rng.choice(["FP64", "FP16", "INT8", "UINT8", "BOOL", "BYTES"]))
    elif kind == 1:
        spec["shape"] = [n, 3, int(rng.integers(1, 31)), 32]
        spec["data"] = [0.0] * (n * 3 * spec["shape"][2] * 32)
    elif kind == 2:
        spec["shape"] = [n, int(rng.choice([1, 2, 4])), 32, 32]
    elif kind == 3:
        spec["data"] = [0.0] * int(rng.integers(0, n * 3072 - 1))
    elif kind == 4:
        shapes = [[], [n], [n, 3072], [-1, 3, 32, 32], [0, 3, 32, 32], [65, 3, 32, 32],
                  [n, 3, 32, 32, 1], "1,3,32,32"]
        spec["shape"] = shapes[int(rng.integers(len(shapes)))]
    elif kind == 5:
        spec["data"] = ["a"] * (n * 3072)
    elif kind == 6:
        spec["name"] = str(rng.choice(["x", "INPUT", "", "images"]))
    elif kind == 7:
        spec["parameters"] = {"binary_data_size": int(rng.integers(1, 10_000))}
        del spec["data"]
    elif kind == 8:
        head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                       "shape": [1, 3, 32, 32],
                                       "parameters": {"binary_data_size": 12288}}]}).encode()
        blob = head + rng.bytes(int(rng.integers(0, 12287)))
        headers["Inference-Header-Content-Length"] = str(
            int(rng.choice([len(head), len(blob) + 10, 0, -1])))
        return Case("wrong tensor", "POST", path, {"data": blob, "headers": headers})
    elif kind == 9:
        body = json.dumps({"inputs": [good]}).replace("0.0", "NaN", 1).encode()
        return Case("wrong tensor", "POST", path, {"data": body, "headers": headers})
    elif kind == 10:
        extra = {"outputs": [{"name": str(rng.choice(["logits", "reconstruction_x", "x"]))}]}
    elif kind == 11:
        return Case("wrong tensor", "POST", path, as_json({"inputs": [good, good]}))
    elif kind == 12:
        return Case("wrong tensor", "POST", path, as_json({"inputs": good}))
    else:
        return Case("wrong tensor", "POST", path, as_json(
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [1, 2]}]}))
    return Case("wrong tensor", "POST", path, as_json({"inputs": [spec], **extra}))


def gen_content_type(rng: np.random.Generator) -> Case:
    path = str(rng.choice(IMAGE_ROUTES + ("/v1/vae/sample",)))
    ctype = str(rng.choice(["text/plain", "application/xml", "image/gif", "image/webp",
                            "application/x-www-form-urlencoded", "", "multipart/form-data",
                            "multipart/mixed; boundary=x", "application/json"]))
    body = {"image/gif": b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"}.get(ctype, PNG)
    if path == "/v1/vae/sample":
        body = b'{"n": 2}' if ctype.startswith("application/json") else b"n=2"
        if ctype.startswith("application/json"):
            ctype = "text/plain"
    headers = {"Content-Type": ctype} if ctype else {}
    # application/json on image routes: a PNG body labelled as JSON.
    return Case("wrong content type", "POST", path, {"data": body, "headers": headers})


def gen_multipart(rng: np.random.Generator) -> Case:
    path = str(rng.choice(IMAGE_ROUTES))
    kind = int(rng.integers(5))
    if kind == 0:  # boundary in the header that the body never uses
        return Case("broken multipart", "POST", path, raw(
            b"--other\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a\"\r\n\r\n"
            + PNG + b"\r\n--other--\r\n", "multipart/form-data; boundary=expected"))
    if kind == 1:  # too many files
        return Case("broken multipart", "POST", path,
                    {"files": [("f", ("a.png", PNG, "image/png"))] * 65})
    if kind == 2:  # a non-file field over the part-size limit
        return Case("broken multipart", "POST", path,
                    {"files": [("f", ("a.png", PNG, "image/png"))],
                     "data": {"top_k": "1" * 70_000}})
    if kind == 3:  # files that are not images
        return Case("broken multipart", "POST", path,
                    {"files": [("f", ("a.txt", rng.bytes(64), "text/plain"))]})
    return Case("broken multipart", "POST", path,  # no file at all, only options
                {"files": [("top_k", (None, "3"))]})


def gen_route(rng: np.random.Generator) -> Case:
    kind = int(rng.integers(6))
    if kind == 0:
        return Case("wrong method or path", "GET", str(rng.choice(ALL_POST)).format(v="x"))
    if kind == 1:
        return Case("wrong method or path", str(rng.choice(["PUT", "DELETE", "PATCH"])),
                    str(rng.choice(ALL_POST + ("/v1/models",))).format(v="x"))
    if kind == 2:
        return Case("wrong method or path", "POST", "/v2/models/nope/infer",
                    as_json({"inputs": []}))
    if kind == 3:
        return Case("wrong method or path", "GET",
                    str(rng.choice(["/v2/models/nope", "/v2/models/nope/ready",
                                    "/v2/models/classifier/versions/v0",
                                    "/v2/models/vae/versions/v0/ready"])))
    if kind == 4:
        return Case("wrong method or path", "GET", "/v1/" + rng.bytes(6).hex())
    return Case("wrong method or path", "GET", "/static/../serve_app/app.py")


GENERATORS = [  # (generator, weight)
    (gen_random_bytes, 20), (gen_truncated, 18), (gen_bomb, 12), (gen_huge, 2),
    (gen_wrong_json, 16), (gen_oip, 16), (gen_content_type, 8), (gen_multipart, 6),
    (gen_route, 6),
]


def generate(n: int, seed: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    weights = np.array([w for _, w in GENERATORS], dtype=float)
    picks = rng.choice(len(GENERATORS), size=n, p=weights / weights.sum())
    return [GENERATORS[i][0](rng) for i in picks]


VALID = [
    Case("valid", "POST", "/v1/classify", raw(PNG)),
    Case("valid", "POST", "/v1/classify", as_json({"images": [b64(PNG), b64(JPEG)]})),
    Case("valid", "POST", "/v1/vae/reconstruct", {"files": [("f", ("a.png", PNG, "image/png"))]}),
    Case("valid", "POST", "/v1/vae/sample", as_json({"n": 2, "seed": 1})),
    Case("valid", "POST", "/v2/models/classifier/infer", as_json({"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.1] * 3072}]})),
    Case("valid", "POST", "/v2/models/vae/infer", oip_bytes(PNG)),
]


# -- running them ------------------------------------------------------------------------------

_local = threading.local()


def send(base: str, case: Case) -> tuple[int, str]:
    """``(status, error)``: status 0 with the exception's name when no response came."""
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    try:
        r = session.request(case.method, base + case.path, timeout=TIMEOUT_S, **case.kwargs)
    except requests.RequestException as exc:
        _local.session = None
        return 0, type(exc).__name__
    if 400 <= r.status_code < 500:
        try:
            if "error" not in r.json():
                return r.status_code, "no JSON error"
        except ValueError:
            return r.status_code, "not JSON"
    return r.status_code, ""


def rss_mib() -> dict[str, float]:
    """Resident memory (MiB) of the replicas and the proxy, from /proc."""
    from ray._private import state

    out: dict[str, float] = {}
    alive = [i for i in state.actors().values() if i["State"] == "ALIVE"]
    for name, cls in SERVER_CLASSES.items():
        (pid,) = [i["Pid"] for i in alive if i["ActorClassName"] == cls]
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out[name] = round(int(line.split()[1]) / 1024, 1)
    return out


def server_actors() -> dict[str, str]:
    from ray._private import state

    return {aid: i["ActorClassName"] for aid, i in state.actors().items()
            if i["State"] == "ALIVE" and i["ActorClassName"] in SERVER_CLASSES.values()}


def run(base: str, cases: list[Case]) -> list[tuple[Case, int, str]]:
    """Sends the cases 4 at a time with a valid request after every 10th."""
    schedule: list[Case] = []
    for i, case in enumerate(cases, 1):
        schedule.append(case)
        if i % VALID_EVERY == 0:
            schedule.append(VALID[(i // VALID_EVERY) % len(VALID)])
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda c: send(base, c), schedule))
    return [(c, s, e) for c, (s, e) in zip(schedule, results, strict=True)]


def problems(results: list[tuple[Case, int, str]]) -> list[tuple[Any, ...]]:
    """Malformed requests without a 4xx JSON error, and valid ones without a 200."""
    return [(c.category, c.method, c.path, str(c.kwargs)[:160], s, e) for c, s, e in results
            if (s != 200 if c.category == "valid" else not 400 <= s < 500 or e)]


def tally(results: list[tuple[Case, int, str]]) -> dict[str, Any]:
    per: dict[str, Counter] = defaultdict(Counter)
    for case, status, _ in results:
        per[case.category][str(status)] += 1
    return {cat: {"sent": sum(c.values()), "statuses": dict(sorted(c.items()))}
            for cat, c in sorted(per.items())}


def test_generated_malformed_requests_are_4xx_and_the_server_stays_healthy(
        url: str, record_figures) -> None:
    warmup = run(url, generate(60, seed=1))  # first use of each code path, not counted
    assert not problems(warmup), problems(warmup)[:10]
    actors = server_actors()
    rss_before = rss_mib()
    t0 = time.monotonic()
    cases = generate(N_BAD, seed=8)
    results = run(url, cases[: N_BAD // 2])
    rss_mid = rss_mib()
    results += run(url, cases[N_BAD // 2:])
    elapsed = time.monotonic() - t0
    rss_after = rss_mib()
    bad = [(c, s, e) for c, s, e in results if c.category != "valid"]
    valid = [(c, s, e) for c, s, e in results if c.category == "valid"]
    figures = {
        "malformed_requests": len(bad), "valid_interleaved": len(valid),
        "concurrency": WORKERS, "seconds": round(elapsed, 1),
        "by_category": tally(bad),
        "statuses": dict(sorted(Counter(str(s) for _, s, _ in bad).items())),
        "valid_statuses": dict(Counter(str(s) for _, s, _ in valid)),
        "rss_mib_before": rss_before, "rss_mib_half": rss_mid, "rss_mib_after": rss_after,
        "rss_growth_mib": {k: round(rss_after[k] - rss_before[k], 1) for k in rss_before},
        "rss_growth_second_half_mib": {k: round(rss_after[k] - rss_mid[k], 1)
                                       for k in rss_before},
    }
    record_figures("bad_input", figures)
    wrong = problems(results)
    assert not wrong, f"{len(wrong)} wrong answers (malformed: not a 4xx JSON error; valid: " \
                      f"not 200): {wrong[:10]}"
    assert len(bad) >= 1000 and len({c.category for c, _, _ in bad}) == len(GENERATORS)
    assert {c.path.split("/")[2] for c, _, _ in bad} >= {"classify", "vae", "models"}
    assert server_actors() == actors, "a replica or the proxy restarted"
    # Bounded, not leaking: a generous cap on the total growth, and the second half of the
    # requests (the same mix) must add at most half of it (a leak would add as much again).
    for name, growth in figures["rss_growth_mib"].items():
        assert growth < RSS_GROWTH_LIMIT_MIB, f"{name} grew by {growth} MiB: {figures}"
        late = figures["rss_growth_second_half_mib"][name]
        assert late < RSS_GROWTH_LIMIT_MIB / 2, f"{name} grew by {late} MiB late: {figures}"
    assert requests.get(url + "/v2/health/ready", timeout=30).status_code == 200

