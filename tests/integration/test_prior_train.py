"""The latent diffusion prior on Ray Train (``cluster/prior_train.py``), on a real local Ray:
one worker reproduces the in-process run, two workers train a loadable prior, a rerun with the
same name resumes, and ``mve train prior`` without ``--local`` takes this path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from _archives import colour_archive  # tests/integration/_archives.py

from cluster.options import ClusterConfig
from cluster.prior_train import prior_run_name, run_prior_training
from mve.checkpoint import load_checkpoint, save_checkpoint
from mve.data import load_data
from mve.diffusion import sample_latents
from mve.models import build_model, make_config
from mve.prior_train import PriorTrainConfig, load_prior, train_prior

pytestmark = pytest.mark.ray

PREP = {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}
TINY = make_config("prior", {"dropout": 0.0}, preset="tiny")
VAL = 16


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny untrained VAE and 3 classes x 40 PNGs: latents to fit, quickly."""
    root = tmp_path_factory.mktemp("prior-ray")
    torch.manual_seed(0)
    cfg = make_config("vae", {}, preset="tiny")
    vae = save_checkpoint(root / "vae", build_model("vae", cfg), model_name="vae",
                          model_config=cfg, preprocessing=PREP)
    archive = colour_archive(root / "data", names=["a", "b", "c"], per_class=40,
                             colour=lambda k: 60 + 70 * k, image_name="{i:03d}.png")
    return vae, archive


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _cfg(epochs: int) -> PriorTrainConfig:
    return PriorTrainConfig(epochs=epochs, batch_size=16, warmup_steps=2)


def test_one_worker_reproduces_the_in_process_run(inputs, tmp_path, local_ray):
    vae, archive = inputs
    summary = run_prior_training(vae, archive, tmp_path / "ray", model_cfg=TINY, cfg=_cfg(2),
                                 cluster=ClusterConfig(storage=str(tmp_path / "s")),
                                 val_size=VAL, name="one")
    data = load_data(archive, val_size=VAL, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray worker (1 CPU): same kernels, same float sums
    try:
        train_prior(load_checkpoint(vae), data.train.images, data.val.images,
                    tmp_path / "local", model_config=TINY, cfg=_cfg(2))
    finally:
        torch.set_num_threads(threads)
    ray_ckpt, local = load_checkpoint(tmp_path / "ray"), load_checkpoint(tmp_path / "local")
    for key, want in local.model.state_dict().items():  # the EMA weights, bit for bit
        torch.testing.assert_close(ray_ckpt.model.state_dict()[key], want, rtol=0, atol=0)
    assert summary["metrics"]["epoch"] == 2
    assert summary["metrics"]["val_loss"] == pytest.approx(
        json.loads((tmp_path / "local" / "history.json").read_text())[-1]["val_loss"])
    assert ray_ckpt.meta["vae"] == local.meta["vae"]  # names its VAE by the weights' sha256


def test_two_workers_train_a_prior_of_that_vae(inputs, tmp_path, local_ray):
    vae, archive = inputs
    two = ClusterConfig(num_workers=2, storage=str(tmp_path / "s"))
    summary = run_prior_training(vae, archive, tmp_path / "out", model_cfg=TINY, cfg=_cfg(2),
                                 cluster=two, val_size=VAL, name="two")
    assert summary["metrics"]["epoch"] == 2 and summary["metrics"]["val_loss"] > 0
    prior = load_prior(tmp_path / "out", vae=load_checkpoint(vae))
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert prior.meta["train_config"]["batch_size"] == 16
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
    z = sample_latents(prior.model, 4, prior.model.latent_shape, steps=2, seed=0)
    assert z.shape == (4, 4, 8, 8) and torch.isfinite(z).all()
    assert sorted(p.name for p in (tmp_path / "s" / "two").glob("epoch_*")) == [
        "epoch_0001", "epoch_0002"]


def test_a_rerun_with_the_same_name_resumes(inputs, tmp_path, local_ray):
    vae, archive = inputs
    cluster = ClusterConfig(storage=str(tmp_path / "s"))
    run_prior_training(vae, archive, tmp_path / "a", model_cfg=TINY, cfg=_cfg(1),
                       cluster=cluster, val_size=VAL, name="resume-me")
    first = json.loads((tmp_path / "a" / "history.json").read_text())
    run_prior_training(vae, archive, tmp_path / "b", model_cfg=TINY, cfg=_cfg(2),
                       cluster=cluster, val_size=VAL, name="resume-me")
    history = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0] == first[0]  # epoch 1 was not run again


def test_run_names_are_deterministic(inputs):
    vae, archive = inputs
    a = prior_run_name(vae, archive, TINY, _cfg(2), ClusterConfig())
    assert a == prior_run_name(vae, archive, TINY, _cfg(2), ClusterConfig())
    assert a != prior_run_name(vae, archive, TINY, _cfg(3), ClusterConfig())
    assert a != prior_run_name(vae, archive, TINY, _cfg(2), ClusterConfig(num_workers=2))


def test_mve_train_prior_without_local_runs_on_ray_train(inputs, tmp_path):
    vae, archive = inputs
    cmd = [sys.executable, "-m", "mve_cli.main", "train", "prior", "--vae", str(vae), "--data",
           str(archive), "--val-size", str(VAL), "--epochs", "1", "--preset", "tiny", "--set",
           "batch_size=16", "--workers", "2", "--storage", str(tmp_path / "s"), "--out",
           str(tmp_path / "p")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "on Ray Train (1 epoch(s), 2 worker(s)" in proc.stdout
    assert load_checkpoint(tmp_path / "p").model_name == "prior"
    assert len(list((tmp_path / "s").glob("mve-prior-*/epoch_0001"))) == 1
