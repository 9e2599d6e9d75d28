"""The VAE as a generator: objective levers, the GMM latent prior, generate/evaluate/report CLIs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _archives import colour_archive  # tests/integration/_archives.py
from PIL import Image

from mve.checkpoint import load_checkpoint, save_checkpoint
from mve.config import ConfigError, load_train_config
from mve.models import build_model, make_config
from mve.models.vae import PRESETS, VAE, VAEConfig
from mve.perceptual import perceptual_network
from mve.prior import GaussianMixture, fit_gmm, fit_latent_prior
from mve_cli.main import main
from serve_app.testing import make_classifier, make_vae

PREP = {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}


def tiny(**kw) -> VAEConfig:
    return VAEConfig(**{**PRESETS["tiny"], "input_size": 16, **kw})


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A tar.gz image-folder tree: 2 classes x 30 PNGs of 32x32."""
    return colour_archive(tmp_path_factory.mktemp("vaedata"), names=["a", "b"], per_class=30,
                          colour=lambda k: 70 + 90 * k, image_name="{i:03d}.png")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("MVE_CACHE_DIR", str(d))
    return d


# -- the "sd" preset and recipe --------------------------------------------------------------


def test_sd_preset_fits_the_budget(tmp_path):
    cfg = make_config("vae", {}, preset="sd")
    assert cfg.latent_shape == (4, 8, 8) and cfg.latent_dim == 256
    assert cfg.likelihood == "mse" and 0 < cfg.beta < 1 and cfg.kl_anneal > 0
    model = build_model("vae", cfg)
    assert sum(p.numel() for p in model.parameters()) <= 3_000_000
    # with a 10-component prior the checkpoint stays under 10 MB
    z = torch.randn(200, 256)
    fit = fit_gmm(z, 10, iters=2)
    model.set_latent_prior(fit.weights, fit.means, fit.chol)
    save_checkpoint(tmp_path / "c", model, model_name="vae", model_config=model.config,
                    preprocessing=PREP)
    assert (tmp_path / "c" / "model.safetensors").stat().st_size < 10_000_000
    for preset in (None, "sd"):
        train = load_train_config("vae", preset=preset)
        assert train.model_config.latent_shape == (4, 8, 8)


# -- objective levers ------------------------------------------------------------------------


def test_kl_annealing_follows_train_progress():
    torch.manual_seed(0)
    m = VAE(tiny(likelihood="mse", beta=0.5, kl_anneal=0.2)).train()
    x = images(4)
    for progress, weight in ((0.0, 0.0), (0.1, 0.25), (0.2, 0.5), (0.9, 0.5)):
        m.set_train_progress(progress)
        assert m.kl_weight == pytest.approx(weight)
        torch.manual_seed(1)
        out = m(x)
        terms = m.loss(x, out)
        assert terms["kl_weight"].item() == pytest.approx(weight)
        torch.testing.assert_close(terms["loss"], terms["recon_nll"] + weight * terms["kl"])
    m.set_train_progress(5.0)  # clamped
    assert m.kl_weight == 0.5
    assert VAE(tiny(beta=0.3)).kl_weight == 0.3  # no annealing: beta from the start


def test_free_bits_floor_per_latent_channel():
    torch.manual_seed(0)
    fb = 2.0
    m = VAE(tiny(likelihood="mse", beta=1.0, free_bits=fb)).train()
    x = images(4)
    out = m(x)
    terms = m.loss(x, out)
    kl_el = 0.5 * (out.mu ** 2 + out.logvar.exp() - 1 - out.logvar)
    per_channel = kl_el.mean(dim=(0, 2, 3))
    hw = kl_el.shape[2] * kl_el.shape[3]
    expected = per_channel.clamp(min=fb).sum() * hw
    torch.testing.assert_close(terms["loss"], terms["recon_nll"] + expected)
    # reported KL and ELBO are the true ones, not floored
    torch.testing.assert_close(terms["kl"], kl_el.flatten(1).sum(1).mean())
    # channels under the floor get no KL gradient: with a huge floor the loss has none at all
    m2 = VAE(tiny(likelihood="mse", beta=1.0, free_bits=1e6)).train()
    m2.load_state_dict(m.state_dict())
    torch.manual_seed(2)
    o2 = m2(x)
    mu = o2.mu.detach().requires_grad_()
    t2 = m2.loss(x, o2._replace(mu=mu, recon=o2.recon.detach()))
    t2["loss"].backward()
    assert mu.grad is None or mu.grad.abs().max() == 0


