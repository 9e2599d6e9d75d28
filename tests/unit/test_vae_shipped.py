"""The shipped models/cifar10-vae: its recorded validation PSNR (slow) and its diffusion prior."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mve.checkpoint import load_checkpoint
from mve.data import TensorLoader, load_data
from mve.pretrained import repo_root
from mve.train import evaluate

ARCHIVE = Path(os.environ.get("MVE_TEST_ARCHIVE",
                              repo_root().parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"))
SHIPPED = repo_root() / "models" / "cifar10-vae"


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "mve.json").is_file(), reason=f"{SHIPPED} is not shipped yet")
@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"CIFAR-10 archive {ARCHIVE} is absent")
def test_shipped_vae_reproduces_its_recorded_psnr():
    ckpt = load_checkpoint(SHIPPED)
    recorded = ckpt.metrics.get("val_psnr")
    assert recorded is not None, "the shipped VAE records no val_psnr"
    assert recorded >= 27.0  # the requirement, with a latent of at most 8x8x4
    assert ckpt.model.config.latent_dim <= 256
    assert (SHIPPED / "model.safetensors").stat().st_size <= 10_000_000
    prov = ckpt.meta.get("provenance") or {}
    data = load_data(ARCHIVE, val_size=int(prov.get("val_size", 5000)),
                     seed=int(prov.get("split_seed", 0)))
    prep = ckpt.preprocessing
    loader = TensorLoader(data.val, batch_size=500, mean=prep["mean"], std=prep["std"])
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    m = evaluate(ckpt.model, loader, task="generation", device=torch.device("cpu"))
    assert m["num_samples"] == len(data.val)
    assert abs(m["psnr"] - recorded) <= 0.3, (m["psnr"], recorded)


@pytest.mark.skipif(not (SHIPPED / "prior" / "mve.json").is_file(),
                    reason=f"{SHIPPED}/prior is not shipped yet")
def test_shipped_vae_samples_from_its_shipped_diffusion_prior():
    """The shipped prior fits the shipped VAE's encoder (else it would be left out with a
    warning), and the VAE's samplers use it unless asked for the mixture."""
    ckpt = load_checkpoint(SHIPPED)
    vae = ckpt.model
    assert vae.diffusion_prior is not None and vae.default_prior() == "diffusion"
    draws = vae.sample(4, seed=0, steps=4)
    assert torch.equal(draws, vae.sample(4, seed=0, steps=4, prior="diffusion"))
    assert not torch.equal(draws, vae.sample(4, seed=0, prior="gmm"))
    assert draws.shape == (4, 3, 32, 32) and torch.isfinite(draws).all()
    prior = load_checkpoint(SHIPPED / "prior")
    assert prior.meta["vae"]["weights_sha256"] == ckpt.meta["files"]["model.safetensors"]["sha256"]
