"""The shipped models/cifar10-vae reproduces its recorded validation PSNR (slow)."""

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