def test_l1_likelihood_and_config_validation():
    torch.manual_seed(0)
    m = VAE(tiny(likelihood="l1", beta=0.0)).eval()
    x = images(2)
    out = m(x)
    terms = m.loss(x, out)
    torch.testing.assert_close(terms["recon_nll"], (x - out.recon).abs().flatten(1).sum(1).mean()
                               / 0.1)
    for kw, match in (({"kl_anneal": 2.0}, "kl_anneal"), ({"free_bits": -1.0}, "free_bits"),
                      ({"perceptual_weight": 1.0}, "perceptual_classifier"),
                      ({"prior": "gmm"}, "prior_components"), ({"prior": "flow"}, "prior")):
        with pytest.raises(ValueError, match=match):
            tiny(**kw)


def test_perceptual_loss_uses_an_injected_frozen_classifier_outside_the_state_dict(tmp_path):
    clf = make_classifier(tmp_path / "clf")
    torch.manual_seed(0)
    cfg = VAEConfig(**{**PRESETS["tiny"], "likelihood": "mse", "perceptual_weight": 0.5,
                       "perceptual_classifier": str(clf), "perceptual_layers": 2})
    m = VAE(cfg).train()
    x = torch.randint(0, 256, (2, 3, 32, 32)).float() / 127.5 - 1
    with pytest.raises(RuntimeError, match="no perceptual network was injected"):
        m.loss(x, m(x))  # the model does no I/O: the trainer injects the network
    net = perceptual_network(clf, "cpu", stages=cfg.perceptual_layers)
    m.set_perceptual(net)
    out = m(x)
    terms = m.loss(x, out)
    assert terms["perceptual"] > 0
    terms["loss"].backward()
    assert m.decoder.conv_out.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in net.parameters())
    assert all(p.grad is None for p in net.parameters())
    assert not net.training and not net.train().training  # frozen: never in training mode
    assert len(net(x)) == 2  # perceptual_layers feature maps
    assert not any(k.startswith("_perceptual") or "classifier." in k for k in m.state_dict())
    assert len(list(m.parameters())) == len(list(VAE(cfg).parameters()))
    # evaluation does not need the classifier
    m.eval()
    assert "perceptual" not in m.loss(x, m(x))
    m.set_perceptual(None)
    assert "perceptual" not in m.loss(x, m(x))
    m.set_perceptual(net)
    # the distance of an image to itself is zero
    assert m.perceptual_distance(x, x).abs().max() < 1e-6


def test_perceptual_network_needs_a_checkpoint_with_feature_maps(tmp_path):
    vae = make_vae(tmp_path / "vae")
    with pytest.raises(ConfigError, match="without feature maps"):
        perceptual_network(vae)


# -- the GMM latent prior --------------------------------------------------------------------


def test_gmm_recovers_a_known_two_component_mixture():
    g = torch.Generator().manual_seed(0)
    n = 3000
    comp = (torch.rand(n, generator=g) < 0.3).long()
    means = torch.tensor([[-4.0, 0.0], [3.0, 2.0]])
    chols = torch.stack([torch.tensor([[1.0, 0.0], [0.5, 0.5]]),
                         torch.tensor([[0.7, 0.0], [-0.3, 1.2]])])
    eps = torch.randn(n, 2, generator=g)
    x = means[comp] + (chols[comp] @ eps.unsqueeze(-1)).squeeze(-1)
    fit = fit_gmm(x, 2, seed=0, reg=1e-6)
    order = fit.means[:, 0].argsort()
    torch.testing.assert_close(fit.weights[order], torch.tensor([0.7, 0.3]), atol=0.03, rtol=0)
    torch.testing.assert_close(fit.means[order], means, atol=0.1, rtol=0)
    covs = chols @ chols.transpose(-1, -2)
    torch.testing.assert_close(fit.covariances[order], covs, atol=0.12, rtol=0)
    # sampling from the installed mixture reproduces its moments
    gm = GaussianMixture(2, 2)
    gm.set(fit.weights, fit.means, fit.chol)
    s = gm.sample(20000, seed=0)
    torch.testing.assert_close(s.mean(0), x.mean(0), atol=0.1, rtol=0)
    assert gm.log_prob(x).mean() > -4.5
    torch.testing.assert_close(gm.sample(5, seed=3), gm.sample(5, seed=3))
    assert gm.sample(2000, temperature=0.0, seed=0).unique(dim=0).shape[0] == 2


