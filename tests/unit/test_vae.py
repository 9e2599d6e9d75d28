"""Unit tests for mve.models.vae (small configs, CPU only)."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch

from mve.models.vae import (
    PRESETS,
    VAE,
    VAEConfig,
    VAEOutput,
    discretized_gaussian_log_likelihood,
    kl_standard_normal,
    to_pixels,
)

GRID = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0  # the 8-bit grid in model space


def tiny(**kw) -> VAEConfig:
    base = {**PRESETS["tiny"], "input_size": 16, "downsample_factor": 4}
    return VAEConfig(**{**base, **kw})


def log_lik(x, mean: float | torch.Tensor, scale: float) -> torch.Tensor:
    log_scale = torch.tensor(math.log(scale))
    return discretized_gaussian_log_likelihood(x, torch.as_tensor(mean), log_scale)


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 127.5 - 1.0


@pytest.fixture
def model() -> VAE:
    """Tiny model with a full-scale decoder output layer, so outputs differ visibly."""
    torch.manual_seed(0)
    m = VAE(tiny(attention=True))
    m.decoder.conv_out.reset_parameters()
    return m.eval()


# ----------------------------------------------------------------------------- config


def test_default_config_and_presets():
    cfg = VAEConfig()
    assert cfg.latent_shape == (8, 8, 8)
    assert cfg.channels == (32, 64, 128)
    assert VAEConfig(**PRESETS["default"]) == cfg
    for name, kw in PRESETS.items():
        assert VAEConfig(**kw).latent_shape[0] >= 1, name
    n = sum(p.numel() for p in VAE(cfg).parameters())
    assert 1_000_000 <= n <= 4_000_000


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"downsample_factor": 3}, "power of two"),
        ({"downsample_factor": 0}, "positive int"),
        ({"input_size": 30}, "not divisible"),
        ({"downsample_factor": 8, "input_size": 4}, "not divisible"),
        ({"channel_mult": (1, 2)}, "entries"),
        ({"channel_mult": [1, 0, 2]}, "positive ints"),
        ({"channel_mult": "124"}, "sequence"),
        ({"base_channels": 24, "groups": 16}, "groups=16 must divide"),
        ({"likelihood": "bce"}, "likelihood"),
        ({"beta": -1.0}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"dropout": 1.0}, "dropout"),
        ({"latent_channels": 0}, "latent_channels"),
        ({"num_res_blocks": 1.5}, "num_res_blocks"),
        ({"in_channels": True}, "in_channels"),
        ({"attention": "yes"}, "attention"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig(**kw)


@pytest.mark.parametrize("f", [1, 2, 4, 8])
@pytest.mark.parametrize("latent_channels", [2, 6])
def test_latent_shape_matches_model(f, latent_channels):
    cfg = tiny(downsample_factor=f, latent_channels=latent_channels)
    s = 16 // f
    assert cfg.latent_shape == (latent_channels, s, s)
    assert len(cfg.channels) == int(math.log2(f)) + 1
    m = VAE(cfg)
    x = images(2)
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (2, *cfg.latent_shape)
    assert m.decode(mu).shape == x.shape


def test_channel_mult_list_becomes_tuple_and_replace_works():
    cfg = VAEConfig(channel_mult=[1, 2, 2])
    assert cfg.channel_mult == (1, 2, 2) and isinstance(cfg.channel_mult, tuple)
    hash(cfg)  # frozen + tuple -> hashable
    assert cfg.channels == (32, 64, 64)
    deeper = dataclasses.replace(VAEConfig(), downsample_factor=8)  # None mult follows the factor
    assert deeper.channels == (32, 64, 128, 128) and deeper.latent_shape == (8, 4, 4)


# ----------------------------------------------------------------------------- model


def test_forward_shapes_train_and_eval(caplog):
    with caplog.at_level(logging.DEBUG, logger="mve.models.vae"):
        m = VAE(tiny())
    assert any("VAE plan" in r.getMessage() for r in caplog.records)
    x = images(3)
    out = m.train()(x)
    assert isinstance(out, VAEOutput)
    assert out.recon.shape == x.shape and out.mu.shape == (3, 4, 4, 4)
    assert not torch.equal(out.z, out.mu)  # sampled in training mode
    out = m.eval()(x)
    assert torch.equal(out.z, out.mu)
    torch.testing.assert_close(m.reconstruct(x), out.recon)
    assert out.recon.abs().max() < 0.2  # conv_out is initialised near zero
    with pytest.raises(ValueError, match="expected images"):
        m.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="expected images"):
        m.encode(torch.zeros(1, 3, 18, 18))


def test_default_model_shapes_at_32():
    m = VAE(VAEConfig()).eval()
    x = images(2, size=32)
    out = m(x)
    assert out.mu.shape == (2, 8, 8, 8) and out.recon.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("likelihood", ["discretized_gaussian", "mse"])
def test_gradients_reach_every_parameter(likelihood):
    torch.manual_seed(0)
    m = VAE(tiny(attention=True, likelihood=likelihood, dropout=0.1)).train()
    m.loss(images(4))["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_loss_terms(model):
    x = images(4)
    model.train()
    out = model(x)
    terms = model.loss(x, out)
    assert set(terms) == {"loss", "recon_nll", "kl", "elbo_bpd", "mse", "kl_weight"}
    assert terms.pop("kl_weight") == 1.0
    assert all(torch.isfinite(v) and v.ndim == 0 for v in terms.values())
    assert terms["kl"] >= 0
    torch.testing.assert_close(terms["kl"],
                               kl_standard_normal(out.mu, out.logvar).flatten(1).sum(1).mean())
    dims = x[0].numel()
    torch.testing.assert_close(terms["loss"], terms["recon_nll"] + terms["kl"])
    torch.testing.assert_close(terms["elbo_bpd"], terms["loss"].detach() / (dims * math.log(2)))
    ref_mse = (((out.recon.clamp(-1, 1) + 1) / 2 - (x + 1) / 2) ** 2).mean()
    torch.testing.assert_close(terms["mse"], ref_mse)


def test_mse_likelihood_and_beta(model):
    x = images(4)
    cfg = dataclasses.replace(model.config, likelihood="mse", beta=0.5)
    m = VAE(cfg)
    m.load_state_dict(model.state_dict())
    m.eval()
    out = m(x)
    terms = m.loss(x, out)
    sse = ((x - out.recon) ** 2).flatten(1).sum(1).mean()
    kl = kl_standard_normal(out.mu, out.logvar).flatten(1).sum(1).mean()
    torch.testing.assert_close(terms["recon_nll"], sse / (2 * 0.1**2))
    torch.testing.assert_close(terms["loss"], sse / (2 * 0.1**2) + 0.5 * kl)
    # bits/dim stay the discretised-Gaussian beta=1 bound, identical to the other likelihood's
    torch.testing.assert_close(terms["elbo_bpd"], model.loss(x, out)["elbo_bpd"])


# ----------------------------------------------------------------------------- likelihood / KL


def test_kl_helper():
    z = torch.zeros(2, 4, 3, 3)
    assert torch.equal(kl_standard_normal(z, z), torch.zeros(2, 4, 3, 3))
    mu, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    )
    kl = kl_standard_normal(mu, logvar)  # per latent element
    torch.testing.assert_close(kl, ref)
    per_image = kl.flatten(1).sum(1)
    torch.testing.assert_close(per_image, ref.flatten(1).sum(1))
    assert (per_image > 0).all() and (kl >= 0).all()


@pytest.mark.parametrize(
    "mean, scale", [(0.0, 0.1), (0.37, 1e-3), (-0.9, 7.0), (2.5, 0.3), (-1.0, 0.02)]
)
def test_discretized_gaussian_mass_sums_to_one(mean, scale):
    lp = log_lik(GRID, mean, scale)
    assert torch.isfinite(lp).all() and (lp <= 1e-6).all()
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)


def test_discretized_gaussian_matches_reference_including_tails():
    mean, scale = 0.1, 0.05
    lp = log_lik(GRID, mean, scale)

    def phi(z: float) -> float:  # P(Z <= z), accurate in the lower tail
        return 0.5 * math.erfc(-z / math.sqrt(2))

    for i in [0, 3, 60, 100, 140, 150, 200, 255]:
        v = GRID[i].item()
        hi, lo = (v - mean + 1 / 255) / scale, (v - mean - 1 / 255) / scale
        if i == 0:
            p = phi(hi)
        elif i == 255:
            p = phi(-lo)
        elif v > mean:
            p = phi(-lo) - phi(-hi)
        else:
            p = phi(hi) - phi(lo)
        assert lp[i].item() == pytest.approx(math.log(p), rel=1e-4, abs=1e-4), i


def test_discretized_gaussian_bits_per_dim_bounds():
    # a sharp decoder centred on the right bin costs ~0 nats
    lp = log_lik(GRID, GRID, math.exp(-7.0))
    assert (-lp).max() < 1e-3
    # uniform 8-bit data: cross-entropy >= 8 bits (Gibbs); a wide Gaussian is close to it
    bits = -log_lik(GRID, 0.0, 0.6).mean() / math.log(2)
    assert 8.0 <= bits < 8.3
    # far-tail data stay finite with finite gradients
    mean = torch.tensor([-1.0, 1.0, 0.0, 0.0], requires_grad=True)
    log_scale = torch.tensor(-7.0, requires_grad=True)
    lp = discretized_gaussian_log_likelihood(torch.tensor([1.0, -1.0, 0.8, 0.0]), mean, log_scale)
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(mean.grad).all()
    assert torch.isfinite(log_scale.grad)


def test_to_pixels_roundtrip_and_clamp():
    px = torch.arange(256)
    assert torch.equal(to_pixels(px.float() / 127.5 - 1.0), px.to(torch.uint8))
    out = to_pixels(torch.tensor([-3.0, 3.0]))
    assert out.dtype == torch.uint8 and out.tolist() == [0, 255]


# ----------------------------------------------------------------------------- generation


def test_sample(model):
    model.train()
    a = model.sample(3, seed=1)
    assert a.shape == (3, 3, 16, 16)
    assert model.training  # mode restored
    torch.testing.assert_close(model.sample(3, seed=1), a, rtol=0, atol=0)
    assert not torch.allclose(model.sample(3, seed=2), a)
    zeros = torch.zeros(2, *model.config.latent_shape)
    torch.testing.assert_close(model.sample(2, temperature=0.0, seed=5), model.eval().decode(zeros))
    with pytest.raises(ValueError):
        model.sample(0)


def test_variations(model):
    img = images(1)[0]
    v = model.variations(img, 4, temperature=0.0)
    assert v.shape == (4, 3, 16, 16)
    rec = model.reconstruct(img[None])
    for i in range(4):
        torch.testing.assert_close(v[i : i + 1], rec, rtol=1e-4, atol=1e-5)
    w = model.variations(img[None], 4, temperature=1.0, seed=3)
    assert not torch.allclose(w[0], w[1])
    torch.testing.assert_close(model.variations(img, 4, seed=3), w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one image"):
        model.variations(images(2), 2)


@pytest.mark.parametrize("method", ["lerp", "slerp"])
def test_interpolate_endpoints(model, method):
    a, b = images(2, seed=7)
    path = model.interpolate(a, b, 5, method=method)
    assert path.shape == (5, 3, 16, 16)
    torch.testing.assert_close(path[:1], model.reconstruct(a[None]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(path[-1:], model.reconstruct(b[None]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(path[2], path[0])


def test_interpolate_lerp_vs_slerp(model):
    a, b = images(2, seed=7)
    mid_lerp = model.interpolate(a, b, 3, method="lerp")[1]
    mu_a, mu_b = model.encode(a[None])[0], model.encode(b[None])[0]
    mid = model.decode((mu_a + mu_b) / 2)
    torch.testing.assert_close(mid_lerp[None], mid, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(model.interpolate(a, b, 3, method="slerp")[1], mid_lerp)
    with pytest.raises(ValueError):
        model.interpolate(a, b, 3, method="cubic")
    with pytest.raises(ValueError):
        model.interpolate(a, b, 1)


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("likelihood", ["discretized_gaussian", "mse"])
def test_few_steps_reduce_loss(likelihood):
    torch.manual_seed(0)
    m = VAE(tiny(likelihood=likelihood)).train()
    x = images(8, seed=1)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    first = None
    for _ in range(25):
        terms = m.loss(x)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        first = terms if first is None else first
    m.eval()
    with torch.no_grad():
        last = m.loss(x)
    assert last["loss"] < 0.8 * first["loss"]
    assert last["elbo_bpd"] < first["elbo_bpd"]
