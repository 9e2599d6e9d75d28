"""The classifier: exact reproduction of the research note's seed model, and the new options."""

from __future__ import annotations

import logging

import pytest
import torch

from mve.models import Classifier, ClassifierConfig, build_model, list_models, make_config
from mve.models.classifier import FractionalMaxPool2d


def seed_model() -> Classifier:
    return build_model("classifier", make_config("classifier", preset="seed"))


def test_seed_plan_matches_the_note_exactly():
    plan = make_config("classifier", preset="seed").plan()
    assert plan.channels == [3, 46, 62, 84, 114, 155, 210]
    assert plan.sizes == [20, 13, 8, 5, 3, 2]
    assert plan.fcn == [840, 277, 92, 30, 10]
    assert plan.upscale_ratio == pytest.approx(1.3548533596918833, abs=1e-15)


def test_seed_parameter_count_is_875592():
    assert sum(p.numel() for p in seed_model().parameters()) == 875_592


def test_seed_layer_parameters_match_the_note_table():
    m = seed_model()
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert [n(c) for c in convs] == [1288, 25730, 46956, 86298, 159185, 293160]
    assert [n(lin) for lin in linears] == [232957, 25576, 2790, 310]


def test_seed_logs_the_notes_plan_lines(caplog):
    with caplog.at_level(logging.INFO, logger="mve.models.classifier"):
        seed_model()
    text = caplog.text
    assert "Classifier channel upscale ratio: 1.3548533596918833" in text
    assert ("Layers = 6, downsampled_sizes = [20, 13, 8, 5, 3, 2], "
            "channels = [3, 46, 62, 84, 114, 155, 210]") in text
    assert "FCN layers: [840, 277, 92, 30, 10]" in text


def test_forward_returns_logits_not_probabilities():
    m = seed_model().eval()
    x = torch.randn(8, 3, 32, 32)
    logits = m(x)
    assert logits.shape == (8, 10)
    assert not torch.allclose(logits.sum(1), torch.ones(8))  # no softmax inside
    assert not any(isinstance(mod, torch.nn.Softmax) for mod in m.modules())
    probs = m.predict_proba(x)
    assert torch.allclose(probs.sum(1), torch.ones(8), atol=1e-5)
    assert torch.equal(probs.argmax(1), logits.argmax(1))


def test_gradients_reach_every_parameter():
    m = seed_model().train()
    loss = torch.nn.functional.cross_entropy(m(torch.randn(4, 3, 32, 32)), torch.arange(4))
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_eval_mode_is_deterministic_but_training_pool_is_random():
    m = seed_model()
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    assert torch.equal(m(x), m(x))
    pool = FractionalMaxPool2d(kernel_size=2, output_size=20).train()
    y = torch.randn(2, 4, 32, 32)
    assert not torch.equal(pool(y), pool(y))


@pytest.mark.parametrize("options", [
    {"residual": True},
    {"pooling": "max"},
    {"pooling": "avg"},
    {"activation": "relu", "dropout": 0.3},
    {"activation": "gelu", "channels": [32, 48, 64, 96, 128, 160]},
    {"cnn_layers": 4, "fcn_layers": 2, "final_channels": 128},
])
def test_options_beyond_the_seed(options):
    cfg = make_config("classifier", options)
    m = build_model("classifier", cfg).train()
    out = m(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    if "channels" in options:
        assert cfg.plan().channels == [3, *options["channels"]]
    if options.get("residual"):
        assert sum(p.numel() for p in m.parameters()) > 875_592


def test_other_input_sizes_and_class_counts():
    m = build_model("classifier", {"input_size": 64, "num_classes": 7, "cnn_layers": 5})
    assert m.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("bad,match", [
    ({"dropout": 1.5}, "dropout"),
    ({"activation": "tanh"}, "activation"),
    ({"channels": [1, 2]}, "channels"),
    ({"cnn_layers": 40}, "cannot shrink"),
    ({"bogus": 1}, "unknown"),
    ({"cnn_layers": "six"}, "integer"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        make_config("classifier", bad)


def test_registry():
    assert {"classifier", "vae"} <= set(list_models())
    with pytest.raises(ValueError, match="known models"):
        build_model("resnet9000")
    with pytest.raises(TypeError):
        build_model("vae", ClassifierConfig())
    assert isinstance(build_model("classifier", {"final_channels": 64}), Classifier)