def test_prior_buffers_round_trip_and_drive_sampling(tmp_path):
    torch.manual_seed(0)
    cfg = make_config("vae", {}, preset="tiny")
    model = build_model("vae", cfg).eval()
    with pytest.raises(ValueError, match="fit-prior"):
        model.sample(2, prior="gmm")
    data = torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8)
    summary = fit_latent_prior(model, data, components=3, iters=20, batch_size=25)
    assert summary["samples"] == 60 and summary["latent_dim"] == cfg.latent_dim
    assert model.config.prior == "gmm" and model.config.prior_components == 3
    save_checkpoint(tmp_path / "c", model, model_name="vae", model_config=model.config,
                    preprocessing=PREP)
    meta = json.loads((tmp_path / "c" / "mve.json").read_text())
    assert meta["model_config"]["prior"] == "gmm"
    loaded = load_checkpoint(tmp_path / "c").model
    for name, buf in model.latent_prior.named_buffers():
        torch.testing.assert_close(dict(loaded.latent_prior.named_buffers())[name], buf)
    a = loaded.sample(4, seed=7)
    torch.testing.assert_close(a, model.sample(4, seed=7))
    std = loaded.sample(4, seed=7, prior="standard")
    assert not torch.allclose(a, std)
    assert loaded.sample(3, temperature=0.5, seed=1).shape == (3, 3, 32, 32)


