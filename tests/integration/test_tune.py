"""Ray Tune searches on a real local Ray instance: ASHA + Optuna, outputs, resume, VAE, Train runs.

    .venv/bin/python -m pytest tests/integration/test_tune.py
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cluster.search import flatten
from cluster.tune import main, max_concurrent_trials
from mve.checkpoint import load_checkpoint
from mve.config import load_train_config

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
MAX_EPOCHS = 4

TINY_CLASSIFIER = """\
optim.lr: {loguniform: [1.0e-3, 3.0e-2]}
model.starting_channels: {qrandint: [8, 16, 4]}
batch_size: {choice: [16, 32]}
fixed:
  model.num_classes: 4
  model.cnn_layers: 3
  model.final_channels: 32
  model.fcn_layers: 2
  optim.name: adam
  optim.schedule: constant
"""

TINY_VAE = """\
optim.lr: {loguniform: [5.0e-4, 5.0e-3]}
batch_size: {choice: [16, 32]}
fixed:
  model.base_channels: 16
  model.groups: 8
  model.latent_channels: 4
  model.attention: false
"""


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """4 classes x 60 noisy PNGs (32x32) whose mean colour tells the class: learnable, but
    not so easily that every config reaches the same accuracy after one epoch."""
    root = tmp_path_factory.mktemp("tune-data")
    rng = np.random.default_rng(0)
    colours = rng.integers(90, 166, size=(4, 3))
    out = root / "colours.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        for k in range(4):
            d = root / "train" / f"class{k}"
            d.mkdir(parents=True)
            for i in range(60):
                px = np.clip(rng.normal(colours[k], 110, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{i:03d}.png")
        tar.add(root / "train", arcname="train")
    return out


@pytest.fixture(scope="module")
def spaces(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spaces")
    (root / "classifier.yaml").write_text(TINY_CLASSIFIER)
    (root / "vae.yaml").write_text(TINY_VAE)
    return {"classifier": root / "classifier.yaml", "vae": root / "vae.yaml"}


@pytest.fixture(scope="module")
def local_ray():
    """One embedded 2-CPU Ray instance for the in-process searches of this module."""
    import ray

    from cluster.common import init_ray

    assert init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


def _args(model: str, archive: Path, space: Path, root: Path, *extra: str) -> list[str]:
    return [model, "--data", str(archive), "--space", str(space), "--val-size", "80",
            "--storage", str(root / "storage"), "--out", str(root / "out"), "-v", "0", *extra]


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and \
        path.stat().st_size > 2000


def test_asha_optuna_search_exports_a_servable_best_checkpoint(archive, spaces, tmp_path,
                                                               local_ray, capsys):
    # One trial at a time makes ASHA's decisions deterministic: the configs come from a seeded
    # sampler and every rung compares against the same earlier trials.
    args = _args("classifier", archive, spaces["classifier"], tmp_path, "--samples", "6",
                 "--max-epochs", str(MAX_EPOCHS), "--grace-period", "1",
                 "--reduction-factor", "2", "--seed", "0", "--max-concurrent", "1")
    assert main(args) == 0
    out = tmp_path / "out"
    rows = _rows(out)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"TERMINATED"}
    stopped = [r for r in rows if r["early_stopped"] == "True"]
    assert stopped, "ASHA stopped no trial early"
    for r in rows:  # stopped trials end on a rung (1 or 2); the others run the full budget
        assert int(r["epochs"]) in ((1, 2) if r in stopped else (MAX_EPOCHS,))
        assert {"param:optim.lr", "param:model.starting_channels", "param:batch_size"} <= set(r)
        assert r["node_id"] == local_ray.get_runtime_context().get_node_id()
        assert r["node_ip"]

    # The best row is first, and the exported checkpoint is that trial's best epoch.
    best_value = max(float(r["best_val_accuracy"]) for r in rows)
    assert float(rows[0]["best_val_accuracy"]) == best_value
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "val_accuracy" and summary["mode"] == "max"
    assert summary["best_trial_id"] == rows[0]["trial_id"]
    assert summary["stopped_early"] == len(stopped) and summary["trials"] == 6
    ckpt = load_checkpoint(out / "best")
    assert ckpt.model_name == "classifier"
    assert ckpt.meta["metrics"]["val_accuracy"] == pytest.approx(best_value, rel=1e-6)
    assert summary["best_checkpoint_value"] == pytest.approx(best_value, rel=1e-6)
    assert not (out / "best" / "training_state.safetensors").exists()  # servable only
    assert (out / "best" / "REPORT.md").is_file()

    # best.yaml is a config `mve train --config` accepts, holding the best params.
    cfg = load_train_config("classifier", files=[out / "best.yaml"])
    assert cfg.to_dict() == yaml.safe_load((out / "best.yaml").read_text())
    flat = flatten(cfg.to_dict())
    for key, value in summary["best_params"].items():
        assert flat[key] == pytest.approx(value)
    assert cfg.epochs == MAX_EPOCHS and cfg.model_config.num_classes == 4

    md = (out / "results.md").read_text()
    assert all(r["trial_id"] in md for r in rows) and "| optim.lr |" in md
    assert _is_png(out / "trial_curves.png") and _is_png(out / "param_importance.png")

    # `mve evaluate DIR/best` loads it and reproduces the validation accuracy.
    from mve_cli.main import main as mve_main

    capsys.readouterr()
    assert mve_main(["evaluate", str(out / "best"), "--json", "--out", str(out / "eval")]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["accuracy"] == pytest.approx(best_value, abs=1e-6)

    # The same command again restores the finished experiment and reruns nothing.
    before = {p: p.read_text() for p in (tmp_path / "storage").glob("*/trial_*/result.json")}
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "resuming the search: experiment tune-classifier" in err
    assert "(6 of 6 trials done" in err
    assert _rows(out) == rows
    assert {p: p.read_text() for p in before} == before
    assert json.loads((out / "summary.json").read_text())["resumed"] is True
    # A different search under the same name is refused, before any trial runs.
    assert main([*args, "--samples", "7"]) == 2
    assert "different search" in capsys.readouterr().err


def test_concurrency_follows_the_cluster_resources(local_ray):
    resources = local_ray.cluster_resources()
    assert resources["CPU"] == 2
    assert max_concurrent_trials(resources, workers=1, cpus=1, gpus=0) == 2
    assert max_concurrent_trials(resources, workers=1, cpus=0.5, gpus=0) == 4
    assert max_concurrent_trials(resources, workers=2, cpus=1, gpus=0) == 1
    assert max_concurrent_trials(resources, workers=1, cpus=4, gpus=0) == 1  # at least one
    assert max_concurrent_trials({"CPU": 16, "GPU": 2}, workers=1, cpus=1, gpus=0.5) == 4
    assert max_concurrent_trials({"CPU": 16, "GPU": 4}, workers=2, cpus=1, gpus=1) == 2


def test_vae_search_minimises_the_validation_elbo(archive, spaces, tmp_path, local_ray):
    # The base config lies inside the space here (the VAE recipe's lr, and batch 16 from the
    # file), so the first trial evaluates exactly it: a search starts from its recipe.
    base = tmp_path / "base.yaml"
    base.write_text("batch_size: 16\n")
    args = _args("vae", archive, spaces["vae"], tmp_path, "--samples", "2", "--max-epochs", "1",
                 "--config", str(base))
    assert main(args) == 0
    out = tmp_path / "out"
    recipe_lr = load_train_config("vae").optim.lr
    tried = [(int(r["param:batch_size"]), float(r["param:optim.lr"])) for r in _rows(out)]
    assert (16, recipe_lr) in tried, tried  # a drawn lr is never exactly the recipe's
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["metric"], summary["mode"]) == ("val_elbo_bpd", "min")
    rows = _rows(out)
    values = [float(r["best_val_elbo_bpd"]) for r in rows]
    assert len(rows) == 2 and values == sorted(values)  # best (lowest) first
    assert summary["best_value"] == pytest.approx(min(values), rel=1e-6)
    ckpt = load_checkpoint(out / "best")
    assert ckpt.model_name == "vae"
    assert ckpt.meta["metrics"]["val_elbo_bpd"] == pytest.approx(min(values), rel=1e-6)
    assert _is_png(out / "param_importance.png")  # "not enough trials" with 2 trials


# -- resume after a hard kill: tests/reliability/test_tune_faults.py (make test-reliability) --


# -- validation before Ray ----------------------------------------------------------------

_CHECK_SCRIPT = """
import json, sys
from cluster.tune import main
codes = [main(argv) for argv in json.loads(sys.argv[1])]
import ray
print("RESULT", json.dumps({"codes": codes, "ray_started": ray.is_initialized()}))
"""


def test_bad_spaces_and_options_fail_before_ray_starts(archive, tmp_path):
    bad = {
        "unknown.yaml": "optim.lrr: {loguniform: [1.0e-4, 1.0e-2]}\n",
        "dist.yaml": "optim.lr: {grid_search: [0.1, 0.01]}\n",
        "bounds.yaml": "model.cnn_layers: {randint: [4, 12]}\n",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    good = tmp_path / "good.yaml"
    good.write_text(TINY_CLASSIFIER)
    runs = [_args("classifier", archive, tmp_path / name, tmp_path) for name in bad]
    runs.append(_args("classifier", archive, good, tmp_path, "--grace-period", "5",
                      "--max-epochs", "2"))
    runs.append(_args("classifier", tmp_path / "missing.tar.gz", good, tmp_path))
    proc = subprocess.run([sys.executable, "-c", _CHECK_SCRIPT, json.dumps(runs)], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result == {"codes": [2] * len(runs), "ray_started": False}
    err = proc.stderr
    assert "'optim.lrr' is not a TrainConfig key (did you mean optim.lr" in err
    assert "model.starting_channels" in err  # the valid keys are listed
    assert "'grid_search' is not supported" in err
    assert "randint[4, 12] can sample 11" in err
    assert "--grace-period must be in [1, --max-epochs=2]" in err
    assert "missing.tar.gz" in err and "does not exist" in err
    assert not (tmp_path / "storage").exists() and not (tmp_path / "out").exists()


# -- data-parallel trials -----------------------------------------------------------------

def test_train_run_trials_report_through_ray_train(archive, spaces, tmp_path, local_ray):
    """--workers-per-trial 2: each trial is a Train V2 run; the best checkpoint comes from the
    reported checkpoint_path, and stopped trials give their CPUs back."""
    args = _args("classifier", archive, spaces["classifier"], tmp_path, "--samples", "2",
                 "--max-epochs", "2", "--workers-per-trial", "2", "--cpus-per-trial", "1")
    assert main(args) == 0
    out = tmp_path / "out"
    rows = _rows(out)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers_per_trial"] == 2
    ckpt = load_checkpoint(out / "best")
    assert ckpt.meta["metrics"]["val_accuracy"] == pytest.approx(
        float(rows[0]["best_val_accuracy"]), rel=1e-6)
    runs = sorted((tmp_path / "storage" / "tune-classifier").glob("train-trial_id=*"))
    assert {p.name.split("=", 1)[1] for p in runs} == {r["trial_id"] for r in rows}
    deadline = time.monotonic() + 30  # every worker group's CPUs are free again
    while local_ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert local_ray.available_resources().get("CPU", 0) == 2
