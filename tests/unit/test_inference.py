"""mve.inference.for_inference: the same answers from a faster memory layout."""

from __future__ import annotations

import torch
from torch import nn

from mve.inference import for_inference
from mve.models import build_model, make_config


def test_a_conv_model_answers_the_same_in_channels_last() -> None:
    torch.manual_seed(0)
    cfg = make_config("classifier", {"arch": "convgroups", "widths": [16, 32, 32],
                                     "tta": "flip_translate"})
    model = build_model("classifier", cfg).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        ref = model(x)
    model.train()
    assert for_inference(model) is model and not model.training
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()  # the layout really changed
    with torch.inference_mode():
        assert torch.allclose(model(x), ref, atol=1e-5)  # NCHW inputs still work


def test_a_model_without_convolutions_is_only_put_in_eval_mode() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    for_inference(model)
    assert not model.training and model[0].weight.is_contiguous()
