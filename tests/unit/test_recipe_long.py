"""Issue 14's recipe pieces: the long schedule of `best`, the whitening bias frozen after a few
epochs, the architecture search space, the Muon optimiser and knowledge distillation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_train import synthetic_bundle  # tests/unit/test_train.py
from torch import nn

from mve.checkpoint import load_checkpoint
from mve.config import ConfigError, OptimConfig, load_train_config
from mve.models import build_model, make_config
from mve.models.classifier import PRESETS
from mve.muon import Muon, orthogonalize
from mve.optim import build_optimizer, build_scheduler, lr_factor
from mve.train import fit

REPO = Path(__file__).resolve().parents[2]
# A conv-group net small enough for a CPU test on 16x16 images of 4 classes.
TINY = ["model.input_size=16", "model.num_classes=4", "model.widths=[8,16,16]",
        "batch_size=20", "eval_batch_size=50", "data.val_size=100", "min_steps_per_epoch=0",
        "model.tta=none"]


def _params(cfg) -> int:
    return sum(p.numel() for p in build_model("classifier", cfg.model_config).parameters())


def test_best_has_its_own_long_schedule_not_the_10_epoch_one():
    fast, best = (load_train_config("classifier", preset=p) for p in ("fast", "best"))
    assert best.epochs == 40 and fast.epochs == 10
    assert best.optim.lr < fast.optim.lr  # a lower peak for 4x the steps
    assert best.optim.lr * best.optim.weight_decay == pytest.approx(
        fast.optim.lr * fast.optim.weight_decay, rel=0.01)  # the same decay per step
    assert (best.optim.warmup, best.optim.warmup_start, best.optim.final_lr_fraction) == \
        (0.1, 0.0, 0.0)
    assert best.model_config.bn_momentum == 0.1 and fast.model_config.bn_momentum == 0.4
    assert best.whiten_bias_epochs == 3 and fast.whiten_bias_epochs is None
    total = 40 * 43
    assert lr_factor(0, total, best.optim) < 0.01  # warm-up from 0
    assert lr_factor(total - 1, total, best.optim) == 0.0  # decays to 0


@pytest.mark.parametrize("preset", ["teacher", "muon"])
def test_new_recipes_resolve(preset):
    cfg = load_train_config("classifier", preset=preset)
    if preset == "teacher":
        assert _params(cfg) > 5_000_000  # a teacher is not bound by the student's budget
    else:
        assert cfg.optim.name == "muon" and _params(cfg) <= 1_000_000


def test_every_architecture_of_the_arch_space_stays_under_one_million_parameters():
    from cluster.search import base_config, load_space, trial_config, validate_space

    space = load_space(str(REPO / "cluster" / "spaces" / "classifier-arch.yaml"), "classifier")
    base = base_config("classifier", space, preset="best")
    validate_space(space, base)
    assert base.model_config.convs_per_group == 3
    choices = space.params["model.widths"].args
    assert len(choices) >= 3
    for widths in choices:
        cfg = trial_config(base.to_dict(), {"model.widths": widths})
        assert _params(cfg) <= 1_000_000, widths
        assert cfg.model_config.bn_momentum == 0.1  # the recipe's model keys survive
    assert (REPO / "configs" / "search" / "classifier-arch.yaml").read_bytes() == \
        (REPO / "cluster" / "spaces" / "classifier-arch.yaml").read_bytes()


@pytest.mark.parametrize("name,preset", [("classifier-fast", "fast"),
                                         ("classifier-arch", "best")])
def test_every_model_a_classifier_space_can_draw_fits_the_budget(name, preset):
    """Every combination of the space's model choices: a search must not pick a winner that
    cannot ship (the fast space once drew a third conv per group at 1.59M parameters)."""
    import itertools

    from cluster.search import base_config, load_space, trial_config

    space = load_space(str(REPO / "cluster" / "spaces" / f"{name}.yaml"), "classifier")
    base = base_config("classifier", space, preset=preset).to_dict()
    model_keys = [k for k in space.params if k.startswith("model.")]
    assert all(space.params[k].dist == "choice" for k in model_keys), model_keys
    for values in itertools.product(*(space.params[k].args for k in model_keys)):
        point = dict(zip(model_keys, values, strict=True))
        assert _params(trial_config(base, point)) <= 1_000_000, point


def test_widths_also_read_from_a_string():
    for text in ("64,176,176", "64x176x176"):
        assert make_config("classifier", {"widths": text}, preset="convgroups").widths == \
            (64, 176, 176)
    assert PRESETS["convgroups-res3"]["convs_per_group"] == 3
    cfg = load_train_config("classifier", preset="best",
                            overrides=["model.preset=convgroups-res3"])
    assert cfg.model_config.widths == (56, 128, 144) and _params(cfg) <= 1_000_000
    with pytest.raises(ConfigError):
        load_train_config("classifier", overrides=["model.widths=64,abc"])


def test_whitening_bias_freezes_after_its_epochs_and_the_rest_keeps_training(tmp_path):
    cfg = load_train_config("classifier", preset="fast",
                            overrides=[*TINY, "epochs=3", "whiten_bias_epochs=1"])
    kept = {}

    def report(metrics, ckpt):
        shutil.copytree(ckpt, tmp_path / f"e{metrics['epoch']}")
        kept[metrics["epoch"]] = load_checkpoint(tmp_path / f"e{metrics['epoch']}").model

    fit(cfg, synthetic_bundle(), report=report, progress=False)
    b = [kept[e].body.whiten.bias for e in (1, 2, 3)]
    assert not torch.equal(b[0], torch.zeros_like(b[0]))  # it trained in epoch 1
    assert torch.equal(b[0], b[1]) and torch.equal(b[1], b[2])  # then stopped
    w = [kept[e].body.groups[0].conv1.weight for e in (1, 3)]
    assert not torch.equal(w[0], w[1])


def test_the_freeze_group_gets_lr_0_from_its_step_only():
    net = build_model("classifier", load_train_config("classifier", preset="fast").model_config)
    opt_cfg = OptimConfig(name="sgd", lr=1.0, schedule="linear", warmup=0.1)
    opt = build_optimizer(net, opt_cfg, freeze_later=[net.whitening_bias()])
    frozen = [i for i, g in enumerate(opt.param_groups) if g.get("freeze_after")]
    assert len(frozen) == 1 and opt.param_groups[frozen[0]]["params"][0] is net.whitening_bias()
    sched = build_scheduler(opt, 100, opt_cfg, freeze_step=30)
    lrs = []
    for _ in range(40):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[29][frozen[0]] == lrs[29][0] > 0 and lrs[30][frozen[0]] == 0.0 < lrs[30][0]


def test_orthogonalize_flattens_the_spectrum():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(32, 32))
    v, _ = torch.linalg.qr(torch.randn(72, 32))
    g = u @ torch.diag(torch.logspace(-1, 1, 32)) @ v.T  # condition number 100
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.max() < 1.3 and s.min() > 0.5
    assert torch.linalg.svdvals(orthogonalize(g.T)).min() > 0.5  # a tall matrix too
    with pytest.raises(ValueError):
        orthogonalize(torch.randn(3, 3, 3))


def test_muon_groups_step_like_sgd_or_muon():
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(4, 8, 3), nn.Linear(5, 3)
    ref = nn.Linear(5, 3)
    ref.load_state_dict(lin.state_dict())
    opt = Muon([{"params": [conv.weight], "lr": 0.1, "orthogonal": True, "momentum": 0.6},
                {"params": list(lin.parameters()), "weight_decay": 1e-2}], lr=0.05, momentum=0.9)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=1e-2)
    x = torch.randn(6, 5)
    for _ in range(3):
        for o, m in ((opt, lin), (sgd, ref)):
            o.zero_grad()
            (m(x) ** 2).sum().backward()
        conv.weight.grad = torch.randn_like(conv.weight)
        opt.step()
        sgd.step()
    assert torch.allclose(lin.weight, ref.weight, atol=1e-6)  # the SGD groups are torch's SGD
    # Muon renormalises a filter bank to norm sqrt(c_out) before each step of norm ~sqrt(c_out)
    assert conv.weight.norm().item() == pytest.approx(8 ** 0.5, rel=0.5)
    with pytest.raises(ValueError):
        Muon([{"params": [lin.bias], "orthogonal": True}], lr=0.1)


def test_a_muon_recipe_learns(tmp_path):
    cfg = load_train_config("classifier", preset="muon",
                            overrides=[*TINY, "epochs=3", "optim.lr=0.2"])
    result = fit(cfg, synthetic_bundle(), progress=False)
    assert result.history[-1]["val_accuracy"] > 0.6  # chance is 0.25


def test_muon_is_a_known_optimiser_name_and_other_names_are_refused():
    assert load_train_config("classifier", overrides=["optim.name=muon"]).optim.name == "muon"
    with pytest.raises(ConfigError):
        load_train_config("classifier", overrides=["optim.name=lion"])