# -- CLIs ------------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def test_generate_cli_writes_pngs_of_the_right_size(tmp_path, capsys):
    vae = make_vae(tmp_path / "vae")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.full((32, 32, 3), 30, np.uint8)).save(a)
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(b)  # resized to 32 on input
    out = tmp_path / "s.png"
    assert main(["generate", "--vae", str(vae), "--n", "6", "--seed", "0", "--out", str(out)]) == 0
    assert _png_size(out) == (3 * 34 + 2, 2 * 34 + 2)  # 3 columns of 32 px with 2 px gaps
    first = out.read_bytes()
    assert main(["generate", "--vae", str(vae), "--n", "6", "--seed", "0", "--out", str(out)]) == 0
    assert out.read_bytes() == first  # seeded
    assert main(["generate", "--vae", str(vae), "--mode", "variations", "--image", str(a),
                 "--n", "4", "--temperature", "0.5", "--out", str(tmp_path / "v.png")]) == 0
    assert _png_size(tmp_path / "v.png") == (2 * 34 + 2, 2 * 34 + 2)
    assert main(["generate", "--vae", str(vae), "--mode", "interpolate", "--image", str(a),
                 "--image", str(b), "--n", "5", "--out", str(tmp_path / "i.png")]) == 0
    assert _png_size(tmp_path / "i.png") == (5 * 34 + 2, 36)
    capsys.readouterr()
    assert main(["generate", "--vae", str(vae), "--mode", "interpolate", "--image", str(a),
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "needs 2 --image" in capsys.readouterr().err
    assert main(["generate", "--vae", str(vae), "--prior", "gmm", "--out",
                 str(tmp_path / "x.png")]) == 2
    assert "fit-prior" in capsys.readouterr().err


def _vae_with_split(path: Path) -> Path:
    """A tiny VAE checkpoint whose provenance holds out 20 validation images."""
    torch.manual_seed(0)
    cfg = make_config("vae", {}, preset="tiny")
    return save_checkpoint(path, build_model("vae", cfg).eval(), model_name="vae",
                           model_config=cfg, preprocessing=PREP, metrics={"seed": 0},
                           provenance={"val_size": 20, "split_seed": 0})


def test_fit_prior_evaluate_fid_and_report(archive, tmp_path, cache, capsys):
    vae = _vae_with_split(tmp_path / "vae")
    clf = make_classifier(tmp_path / "clf")
    before = {f.name: f.read_bytes() for f in vae.iterdir() if f.is_file()}
    for action in ("fit-prior", "report"):  # neither --out nor --in-place: nothing is written
        assert main(["vae", action, str(vae), "--data", str(archive), "--device", "cpu"]) == 2
        assert "--in-place" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in vae.iterdir() if f.is_file()} == before
    assert main(["vae", "fit-prior", str(vae), "--in-place", "--data", str(archive),
                 "--components", "2", "--iters", "10", "--device", "cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["components"] == 2 and summary["samples"] > 0
    ckpt = load_checkpoint(vae)
    assert ckpt.model.config.prior == "gmm" and ckpt.meta["latent_prior"]["components"] == 2
    assert ckpt.meta["metrics"] == {"seed": 0}  # kept

    argv = ["evaluate", str(vae), "--data", str(archive), "--device", "cpu", "--fid", "12",
            "--fid-features", "classifier", "--fid-classifier", str(clf), "--json"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    m = json.loads(text.strip().splitlines()[-1])
    assert m["psnr"] > 0 and 0 < m["ssim"] <= 1 and m["elbo_bpd"] > 0
    assert m["fcd"] >= 0 and "kcd" in m and "fid" not in m
    assert m["fid_num_samples"] == 12 and m["fid_num_real"] == 12 and m["fid_prior"] == "gmm"
    assert "FCD" in text
    assert len(list((cache / "fid").glob("*.safetensors"))) == 1
    assert main(argv) == 0  # real statistics from the cache this time
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["fcd"] == pytest.approx(m["fcd"])

    assert main(["vae", "report", str(vae), "--in-place", "--data", str(archive), "--device",
                 "cpu", "--fid", "8", "--fid-features", "classifier", "--fid-classifier", str(clf),
                 "--reproduce", "mve train vae --preset sd ..."]) == 0
    report = (vae / "REPORT.md").read_text()
    for s in ("PSNR", "SSIM", "bits/dim", "FCD", "8 samples", "reconstructions.png",
              "samples.png", "variations.png", "mve train vae --preset sd ...", "Latent prior"):
        assert s in report, s
    for name in ("reconstructions.png", "samples.png", "variations.png"):
        assert (vae / name).exists()
    meta = load_checkpoint(vae).meta
    assert meta["metrics"]["val_psnr"] == pytest.approx(m["psnr"])
    assert meta["metrics"]["fcd"] >= 0 and meta["latent_prior"]["components"] == 2


def test_evaluate_without_checkpoint_uses_the_default_classifier(archive, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.setenv("MVE_DEFAULT_CLASSIFIER", "")
    assert main(["evaluate", "--data", str(archive)]) == 2
    assert "no default classifier" in capsys.readouterr().err
    clf = make_classifier(tmp_path / "clf", values={"cnn_layers": 3, "final_channels": 32,
                                                    "fcn_layers": 2, "num_classes": 2})
    meta = json.loads((clf / "mve.json").read_text())
    meta["class_names"] = ["a", "b"]
    meta["provenance"] = {"val_size": 20, "split_seed": 0}
    (clf / "mve.json").write_text(json.dumps(meta))
    monkeypatch.setenv("MVE_DEFAULT_CLASSIFIER", str(clf))
    assert main(["evaluate", "--data", str(archive), "--device", "cpu", "--out",
                 str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["checkpoint"] == str(clf.resolve())


def test_vae_config_round_trips_through_dataclasses_replace():
    cfg = tiny(prior="standard", prior_components=0, kl_anneal=0.1)
    assert dataclasses.replace(cfg, prior="gmm", prior_components=4).prior_components == 4
