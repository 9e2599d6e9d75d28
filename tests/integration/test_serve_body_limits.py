"""A body over the limit gets a 413 that every common client can read.

64 MiB bodies (16 times ``max_body_bytes``) with ``Content-Length`` and chunked, from curl,
requests and urllib. urllib sends its whole body before it reads the answer: if the server
closed with the body unread, the kernel would reset the connection and urllib would see
``ConnectionResetError`` instead of the 413 (``serve_app.body_drain``). Each client is tried
through HAProxy (the port users call) and on the replica's own direct-ingress port, where no
proxy buffers anything for it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from serve_app.dataplane import applied, embedded_env
from serve_app.deploy import app_config, deploy, load_config
from serve_app.testing import free_port, make_classifier, replica_address

pytestmark = pytest.mark.ray

SIZE = 64 * 1024 * 1024
CHUNK = 1 << 20
JPEG = {"Content-Type": "image/jpeg"}


@pytest.fixture(scope="module")
def urls(tmp_path_factory) -> dict[str, str]:
    """Base URLs of the classifier: through HAProxy and on its replica's own port."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    clf = make_classifier(tmp_path_factory.mktemp("limits") / "clf")
    port = free_port()
    env = embedded_env()
    with applied(env):
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 logging_level=logging.WARNING)
    try:
        deploy(app_config(load_config(), {"classifier": str(clf)}, host="127.0.0.1", port=port))
        # The replica's direct-ingress HTTP server (Serve hands out ports from 30000-31000).
        direct = replica_address("classifier", "Classifier",
                                 int(env["RAY_SERVE_HAPROXY_STATS_PORT"]))
        yield {"haproxy": f"http://127.0.0.1:{port}", "replica": f"http://{direct}"}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("body") / "big.jpg"
    with path.open("wb") as f:
        for _ in range(SIZE // CHUNK):
            f.write(b"\xff" * CHUNK)
    return path


def _chunks() -> Iterator[bytes]:
    for _ in range(SIZE // CHUNK):
        yield b"\xff" * CHUNK


def _with_curl(url: str, big: Path, chunked: bool) -> tuple[int, dict]:
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl is not installed (.ci/system-deps.sh installs it)")
    headers = ["-H", "Content-Type: image/jpeg"]
    if chunked:
        headers += ["-H", "Transfer-Encoding: chunked"]
    out = subprocess.run([curl, "-sS", "-w", "\n%{http_code}", *headers, "--data-binary",
                          f"@{big}", url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    body, status = out.stdout.rsplit("\n", 1)
    return int(status), json.loads(body)


def _with_requests(url: str, big: Path, chunked: bool) -> tuple[int, dict]:
    data = _chunks() if chunked else big.read_bytes()
    r = requests.post(url, data=data, headers=JPEG, timeout=120)
    return r.status_code, r.json()


def _with_urllib(url: str, big: Path, chunked: bool) -> tuple[int, dict]:
    data = _chunks() if chunked else big.read_bytes()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=JPEG),
                                    timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


CLIENTS = {"curl": _with_curl, "requests": _with_requests, "urllib": _with_urllib}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("via", ["haproxy", "replica"])
@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_a_64_mib_body_gets_a_readable_413(urls, big_file, client, via, chunked) -> None:
    status, body = CLIENTS[client](urls[via] + "/v1/classify", big_file, chunked)
    assert status == 413
    assert body["error"]["code"] == "payload_too_large"
    assert "4194304" in body["error"]["message"]


def test_the_server_answers_normally_afterwards(urls) -> None:
    from serve_app.testing import png_bytes, random_images

    r = requests.post(urls["haproxy"] + "/v1/classify", data=png_bytes(random_images(1)[0]),
                      headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200 and r.json()["predictions"]
