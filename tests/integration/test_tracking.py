"""Experiment tracking on a real Ray and a real MLflow tracking server.

The test starts ``mlflow server`` (SQLite backend, a local artifact store served by the
server) on a free loopback port, runs a 2-trial search and a Ray Train run against it, and
reads everything back: through MLflow's client (runs, params, metric histories, artifacts,
the model registry) and through TensorBoard's own event reader.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from _archives import TINY_SPACE, colour_archive  # tests/integration/_archives.py
from _tensorboard import read_events, session_hparams  # tests/integration/_tensorboard.py

from serve_app.testing import free_port

pytestmark = pytest.mark.ray

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on loopback; stopped (its whole process group) afterwards."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start:\n"
                                   + (root / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from cluster.common import init_ray

    assert init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return colour_archive(tmp_path_factory.mktemp("data"), classes=3, per_class=40)


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


def test_a_search_is_a_parent_run_with_one_child_per_trial(mlflow_server, local_ray, archive,
                                                           tmp_path):
    from mlflow.tracking import MlflowClient

    from cluster.tune import main

    space = tmp_path / "space.yaml"
    space.write_text(TINY_SPACE)
    storage = tmp_path / "storage"
    assert main(["classifier", "--data", str(archive), "--space", str(space), "--val-size", "30",
                 "--samples", "2", "--max-epochs", "2", "--max-concurrent", "2",
                 "--storage", str(storage), "--out", str(tmp_path / "out"), "-v", "0",
                 "--mlflow", mlflow_server, "--mlflow-experiment", "search-test",
                 "--register-model", "mve-search-best"]) == 0
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert len(rows) == 2

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("search-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mve.run") == "search"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {c.data.tags["mve.trial_id"] for c in children} == set(rows)
    for child in children:
        row = rows[child.data.tags["mve.trial_id"]]
        assert child.info.status == "FINISHED"
        # the resolved config, with the trial's sampled lr
        assert float(child.data.params["optim.lr"]) == pytest.approx(
            float(row["param:optim.lr"]))
        assert child.data.params["model.name"] == "classifier"
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == list(range(1, int(row["epochs"]) + 1))
        assert history[-1].value == pytest.approx(float(row["final_val_accuracy"]), abs=1e-6)
        assert "checkpoint/mve.json" in _artifacts(client, child.info.run_id, "checkpoint")

    assert parent.info.status == "FINISHED"
    assert parent.data.params["samples"] == "2"
    top = _artifacts(client, parent.info.run_id)
    assert {"results.md", "results.csv", "summary.json", "best.yaml", "REPORT.md",
            "checkpoint"} <= top
    versions = client.search_model_versions("name='mve-search-best'")
    assert [v.run_id for v in versions] == [parent.info.run_id]

    # TensorBoard on the storage root: one run per trial, with its sampled hyperparameters
    trial_dirs = sorted((storage / "tune-classifier").glob("trial_*"))
    assert {d.name for d in trial_dirs} == {f"trial_{t}" for t in rows}
    for d in trial_dirs:
        ea = read_events(d)
        row = rows[d.name.removeprefix("trial_")]
        assert session_hparams(ea)[0]["optim.lr"] == pytest.approx(float(row["param:optim.lr"]))
        assert len(ea.Scalars("val/accuracy")) == int(row["epochs"])
        # Ray's own TensorBoard logger (tags ray/tune/...) is off: one set of files per trial
        assert not [t for t in ea.Tags()["scalars"] if t.startswith("ray/")]


def test_a_ray_train_run_is_an_mlflow_run_with_its_checkpoint(mlflow_server, local_ray, archive,
                                                              tmp_path):
    from mlflow.tracking import MlflowClient

    from cluster.train import ClusterConfig, run_training
    from mve.config import load_train_config
    from mve.tracking import TrackingOptions

    cfg = load_train_config("classifier", preset="baseline", overrides=[
        "model.num_classes=3", "model.cnn_layers=3", "model.starting_channels=8",
        "model.final_channels=16", "model.fcn_layers=2", "data.val_size=30",
        "batch_size=20", "epochs=2"])
    storage = tmp_path / "storage"
    tracking = TrackingOptions(mlflow=mlflow_server, experiment="train-test",
                               register_as="mve-train-test")
    summary = run_training(cfg, ClusterConfig(storage=str(storage)), str(archive),
                           out=tmp_path / "out", name="tracked", tracking=tracking)

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("train-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["epochs"] == "2" and run.data.params["batch_size"] == "20"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2]
    assert history[-1].value == pytest.approx(summary["metrics"]["val_accuracy"], abs=1e-6)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_lr")] == [1, 2]
    assert "REPORT.md" in _artifacts(client, run.info.run_id)
    files = _artifacts(client, run.info.run_id, "checkpoint")
    assert {"checkpoint/mve.json", "checkpoint/REPORT.md"} <= files
    assert any(f.endswith(".safetensors") for f in files)
    (version,) = client.search_model_versions("name='mve-train-test'")
    assert version.run_id == run.info.run_id

    ea = read_events(storage / "tracked" / "tensorboard")
    assert [e.step for e in ea.Scalars("val/accuracy")] == [1, 2]
    assert session_hparams(ea)[0]["optim.lr"] == pytest.approx(cfg.optim.lr)
