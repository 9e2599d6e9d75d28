"""Experiment tracking without Ray: mve's TensorBoard files read back with TensorBoard's own
event reader, MLflow through a real (SQLite) store, and runs that go on when neither works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _tensorboard import read_events, session_hparams  # tests/integration/_tensorboard.py
from test_train import SMALL, synthetic_bundle  # tests/unit/test_train.py

from mve.config import load_train_config
from mve.mlflow_runs import MlflowRun, flat_params
from mve.tracking import EpochTracker, tag_of
from mve.train import fit, tracker_for

REPO = Path(__file__).resolve().parents[2]


def sqlite_store(tmp_path: Path, experiment: str) -> str:
    """An MLflow SQLite store whose experiment keeps its artifacts under ``tmp_path`` (MLflow's
    default would be ./mlruns in the working directory)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment(experiment,
                                        artifact_location=(tmp_path / "artifacts").as_uri())
    return uri


def test_tags_group_train_and_val():
    assert tag_of("train_loss") == "train/loss"
    assert tag_of("val_elbo_bpd") == "val/elbo_bpd"
    assert tag_of("epoch") == "epoch" and tag_of("best_x") == "best_x"


def test_a_classifier_run_writes_scalars_per_epoch_and_its_hyperparameters(tmp_path):
    cfg = load_train_config("classifier", preset="baseline",
                            overrides=[*SMALL, "epochs=3", "optim.lr=0.05"])
    data = synthetic_bundle()
    track = tracker_for(cfg, data, logdir=tmp_path / "tb")
    result = fit(cfg, data, progress=False, track=track)
    ea = read_events(tmp_path / "tb")
    scalars = ea.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/images_per_s", "val/accuracy", "val/loss"):
        assert tag in scalars, tag
    acc = ea.Scalars("val/accuracy")
    assert [e.step for e in acc] == [1, 2, 3]
    assert [e.value for e in acc] == pytest.approx([h["val_accuracy"] for h in result.history])
    values, metrics = session_hparams(ea)
    assert values["optim.lr"] == pytest.approx(0.05) and values["epochs"] == 3
    assert {"val/accuracy", "val/loss"} <= set(metrics)
    assert "train/loss" not in metrics


def test_a_vae_run_draws_reconstructions_and_samples(tmp_path):
    cfg = load_train_config("vae", preset="tiny", overrides=[
        "model.input_size=16", "epochs=2", "batch_size=25", "eval_batch_size=50"])
    data = synthetic_bundle(n_train=100, n_val=50)
    track = tracker_for(cfg, data, logdir=tmp_path / "tb", hparams={"lr": 1e-3})
    track.image_every = 1
    fit(cfg, data, progress=False, track=track)
    ea = read_events(tmp_path / "tb")
    images = ea.Tags()["images"]
    assert "vae/reconstructions" in images and "vae/samples" in images
    assert [e.step for e in ea.Images("vae/samples")] == [1, 2]
    assert ea.Images("vae/reconstructions")[-1].height > 16  # a grid, not one image
    assert "val/elbo_bpd" in ea.Tags()["scalars"]


def test_mlflow_logs_params_metrics_and_artifacts_to_a_real_store(tmp_path):
    """MLflow's own client and a SQLite store (the server test is in tests/integration)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = sqlite_store(tmp_path, "mve-unit")
    cfg = load_train_config("classifier", preset="baseline",
                            overrides=[*SMALL, "epochs=2", "optim.lr=0.05"])
    run = MlflowRun.start(uri, run_name="unit", params=flat_params(cfg.to_dict()),
                          experiment="mve-unit")
    assert run.active
    data = synthetic_bundle()
    fit(cfg, data, progress=False, track=EpochTracker(logdir=None, mlflow=run))
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "REPORT.md").write_text("# report\n")
    run.log_artifacts(tmp_path / "art" / "REPORT.md")
    run.end()
    client = MlflowClient(uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["optim.lr"] == "0.05" and got.data.params["model.name"] == "classifier"
    history = client.get_metric_history(run.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2]
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["REPORT.md"]


def test_an_unreachable_mlflow_server_is_one_warning_and_the_run_goes_on(tmp_path, caplog):
    pytest.importorskip("mlflow")
    run = MlflowRun.start("http://127.0.0.1:9", run_name="x")  # port 9: nothing listens
    assert not run.active
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "does not answer" in warnings[0].getMessage()
    cfg = load_train_config("classifier", preset="baseline", overrides=[*SMALL, "epochs=1"])
    result = fit(cfg, synthetic_bundle(), progress=False,
                 track=EpochTracker(logdir=tmp_path / "tb", mlflow=run))
    assert result.history[-1]["epoch"] == 1
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("missing,expected", [
    ("mlflow", "the mlflow package is not installed"),
    ("torch.utils.tensorboard", "the tensorboard package is not installed"),
])
def test_a_missing_package_is_one_warning(tmp_path, missing, expected):
    """In a fresh interpreter where the package cannot be imported."""
    code = f"""
import logging, sys, json
sys.modules[{missing!r}] = None  # import fails as if it were not installed
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from mve.mlflow_runs import MlflowRun
from mve.tracking import TensorBoardLog
run = MlflowRun.start("http://127.0.0.1:9", run_name="x")
tb = TensorBoardLog({str(tmp_path / 'tb')!r})
tb.scalars({{"train_loss": 1.0}}, 1)
print(json.dumps([run.active, tb.writer is not None]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=True)
    assert proc.stderr.count(expected) == 1, proc.stderr
    active, writing = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not active
    assert writing == (missing == "mlflow")


def test_a_local_run_writes_event_files_and_publishes_its_checkpoint(tmp_path):
    """``mve train --local``'s path: events in OUT/tensorboard; with MLflow, the params, the
    checkpoint and REPORT.md as artifacts, and a registered model version."""
    pytest.importorskip("mlflow")
    from _archives import colour_archive  # tests/integration/_archives.py
    from mlflow.tracking import MlflowClient

    from mve.local_train import train_local
    from mve.tracking import TrackingOptions

    archive = colour_archive(tmp_path / "data", classes=3, per_class=30)
    cfg = load_train_config("classifier", preset="baseline", overrides=[
        "model.num_classes=3", "model.cnn_layers=3", "model.starting_channels=8",
        "model.final_channels=16", "model.fcn_layers=2", "data.val_size=30",
        "batch_size=20", "epochs=2", f"data.path={archive}"])
    uri = sqlite_store(tmp_path, "local")
    train_local(cfg, tmp_path / "out", device="cpu",
                tracking=TrackingOptions(mlflow=uri, experiment="local", register_as="local-m"))
    ea = read_events(tmp_path / "out" / "tensorboard")
    assert [e.step for e in ea.Scalars("val/accuracy")] == [1, 2]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("local").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "2"
    assert "REPORT.md" in {a.path for a in client.list_artifacts(run.info.run_id)}
    files = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert "checkpoint/mve.json" in files
    (version,) = client.search_model_versions("name='local-m'")
    assert version.run_id == run.info.run_id
