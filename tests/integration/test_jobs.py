"""`ray start --head`, then `ray job submit` of an mve entrypoint, as a user would."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _archives import TINY_SPACE, colour_archive  # tests/integration/_archives.py

from mve.checkpoint import load_checkpoint

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


_TOKEN = secrets.token_hex(32)


def _env() -> dict[str, str]:
    """Token authentication on, with a token of this test's own (what the README prescribes)."""
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # as with an activated venv
    return {**os.environ, "PATH": path, "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _TOKEN}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return colour_archive(tmp_path_factory.mktemp("jobdata"), seed=1)


def _pids_of(session_root: str) -> list[int]:
    """Processes whose command line names this head's temp dir: its raylet, GCS, workers..."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if session_root in cmdline:
            pids.append(int(proc.name))
    return pids


def _stop_head(session_root: str) -> None:
    """Stops only this test's Ray head (unlike `ray stop`, which kills every Ray on the host)."""
    import signal
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _pids_of(session_root):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while _pids_of(session_root) and time.monotonic() < deadline:
            time.sleep(0.5)


@pytest.fixture(scope="module")
def head():
    """A real head node started with `ray start --head` in a temp dir of its own."""
    import shutil
    import tempfile

    port, dash = _free_port(), _free_port()
    env = _env()
    root = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths are limited
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
                        "--include-dashboard=true", f"--dashboard-port={dash}",
                        "--dashboard-host=127.0.0.1", "--disable-usage-stats",
                        f"--temp-dir={root}"],
                       check=True, env=env, capture_output=True, timeout=180)
        yield f"http://127.0.0.1:{dash}"
    finally:
        _stop_head(root)
        leftover = _pids_of(root)
        shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"Ray processes of the test head survived: {leftover}"


def _submit(cmd: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the new head's job agent is still starting up."""
    import time

    deadline = time.monotonic() + 300  # a loaded 2-core machine starts the agent slowly
    while True:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
        if "No available agent to submit job" not in proc.stderr + proc.stdout or \
                time.monotonic() > deadline:
            return proc
        time.sleep(3)


SPACE = TINY_SPACE


def test_ray_job_submit_of_the_tune_entrypoint(head, archive, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out = tmp_path / "out"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head, "--working-dir", str(REPO),
           "--", "python", "-m", "cluster.tune", "classifier", "--data", str(archive),
           "--space", str(space), "--samples", "2", "--max-epochs", "1", "--val-size", "30",
           "--storage", str(tmp_path / "storage"), "--out", str(out)]
    proc = _submit(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + 2 trials
    ck = load_checkpoint(out / "best")
    assert ck.class_names == ["c0", "c1", "c2"]
    assert (out / "best.yaml").exists() and (out / "trial_curves.png").exists()
