"""`ray start --head`, then `ray job submit` of an mve entrypoint, as a user would."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
    root = tmp_path_factory.mktemp("jobdata")
    rng = np.random.default_rng(1)
    with tarfile.open(root / "d.tar.gz", "w:gz") as tar:
        for k in range(3):
            d = root / "train" / f"c{k}"
            d.mkdir(parents=True)
            for i in range(40):
                px = np.clip(rng.normal(50 + 70 * k, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{i}.png")
        tar.add(root / "train", arcname="train")
    return root / "d.tar.gz"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A real head node started with `ray start --head`; stopped (with all its processes) after."""
    port, dash = _free_port(), _free_port()
    env = _env()
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=true", f"--dashboard-port={dash}",
                    "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True,
                       timeout=120)


def test_ray_job_submit_of_the_train_entrypoint(head, archive, tmp_path):
    out = tmp_path / "out"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head, "--working-dir", str(REPO),
           "--", "python", "-m", "cluster.train", "classifier", "--data", str(archive),
           "--epochs", "1", "--set", "model.num_classes=3", "--set", "data.val_size=30",
           "--set", "model.cnn_layers=3", "--set", "model.final_channels=16",
           "--set", "model.fcn_layers=2", "--storage", str(tmp_path / "storage"),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    ck = load_checkpoint(out)
    assert ck.class_names == ["c0", "c1", "c2"] and ck.meta["metrics"]["epoch"] == 1
    assert (out / "REPORT.md").exists()
