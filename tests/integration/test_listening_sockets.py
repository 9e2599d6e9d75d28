"""An embedded mve command listens on loopback only, unless the user asked for more.

Each command runs as a user runs it (a subprocess of the ``mve`` entry point, its own embedded
Ray); the test reads the listening TCP sockets of its whole process tree from ``/proc``
(:mod:`_sockets`): the driver, GCS, raylet, agents, dashboard, workers, Serve's replicas and
HAProxy. ``mve train`` and ``mve tune`` are sampled while they run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _archives import TINY_SPACE, colour_archive  # tests/integration/_archives.py
from _sockets import Listener, listeners

from serve_app.testing import free_port, make_classifier

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
MVE = [sys.executable, "-m", "mve_cli"]
SMALL = ["--set", "model.num_classes=3", "--set", "model.cnn_layers=3",
         "--set", "model.starting_channels=8", "--set", "model.final_channels=16",
         "--set", "model.fcn_layers=2", "--set", "batch_size=20"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    return env


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return colour_archive(tmp_path_factory.mktemp("data"), classes=3, per_class=40)


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (mve serve's clean stop), then the process group by SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _serve(log: Path, *args: str) -> subprocess.Popen:
    """``mve serve ARGS``, once it says it is ready."""
    out = log.open("w")
    proc = subprocess.Popen([*MVE, "serve", *args], cwd=REPO, env=_env(), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while "Ctrl-C to stop" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"mve serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc


def _watch(cmd: list[str], log: Path, timeout: float = 420) -> tuple[int, set[Listener]]:
    """Runs ``cmd`` to the end, reading its tree's listening sockets every 0.2 s."""
    seen: set[Listener] = set()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                seen.update(listeners(proc.pid))
                time.sleep(0.2)
        finally:
            _stop(proc)
    return proc.returncode, seen


def _table(seen: set[Listener]) -> str:
    return "\n".join(f"{s.host:>16} {s.port:>6}  {s.process}" for s in sorted(seen))


def _assert_ray_seen(seen: set[Listener]) -> None:
    """The sample saw the embedded Ray itself (else 'nothing exposed' would prove nothing)."""
    names = {s.process for s in seen}
    assert any("gcs_server" in n for n in names), _table(seen)
    assert any("raylet" in n for n in names), _table(seen)


def _outside_address() -> str | None:
    """An address of this machine other than loopback (the one its default route uses)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent; it only picks a source address
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_mve_serve_listens_on_loopback_only(tmp_path) -> None:
    """The shipped models, mve serve's defaults, and a metrics port asked for."""
    port, metrics = free_port(), free_port()
    proc = _serve(tmp_path / "serve.log", "--port", str(port), "--metrics-port", str(metrics))
    try:
        seen = set(listeners(proc.pid))
    finally:
        _stop(proc)
    _assert_ray_seen(seen)
    assert {port, metrics} <= {s.port for s in seen}, _table(seen)
    assert any("ServeReplica" in s.process for s in seen), _table(seen)
    wide = [s for s in seen if not s.loopback]
    assert not wide, "listening beyond loopback:\n" + _table(set(wide))


def test_host_and_metrics_host_widen_only_their_own_ports(tmp_path) -> None:
    clf = make_classifier(tmp_path / "clf")
    port, metrics = free_port(), free_port()
    proc = _serve(tmp_path / "serve.log", "--classifier", str(clf), "--no-defaults",
                  "--host", "0.0.0.0", "--port", str(port), "--metrics-port", str(metrics),
                  "--metrics-host", "0.0.0.0")
    try:
        seen = set(listeners(proc.pid))
        host = _outside_address() or "127.0.0.1"
        with urllib.request.urlopen(f"http://{host}:{metrics}/metrics", timeout=30) as r:
            scrape = r.read().decode()
        with pytest.raises(urllib.error.HTTPError) as other:
            urllib.request.urlopen(f"http://{host}:{metrics}/", timeout=30)
        with urllib.request.urlopen(f"http://{host}:{port}/v1/models", timeout=30) as r:
            assert r.status == 200
    finally:
        _stop(proc)
    _assert_ray_seen(seen)
    wide = {s.port for s in seen if not s.loopback}
    assert wide == {port, metrics}, _table(seen)
    assert "ray_" in scrape
    assert other.value.code == 404


def test_mve_train_listens_on_loopback_only(archive, tmp_path) -> None:
    code, seen = _watch([*MVE, "train", "classifier", "--preset", "baseline", "--data",
                         str(archive), "--epochs", "2", "--val-size", "30", *SMALL,
                         "--out", str(tmp_path / "out"), "--storage", str(tmp_path / "s")],
                        tmp_path / "train.log")
    assert code == 0, (tmp_path / "train.log").read_text()[-3000:]
    _assert_ray_seen(seen)
    wide = [s for s in seen if not s.loopback]
    assert not wide, "listening beyond loopback:\n" + _table(set(wide))


def test_mve_tune_listens_on_loopback_only(archive, tmp_path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(TINY_SPACE)
    code, seen = _watch([*MVE, "tune", "classifier", "--data", str(archive), "--space",
                         str(space), "--val-size", "30", "--samples", "2", "--max-epochs", "1",
                         "--storage", str(tmp_path / "s"), "--out", str(tmp_path / "out"),
                         "-v", "0"], tmp_path / "tune.log")
    assert code == 0, (tmp_path / "tune.log").read_text()[-3000:]
    _assert_ray_seen(seen)
    wide = [s for s in seen if not s.loopback]
    assert not wide, "listening beyond loopback:\n" + _table(set(wide))
