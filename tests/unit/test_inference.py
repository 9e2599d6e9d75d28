"""mve.inference: the same answers from a faster memory layout; bfloat16 close to fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mve.inference import Precision, for_inference, native_bf16, resolve_precision
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


def _small_classifier(tta: str = "none") -> nn.Module:
    torch.manual_seed(0)
    cfg = make_config("classifier", {"arch": "convgroups", "widths": [16, 32, 32], "tta": tta})
    return for_inference(build_model("classifier", cfg))


def test_bf16_answers_close_to_fp32_and_leaves_the_fp32_weights_alone() -> None:
    model = _small_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3, 32, 32)
    with torch.inference_mode():
        ref = model(x).softmax(-1)
        fast = Precision(model, "bf16")
        out = fast(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = (out.softmax(-1) - ref).abs().max().item()
    assert 0 < err < 0.02  # bfloat16 really ran (not fp32), and rounds only a little
    for k, v in model.state_dict().items():  # the original stays fp32, bit for bit
        assert v.dtype == before[k].dtype and torch.equal(v, before[k])
    assert all(v.dtype == torch.float32 for v in fast.state_dict().values()
               if v.is_floating_point())
    with torch.inference_mode():  # fp32 is the model itself: identical answers
        assert torch.equal(Precision(model, "fp32")(x).softmax(-1), ref)


def test_set_tta_reaches_the_model_and_its_bf16_copy() -> None:
    model = _small_classifier("none")
    fast = Precision(model, "bf16")
    fast.set_tta("flip")
    assert model.config.tta == "flip" and fast._cast.config.tta == "flip"
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():  # flip TTA is invariant to mirroring the input
        assert torch.allclose(fast(x), fast(x.flip(-1)), atol=1e-2)


def test_auto_resolves_to_what_the_processor_computes_natively(monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert native_bf16() and resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not native_bf16() and resolve_precision("auto") == "fp32"
    assert resolve_precision("bf16") == "bf16" and resolve_precision("fp32") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16")
