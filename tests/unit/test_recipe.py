"""The classifier recipe pieces: conv-group net, whitening init, TTA, weight averaging,
schedules, bias learning rates, and the presets' parameter budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mve.averaging import WeightAverager
from mve.config import OptimConfig, load_train_config
from mve.models import build_model, make_config
from mve.models.classifier import tta_logits
from mve.train import build_optimizer, lr_factor


def convnet(**kw):
    return build_model("classifier", make_config("classifier", kw, preset="convgroups"))


@pytest.mark.parametrize("preset", [None, "fast", "best", "seed", "baseline"])
def test_every_recipe_preset_stays_under_one_million_parameters(preset):
    cfg = load_train_config("classifier", preset=preset)
    n = sum(p.numel() for p in build_model("classifier", cfg.model_config).parameters())
    assert n <= 1_000_000, (preset, n)


def test_fast_recipe_is_the_airbench_recipe():
    cfg = load_train_config("classifier", preset="fast")
    assert cfg.model_config.arch == "convgroups" and cfg.epochs == 10
    assert cfg.optim.nesterov and cfg.optim.bias_lr_scale == 64
    assert cfg.averaging == "lookahead" and cfg.label_smoothing == 0.2
    assert cfg.data.augment.alternating_flip and cfg.model_config.tta == "flip_translate"
    seed = load_train_config("classifier", preset="seed")
    assert seed.model_config.arch == "geometric" and seed.optim.name == "adam"
    assert seed.averaging == "none" and not seed.data.augment.flip


def test_convgroups_parameter_count_and_shapes():
    m = convnet()
    assert sum(p.numel() for p in m.parameters()) == 992_152
    x = torch.randn(3, 3, 32, 32)
    assert m(x).shape == (3, 10) and m.embed(x).shape == (3, 176)
    assert [f.shape[-1] for f in m.feature_maps(x)] == [15, 7, 3]
    assert convnet(convs_per_group=3, widths=(16, 32, 32))(x).shape == (3, 10)
    with pytest.raises(ValueError, match="convs_per_group"):
        make_config("classifier", {"convs_per_group": 4}, preset="convgroups")


def test_dirac_init_makes_each_conv_start_as_identity():
    m = convnet(widths=(24, 32, 32))
    conv = m.body.groups[0].conv2  # 24 -> 24... first c_in filters are identities
    x = torch.randn(2, 24, 8, 8)
    assert torch.allclose(conv(x), x, atol=1e-6)
    wider = m.body.groups[1].conv1  # 24 -> 32: first 24 outputs copy the input
    assert torch.allclose(wider(x)[:, :24], x, atol=1e-6)


def test_frozen_parameters_are_left_out_of_the_optimizer():
    m = convnet()
    frozen = {id(p) for p in m.parameters() if not p.requires_grad}
    assert id(m.body.whiten.weight) in frozen
    assert all(not bn.weight.requires_grad for bn in m.modules()
               if isinstance(bn, torch.nn.BatchNorm2d))
    opt = build_optimizer(m, OptimConfig(name="sgd", lr=0.5, bias_lr_scale=64, weight_decay=0.01,
                                         decay_biases=True))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & frozen
    decay, norms, biases = opt.param_groups
    assert decay["lr"] == 0.5 and norms["lr"] == pytest.approx(32.0) and biases["lr"] == 0.5
    # the same absolute decay per step in every group (airbench's decoupled form)
    for g in opt.param_groups:
        assert g["lr"] * g["weight_decay"] == pytest.approx(0.5 * 0.01)
    assert [id(p) for p in biases["params"]] == [id(m.body.whiten.bias)]


def test_whitening_init_whitens_the_patches():
    torch.manual_seed(0)
    # correlated channels: the whitening layer must decorrelate 2x2 patches
    base = torch.randn(64, 1, 16, 16)
    x = torch.cat([base, 0.9 * base + 0.1 * torch.randn_like(base), torch.randn_like(base)], 1)
    m = convnet(whiten_eps=1e-8)
    m.init_from_data(x)
    w = m.body.whiten.weight  # [24, 3, 2, 2]: 12 filters and their negations
    assert torch.allclose(w[:12], -w[12:])
    out = torch.nn.functional.conv2d(x.double(), w[:12].double())  # no bias
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    cov = flat @ flat.T / flat.shape[1]
    assert torch.allclose(cov, torch.eye(12, dtype=cov.dtype), atol=0.05)
    assert not w.requires_grad


def test_tta_averages_mirrored_views_and_training_mode_skips_it():
    calls = []

    def fn(v):
        calls.append(v.clone())
        return v.mean(dim=(1, 2, 3)).unsqueeze(1) * 0 + v[:, :1, 0, :1].flatten(1)

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    flip = tta_logits(fn, x, "flip")
    # the views go through the network together, in one call (see tests/unit/test_tta.py)
    assert len(calls) == 1 and torch.equal(calls[0], torch.cat([x, x.flip(-1)]))
    assert torch.allclose(flip, 0.5 * (fn(x) + fn(x.flip(-1))))
    calls.clear()
    tta_logits(fn, x, "flip_translate")
    assert len(calls) == 1 and len(calls[0]) == 6 * len(x)
    m = convnet(tta="flip").eval()
    y = torch.randn(2, 3, 32, 32)
    assert torch.allclose(m(y), 0.5 * (m.logits(y) + m.logits(y.flip(-1))), atol=1e-5)
    # a mirror-symmetric input gives the same answer with and without flip TTA
    sym = torch.cat([y[..., :16], y[..., :16].flip(-1)], -1)
    assert torch.allclose(m(sym), m.logits(sym), atol=1e-5)
    m.train()  # training mode: one view, no TTA
    assert torch.allclose(m(y), m.logits(y), atol=1e-6)


def test_linear_schedule_with_warmup_start_is_airbenchs_triangle():
    cfg = OptimConfig(schedule="linear", warmup=0.23, warmup_start=0.2, final_lr_fraction=0.07)
    total = 100
    f = [lr_factor(s, total, cfg) for s in range(total)]
    assert 0.2 < f[0] < 0.3 and max(f) == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.07)
    assert f.index(max(f)) == 22  # end of the 23-step warm-up


def _toy():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))


def test_ema_tracks_an_exponential_average_and_swaps_in_for_evaluation():
    m = _toy()
    w0 = m[0].weight.detach().clone()
    avg = WeightAverager(m, mode="ema", decay=0.9, every=1, total_steps=10)
    with torch.no_grad():
        m[0].weight.add_(1.0)
    avg.update(m, 1)
    expected = 0.9 * w0 + 0.1 * (w0 + 1)
    assert torch.allclose(avg.avg["0.weight"], expected)
    assert torch.allclose(m[0].weight, w0 + 1)  # training weights untouched
    with avg.averaged(m):
        assert torch.allclose(m[0].weight, expected)
    assert torch.allclose(m[0].weight, w0 + 1)
    # every=5: no update before step 5
    avg5 = WeightAverager(m, mode="ema", decay=0.9, every=5, total_steps=100)
    before = avg5.state_dict()
    with torch.no_grad():
        m[0].weight.add_(1.0)
    avg5.update(m, 3)
    assert torch.equal(avg5.avg["0.weight"], before["0.weight"])
    avg5.update(m, 5)
    assert not torch.equal(avg5.avg["0.weight"], before["0.weight"])


def test_lookahead_pulls_weights_to_the_average_and_ends_on_it():
    m = _toy()
    la = WeightAverager(m, mode="lookahead", decay=0.95, every=5, total_steps=10)
    assert la.decay_at(5) == pytest.approx(0.95 ** 5 * 0.5 ** 3)
    start = m[0].weight.detach().clone()
    with torch.no_grad():
        m[0].weight.add_(2.0)
    la.update(m, 5)
    d = la.decay_at(5)
    assert torch.allclose(m[0].weight, d * start + (1 - d) * (start + 2))
    assert torch.allclose(la.avg["0.weight"], m[0].weight)
    with torch.no_grad():
        m[0].weight.add_(1.0)
    la.update(m, 10)  # last step: decay 1 -> the weights become the average
    assert torch.allclose(m[0].weight, la.avg["0.weight"])
    restored = WeightAverager(_toy(), mode="lookahead", decay=0.95, every=5, total_steps=10)
    restored.load_state_dict(la.state_dict())
    assert torch.equal(restored.avg["0.weight"], la.avg["0.weight"])


def test_the_fast_search_space_covers_the_recipe_pieces():
    from cluster.search import base_config, load_space, validate_space

    path = Path(__file__).resolve().parents[2] / "cluster" / "spaces" / "classifier-fast.yaml"
    space = load_space(str(path), "classifier")
    base = base_config("classifier", space, preset="fast")
    validate_space(space, base)
    assert base.model_config.arch == "convgroups"
    assert {"averaging", "model.tta", "model.whiten_kernel", "data.augment.cutout",
            "optim.lr"} <= set(space.params)
