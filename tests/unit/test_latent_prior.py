"""The latent diffusion prior (issue 15): the flow-matching loss, the Heun sampler, training,
checkpoints that name their VAE, and sampling through the VAE."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from _archives import colour_archive  # tests/integration/_archives.py
from torch import nn

from mve.checkpoint import load_checkpoint, save_checkpoint
from mve.diffusion import flow_matching_loss, sample_latents, time_grid
from mve.models import build_model, list_models, make_config
from mve.models.latent_prior import LatentPrior, LatentPriorConfig
from mve.prior_train import PriorTrainConfig, load_prior, train_prior
from mve_cli.main import main

PREP = {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}
TINY = LatentPriorConfig(channels=16, blocks=1, groups=8, dropout=0.0)


class GaussianVelocity(nn.Module):
    """The exact flow-matching velocity of data ~ N(m, s^2) per element."""

    def __init__(self, m: float, s: float):
        super().__init__()
        self.m, self.s = m, s
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        t = t.view(-1, *([1] * (x.ndim - 1)))
        var = (1 - t) ** 2 * self.s ** 2 + t ** 2
        return -self.m + (t - (1 - t) * self.s ** 2) / var * (x - (1 - t) * self.m)


def test_the_loss_is_zero_for_the_true_velocity_and_the_target_norm_for_zero():
    x0 = torch.randn(8, 4, 8, 8)
    t, noise = torch.rand(8) * 0.9 + 0.05, torch.randn(8, 4, 8, 8)

    def oracle(xt, tt):  # v = e - x0 = (x_t - x0) / t for this very x0
        return (xt - x0) / tt.view(-1, 1, 1, 1)

    assert flow_matching_loss(oracle, x0, t=t, noise=noise).item() < 1e-8
    zero = flow_matching_loss(lambda xt, tt: torch.zeros_like(xt), x0, t=t, noise=noise)
    torch.testing.assert_close(zero, (noise - x0).pow(2).mean())


def test_heun_integration_of_the_exact_field_lands_on_the_data_distribution():
    model = GaussianVelocity(m=2.0, s=0.5)
    z = sample_latents(model, 4000, (4,), steps=8, seed=0)
    assert abs(z.mean().item() - 2.0) < 0.03 and abs(z.std().item() - 0.5) < 0.03
    hot = sample_latents(model, 4000, (4,), steps=8, seed=0, temperature=0.5)
    assert hot.std().item() < 0.8 * z.std().item()  # a lower temperature narrows the samples


def test_the_sampler_is_deterministic_for_a_seed_and_independent_of_the_batch_size():
    torch.manual_seed(0)
    model = LatentPrior(TINY)
    for p in model.out.parameters():  # the zero-initialised head would make every draw noise
        nn.init.normal_(p, std=0.1)
    a = sample_latents(model, 6, model.latent_shape, steps=3, seed=5)
    b = sample_latents(model, 6, model.latent_shape, steps=3, seed=5, batch_size=4)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, sample_latents(model, 6, model.latent_shape, steps=3, seed=6))
    grid = time_grid(4, shift=3.0)
    assert grid[0] == 1 and grid[-1] == 0 and (grid[:-1] > grid[1:]).all()
    assert grid[1] > 0.75  # shifted towards the noise end
    for bad in ({"steps": 0}, {"temperature": 0.0}):
        with pytest.raises(ValueError):
            sample_latents(model, 2, model.latent_shape, **{"steps": 2, **bad})


def test_a_tiny_prior_beats_a_single_gaussian_on_a_two_mode_latent():
    """Data: +P or -P (a fixed pattern) plus a little noise. A Gaussian fitted to it puts
    most of its mass between the modes; a trained prior puts its samples on them."""
    g = torch.Generator().manual_seed(0)
    pattern = torch.randn(4, 8, 8, generator=g)
    pattern /= pattern.norm() / 16  # ||P|| = 16: modes far apart against the noise
    signs = torch.randint(0, 2, (2048, 1, 1, 1), generator=g) * 2.0 - 1
    data = signs * pattern + 0.1 * torch.randn(2048, 4, 8, 8, generator=g)
    torch.manual_seed(0)  # the init too: the global RNG's state depends on the tests before
    model = LatentPrior(TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        x0 = data[torch.randint(0, len(data), (128,), generator=g)]
        loss = flow_matching_loss(model, x0, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    samples = sample_latents(model, 500, model.latent_shape, steps=10, seed=0)
    flat = data.flatten(1)
    mean, cov = flat.mean(0), torch.cov(flat.T) + 1e-4 * torch.eye(flat.shape[1])
    gauss = torch.distributions.MultivariateNormal(mean, cov).sample((500,))

    def off_mode(x):  # distance of each sample to the nearer mode, relative to ||P||
        p = pattern.flatten()
        return torch.minimum((x.flatten(1) - p).norm(dim=1),
                             (x.flatten(1) + p).norm(dim=1)).median() / p.norm()

    assert off_mode(samples) < 0.5 * off_mode(gauss), (off_mode(samples), off_mode(gauss))


def _tiny_vae(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = make_config("vae", {}, preset="tiny")
    save_checkpoint(path, build_model("vae", cfg), model_name="vae", model_config=cfg,
                    preprocessing=PREP)
    return path


def test_train_save_resume_and_sample_through_the_vae(tmp_path, caplog):
    vae_dir = _tiny_vae(tmp_path / "vae")
    vae = load_checkpoint(vae_dir)
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8)
    cfg = PriorTrainConfig(epochs=1, batch_size=32, warmup_steps=2)
    out = train_prior(vae, images, images[:32], tmp_path / "prior", model_config=TINY, cfg=cfg)
    meta = json.loads((out / "mve.json").read_text())
    assert meta["model_name"] == "prior" and meta["vae"]["latent_space_id"] == \
        vae.model.latent_space_id()
    assert json.loads((out / "history.json").read_text())[0]["val_loss"] > 0
    # resume: a second epoch continues the first (6 steps = 2 epochs of 96 x 2 flips / 32)
    cfg2 = PriorTrainConfig(epochs=2, batch_size=32, warmup_steps=2)
    train_prior(vae, images, images[:32], out, model_config=TINY, cfg=cfg2, resume=True)
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    prior = load_prior(out, vae=vae)
    assert isinstance(prior.model, LatentPrior) and prior.model.latent_std.min() > 0
    # beside the VAE, the prior becomes its default sampler
    shutil.copytree(out, vae_dir / "prior")
    loaded = load_checkpoint(vae_dir).model
    assert loaded.default_prior() == "diffusion"
    a = loaded.sample(3, seed=1, steps=2)
    assert a.shape == (3, 3, 32, 32)
    torch.testing.assert_close(a, loaded.sample(3, seed=1, steps=2))
    assert loaded.sample(3, seed=1, prior="standard").shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="steps"):
        loaded.sample(2, steps=0)
    png = tmp_path / "grid.png"
    assert main(["generate", "--vae", str(vae_dir), "--mode", "sample", "--n", "4", "--steps",
                 "2", "--seed", "0", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["generate", "--vae", str(_tiny_vae(tmp_path / "bare")), "--prior", "diffusion",
                 "--out", str(tmp_path / "no.png")]) == 2  # a VAE without a prior: a clear error
    # a prior of another VAE is refused by name, and left out with a warning when found beside
    other = load_checkpoint(_tiny_vae(tmp_path / "other", seed=1))
    with pytest.raises(ValueError, match="latent space"):
        load_prior(out, vae=other)
    shutil.copytree(out, other.path / "prior")
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(other.path).model.default_prior() == "standard"
    assert "another VAE" in caplog.text


def test_the_prior_is_a_registry_family_that_image_trainers_do_not_offer():
    assert "prior" in list_models(latent=True) and "prior" not in list_models()
    assert make_config("prior", {}, preset="tiny").channels == 16
    with pytest.raises(ValueError):
        LatentPriorConfig(channels=20, groups=8)


def test_mve_train_prior_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MVE_CACHE_DIR", str(tmp_path / "cache"))
    archive = colour_archive(tmp_path / "data", names=["a", "b"], per_class=20,
                             colour=lambda k: 70 + 90 * k, image_name="{i:03d}.png")
    vae_dir = _tiny_vae(tmp_path / "vae")
    rc = main(["train", "prior", "--local", "--vae", str(vae_dir), "--data", str(archive),
               "--val-size", "8", "--epochs", "1", "--preset", "tiny", "--set", "batch_size=16",
               "--set", "model.dropout=0.2", "--out", str(tmp_path / "p"), "--device", "cpu"])
    assert rc == 0
    meta = json.loads((tmp_path / "p" / "mve.json").read_text())
    assert meta["model_config"]["dropout"] == 0.2 and meta["train_config"]["batch_size"] == 16
    assert main(["train", "prior", "--local", "--vae", str(vae_dir), "--data", str(archive),
                 "--set", "lr=-1", "--out", str(tmp_path / "q")]) == 2
    assert not (tmp_path / "q").exists()
