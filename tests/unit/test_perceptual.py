"""The classifier's public feature maps, and the VAE's perceptual loss on an injected network."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from mve.config import load_train_config
from mve.data import DataBundle, Split
from mve.models import build_model, make_config
from mve.models.classifier import Arch
from mve.models.vae import MSE_SIGMA, PRESETS, VAE, VAEConfig
from mve.perceptual import FeatureExtractor, perceptual_network
from mve.pretrained import repo_root
from mve.train import fit

SHIPPED = repo_root() / "models" / "cifar10-classifier"
needs_shipped = pytest.mark.skipif(not (SHIPPED / "mve.json").is_file(),
                                   reason=f"{SHIPPED} is not shipped")

SMALL = {"cnn_layers": 3, "final_channels": 32, "fcn_layers": 2}
CLASSIFIERS = {  # (preset, values): every arch, and the layouts each arch can take
    "geometric": (None, SMALL),
    "geometric-residual": (None, {**SMALL, "residual": True}),
    "geometric-maxpool": (None, {**SMALL, "pooling": "max"}),
    "geometric-avgpool": (None, {**SMALL, "pooling": "avg"}),
    "convgroups": ("convgroups", {"widths": (16, 32, 32)}),
    "convgroups-residual-nowhiten": ("convgroups", {"widths": (16, 24, 24), "convs_per_group": 3,
                                                    "whiten_kernel": 0}),
}


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Model-space [-1, 1] images on the 8-bit grid."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 127.5 - 1.0


def test_the_cases_cover_every_classifier_arch():
    archs = {make_config("classifier", v, preset=p).arch for p, v in CLASSIFIERS.values()}
    assert archs == set(get_args(Arch))


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_feature_maps_exist_for_every_classifier_arch(name):
    preset, values = CLASSIFIERS[name]
    cfg = make_config("classifier", values, preset=preset)
    torch.manual_seed(0)
    m = build_model("classifier", cfg).eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    feats = m.feature_maps(x)
    widths = list(cfg.widths) if cfg.arch == "convgroups" else cfg.plan().channels[1:]
    assert [f.shape[1] for f in feats] == widths  # one map per stage, in order
    assert all(f.ndim == 4 and f.shape[0] == 2 and torch.isfinite(f).all() for f in feats)
    sizes = [f.shape[-1] for f in feats]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < 32  # highest resolution first
    if cfg.arch == "convgroups":  # the last map is what the head pools
        torch.testing.assert_close(feats[-1].amax((2, 3)), m.embed(x))
    firsts = m.feature_maps(x, stages=2)
    assert len(firsts) == 2
    for a, b in zip(firsts, feats, strict=False):
        torch.testing.assert_close(a, b)
    sum(f.sum() for f in feats).backward()  # differentiable in the input, as a loss needs
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="stages"):
        m.feature_maps(x, stages=0)


@needs_shipped
def test_one_vae_step_with_the_shipped_classifier_as_perceptual_network():
    net = perceptual_network(SHIPPED, "cpu", stages=3)
    assert isinstance(net, FeatureExtractor) and net.classifier.config.arch == "convgroups"
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(0)
    cfg = VAEConfig(**{**PRESETS["tiny"], "likelihood": "mse", "perceptual_weight": 0.5,
                       "perceptual_classifier": str(SHIPPED)})
    vae = VAE(cfg).train()
    vae.set_perceptual(net)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    x = images(4)
    out = vae(x)
    terms = vae.loss(x, out)
    assert torch.isfinite(terms["loss"]) and terms["perceptual"] > 0
    # the perceptual term is counted in the pixel loss like a squared error
    p = vae.perceptual_distance(x, out.recon).detach()
    sse = (x - out.recon.detach()).pow(2).flatten(1).sum(1)
    dims = x[0].numel()
    torch.testing.assert_close(terms["recon_nll"],
                               ((sse + 0.5 * dims * p) / (2 * MSE_SIGMA**2)).mean())
    opt.zero_grad()
    terms["loss"].backward()
    opt.step()
    assert all(torch.isfinite(q.grad).all() for q in vae.parameters() if q.grad is not None)
    # the classifier is frozen: no gradient, weights and BatchNorm statistics unchanged
    assert all(q.grad is None for q in net.parameters())
    after = net.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not net.training and not any(k.startswith("classifier") for k in vae.state_dict())


def _bundle(n_train: int, n_val: int, size: int = 32) -> DataBundle:
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        px = torch.randint(0, 256, (n, 3, size, size), generator=g).to(torch.uint8)
        return Split(px, torch.arange(n) % 2)

    return DataBundle(train=split(n_train), val=split(n_val), test=None, class_names=("a", "b"),
                      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), image_size=(size, size),
                      provenance={"source": "synthetic", "split_seed": 0, "val_size": n_val})


@needs_shipped
def test_fit_injects_the_perceptual_network_named_by_the_config(tmp_path):
    cfg = load_train_config("vae", preset="tiny", overrides=[
        "model.likelihood=mse", "model.perceptual_weight=0.5",
        f"model.perceptual_classifier={SHIPPED}", "epochs=1", "batch_size=8",
        "eval_batch_size=8"])
    assert cfg.model_config.perceptual_classifier == str(SHIPPED)
    kept = {}

    def report(metrics, ckpt):
        kept["config"] = (ckpt / "mve.json").read_text()

    result = fit(cfg, _bundle(16, 8), report=report, progress=False)
    last = result.history[-1]
    assert last["train_perceptual"] > 0 and last["train_loss"] == last["train_loss"]
    assert "val_perceptual" not in last  # evaluation does not use the network
    assert str(SHIPPED) in kept["config"]  # the config key is saved as it was
