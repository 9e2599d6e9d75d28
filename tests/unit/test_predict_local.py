"""``mve predict`` without a server, ``mve generate --vae`` and ``mve models``: the commands a
newcomer runs first, as subprocesses (no Ray; the answer has the server's JSON shape)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _digests import tree_digests  # tests/integration/_digests.py
from PIL import Image

import mve
from serve_app.schemas import ClassifyResponse

ROOT = Path(__file__).resolve().parents[2]


def _mve(*args: str, cwd: Path, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    code = ("import sys; from mve_cli.main import main; rc = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules, 'imported ray'; sys.exit(rc)")
    base = {k: v for k, v in os.environ.items() if k != "MVE_URL"}
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, text=True,
                         capture_output=True, timeout=120, env={**base, **(env or {})})
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("predict")
    paths = []
    for i in range(2):
        arr = np.random.default_rng(i).integers(0, 256, (40, 36, 3), dtype=np.uint8)
        p = tmp / f"img{i}.jpg"
        Image.fromarray(arr).save(p, quality=85)
        paths.append(p)
    return paths


def test_predict_runs_locally_without_a_server(images: list[Path]) -> None:
    t0 = time.monotonic()
    out = _mve("predict", *map(str, images), cwd=images[0].parent)
    took = time.monotonic() - t0
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{images[0]}: ")
    assert len(lines[0].split("%")) == 6  # top-5
    clf = mve.load("cifar10-classifier")
    top1 = clf.predict(images[0])[0]
    assert lines[0].split(": ", 1)[1].startswith(f"{top1.label} {100 * top1.probability:.1f}%")
    assert f"(model {clf.checkpoint_id})" in out.stderr
    print(f"local mve predict of 2 images: {took:.1f} s")  # the issue asks for < 10 s here


def test_predict_json_is_the_servers_schema(images: list[Path]) -> None:
    out = _mve("predict", str(images[1]), "--json", "--top-k", "3", "--tta", "none",
               cwd=images[0].parent)
    body = ClassifyResponse.model_validate(json.loads(out.stdout))
    assert len(body.predictions) == 1 and len(body.predictions[0].top_k) == 3
    clf = mve.load("cifar10-classifier", tta="none")
    assert body.predictions[0].label == clf.predict(images[1])[0].label


def test_predict_with_an_explicit_checkpoint_and_bad_arguments(images: list[Path]) -> None:
    cwd = images[0].parent
    vae = str(ROOT / "models" / "cifar10-vae")
    wrong = _mve("predict", str(images[0]), "--classifier", vae, cwd=cwd, check=False)
    assert wrong.returncode == 2 and "not a classifier" in wrong.stderr
    both = _mve("predict", str(images[0]), "--classifier", "default", "--url",
                "http://127.0.0.1:9", cwd=cwd, check=False)
    assert both.returncode == 2 and "pass one" in both.stderr
    missing = _mve("predict", str(cwd / "nope.jpg"), cwd=cwd, check=False)
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    assert "Traceback" not in missing.stderr + both.stderr + wrong.stderr
    remote = _mve("predict", str(images[0]), "--tta", "none", cwd=cwd, check=False,
                  env={"MVE_URL": "http://127.0.0.1:9"})
    assert remote.returncode == 2 and "--tta and --device apply to a local model" in remote.stderr


def test_generate_locally_leaves_the_checkpoint_as_it_was(images: list[Path],
                                                          tmp_path: Path) -> None:
    vae = shutil.copytree(ROOT / "models" / "cifar10-vae", tmp_path / "vae")
    before = tree_digests(vae)
    for mode, extra in (("sample", []), ("variations", ["--image", str(images[0])]),
                        ("interpolate", ["--image", str(images[0]), "--image",
                                         str(images[1])])):
        out = tmp_path / f"{mode}.png"
        _mve("generate", "--vae", str(vae), "--mode", mode, "--n", "4", "--seed", "0",
             "--out", str(out), *extra, cwd=tmp_path)
        with Image.open(out) as im:
            assert im.size == ((4 * 34 + 2, 34 + 2) if mode == "interpolate"
                               else (2 * 34 + 2, 2 * 34 + 2))
    assert tree_digests(vae) == before


def test_models_lists_shipped_models_and_presets(tmp_path: Path) -> None:
    text = _mve("models", cwd=tmp_path).stdout
    assert "cifar10-classifier" in text and "992,152 params" in text
    assert "cifar10-vae" in text and "2,136,734 params" in text
    assert "FID 88.1 (gmm prior, n=10,000)" in text
    assert "samples from its diffusion prior: prior/" in text
    assert "validation accuracy 91.4%" in text and "FID 88.1" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    data = json.loads(_mve("models", "--json", cwd=tmp_path).stdout)
    assert {m["name"] for m in data["shipped"]} == {"cifar10-classifier", "cifar10-vae"}
    assert data["presets"]["classifier"]["fast"]["default"] is True
    assert set(data["presets"]["classifier"]) == {"fast", "best", "seed", "baseline", "muon",
                                                  "teacher"}
    assert all(p["description"] for f in data["presets"].values() for p in f.values())
