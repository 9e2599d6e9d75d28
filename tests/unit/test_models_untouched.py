"""No command writes into a checkpoint it was only given to read: the read-only commands run
with their defaults on a copy of the shipped ``models/`` (found through ``$MVE_DEFAULT_*``, as
the shipped defaults are), and every file of the copy is byte-identical afterwards. The
commands that may write into a checkpoint (``mve vae fit-prior`` and ``report``) refuse to
without ``--out`` or ``--in-place``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _archives import colour_archive  # tests/integration/_archives.py
from _digests import tree_digests  # tests/integration/_digests.py

from serve_app.testing import CIFAR10_CLASSES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name in ("cifar10-classifier", "cifar10-vae"):
        shutil.copytree(REPO / "models" / name, root / name)
    return root


def _mve(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    code = "import sys; from mve_cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600)


def test_read_only_commands_leave_the_models_byte_identical(models_copy, tmp_path):
    before = tree_digests(models_copy)
    # the shipped checkpoints record a 5,000-image validation hold-out: 505 per class holds it
    data = colour_archive(tmp_path / "data", names=CIFAR10_CLASSES, per_class=505, noise=10)
    image = tmp_path / "cat.png"
    shutil.copy(next((tmp_path / "data" / "train" / "cat").iterdir()), image)
    env = {**os.environ, "MVE_DEFAULT_CLASSIFIER": str(models_copy / "cifar10-classifier"),
           "MVE_DEFAULT_VAE": str(models_copy / "cifar10-vae"), "PYTHONPATH": str(REPO)}
    work = tmp_path / "work"
    work.mkdir()
    commands = [
        ("predict", str(image)),
        ("evaluate", "--data", str(data), "--device", "cpu", "--limit", "20"),
        ("evaluate", str(models_copy / "cifar10-vae"), "--data", str(data), "--device", "cpu",
         "--limit", "10"),
        ("generate", "--vae", str(models_copy / "cifar10-vae"), "--n", "4", "--out",
         str(work / "grid.png")),
    ]
    for args in commands:
        out = _mve(*args, cwd=work, env=env)
        assert out.returncode == 0, (args, out.stderr[-2000:])
    for action in ("fit-prior", "report"):  # may write: only when told where
        out = _mve("vae", action, str(models_copy / "cifar10-vae"), "--data", str(data),
                   cwd=work, env=env)
        assert out.returncode == 2 and "--in-place" in out.stderr
    assert tree_digests(models_copy) == before
    assert list(work.glob("confusion_matrix_*.png"))  # evaluate wrote where it runs, not there
