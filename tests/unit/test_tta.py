"""Batched test-time augmentation: the views of a batch share as few forward calls as the cap
allows, and the result equals the per-view formula; ``set_tta`` switches the mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mve.models import ClassifierConfig, build_model, make_config
from mve.models.classifier import TTA_MAX_BATCH, tta_logits

CAP = TTA_MAX_BATCH
ARCHS = {
    "geometric": {"starting_channels": 8, "final_channels": 16, "cnn_layers": 3, "fcn_layers": 2},
    "convgroups": {"arch": "convgroups", "widths": (8, 16, 16), "activation": "gelu"},
}


def small_model(arch: str, tta: str = "none"):
    torch.manual_seed(0)
    m = build_model("classifier", make_config("classifier", {**ARCHS[arch], "tta": tta}))
    m.init_from_data(torch.randn(64, 3, 32, 32))
    m.train()  # a few training steps' worth of BatchNorm statistics, so eval is not trivial
    with torch.no_grad():
        m(torch.randn(32, 3, 32, 32))
    return m.eval()


def reference_tta(fn, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The per-view formula: one call of ``fn`` per view."""
    def mirrored(v):
        return 0.5 * (fn(v) + fn(v.flip(-1)))

    out = mirrored(x)
    if mode == "flip":
        return out
    h, w = x.shape[-2:]
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    a, b = padded[..., 0:h, 0:w], padded[..., 2:h + 2, 2:w + 2]
    return 0.5 * out + 0.25 * (mirrored(a) + mirrored(b))


class Counting:
    """Wraps ``fn``, recording the batch size of each call."""

    def __init__(self, fn):
        self.fn, self.sizes = fn, []

    def __call__(self, v):
        self.sizes.append(len(v))
        return self.fn(v)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("mode,views", [("flip", 2), ("flip_translate", 6)])
@pytest.mark.parametrize("batch", [1, 3, CAP + 5])
def test_batched_tta_equals_the_per_view_formula_in_few_calls(arch, mode, views, batch):
    m = small_model(arch)
    x = torch.randn(batch, 3, 32, 32)
    fn = Counting(m.logits)
    with torch.no_grad():
        got, want = tta_logits(fn, x, mode), reference_tta(m.logits, x, mode)
    assert got.shape == want.shape == (batch, 10)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
    calls = -(-views * batch // CAP)
    assert len(fn.sizes) == calls and sum(fn.sizes) == views * batch
    assert max(fn.sizes) <= CAP and max(fn.sizes) - min(fn.sizes) <= 1  # even chunks


def test_views_and_weights_on_a_linear_fn():
    """With fn = the top-left pixel the output is the weighted sum of the views' corners."""
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)

    def fn(v):
        return v[:, 0, 0, :1]

    px = x[:, 0]
    flip = 0.5 * px[:, 0, :1] + 0.5 * px[:, 0, 3:]  # x's corner and its mirror's
    assert torch.equal(tta_logits(fn, x, "flip"), flip)
    assert torch.equal(tta_logits(fn, x, "flip", max_batch=1), flip)
    # 1-pixel reflect padding: both shifts' corner is x[1, 1], both mirrors' corner is x[1, 2]
    shifted = 0.125 * (2 * px[:, 1, 1:2] + 2 * px[:, 1, 2:3])
    assert torch.allclose(tta_logits(fn, x, "flip_translate"), 0.5 * flip + shifted)
    assert torch.allclose(reference_tta(fn, x, "flip_translate"), 0.5 * flip + shifted)
    with pytest.raises(ValueError, match="flip_translate"):
        tta_logits(fn, x, "none")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_eval_forward_uses_the_configured_mode_and_set_tta_switches_it(arch):
    m = small_model(arch, tta="flip_translate")
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        full = m(x)
        assert torch.allclose(full, reference_tta(m.logits, x, "flip_translate"), atol=1e-5)
        m.set_tta("none")
        assert m.config.tta == "none" and torch.equal(m(x), m.logits(x))
        assert not torch.allclose(m(x), full, atol=1e-4)
        m.set_tta("flip")
        assert torch.allclose(m(x), reference_tta(m.logits, x, "flip"), atol=1e-5)
        assert not torch.allclose(m(x), m.logits(x), atol=1e-4)


def test_set_tta_rejects_unknown_modes_and_keeps_the_old_one():
    m = small_model("convgroups", tta="flip")
    for bad in ("mirror", "", "FLIP"):
        with pytest.raises(ValueError, match="tta must be one of none, flip, flip_translate"):
            m.set_tta(bad)
    assert m.config.tta == "flip"
    with pytest.raises(ValueError, match="tta must be one of"):  # built without make_config
        ClassifierConfig(tta="flips")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_training_mode_ignores_tta(arch):
    m = small_model(arch, tta="flip_translate").train()
    fn = Counting(m.logits)
    m.logits = fn  # the instance attribute shadows the method: forward goes through it
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    out = m(x)
    assert fn.sizes == [4] and out.shape == (4, 10)
