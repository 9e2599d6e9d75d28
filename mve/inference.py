"""Getting a trained model ready to answer requests fast (pure PyTorch).

:func:`for_inference` puts a model in eval mode and, for a convolutional model on the CPU,
stores its weights in the channels-last memory format. oneDNN's CPU convolutions run much
faster on NHWC weights: the shipped classifier answers about 1.9x faster at batch 1-16 (2 threads,
6-view TTA 7.6 -> 5.4 ms for one image, 115 -> 54 ms for 16) and the VAE 1.1-1.3x, with the
same results up to float rounding (max difference ~1e-6). Inputs may stay NCHW-contiguous: the
first convolution produces channels-last activations and the rest follow. Training is
untouched: this only changes the layout of a copy that answers requests.

:class:`Precision` answers in bfloat16 where the processor multiplies bfloat16 natively
(AVX512-BF16 or AMX on x86, any CUDA GPU that supports it): a cast copy of the weights, fp32
in and out. On this project's 2-core EPYC the classifier's forward pass is 1.7x faster at batch
16-32 (one thread); on the 5,000 validation images its top-1 accuracy moves by at most a few
hundredths of a point (BENCHMARKS.md, "Serving in bfloat16"). Without native support bfloat16 is
emulated and slower, so ``auto`` keeps fp32 there.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["SERVING_TTA", "PRECISIONS", "Precision", "for_inference", "native_bf16",
           "resolve_precision", "top_k"]

#: The classifier's test-time augmentation when it answers requests (``mve serve``, ``mve
#: predict``, :func:`mve.load`): mirror only. It costs 2x the compute of none, where the
#: shipped checkpoint's own ``flip_translate`` costs 6x for a few tenths of a point
#: (BENCHMARKS.md, "Test-time augmentation"). ``serve_app/config.yaml`` holds the same value.
SERVING_TTA = "flip"


#: Serving precisions: ``auto`` is bf16 where :func:`native_bf16`, else fp32.
PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively (not emulated with fp32 instructions)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so guarded
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """``fp32`` or ``bf16`` for a requested precision (one of :data:`PRECISIONS`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


class Precision(nn.Module):
    """``model`` answering in ``precision``: fp32 is the model itself; bf16 is a cast copy
    (the original keeps its fp32 weights, so switching back loses nothing). Inputs and outputs
    stay float32 for the caller. ``set_tta`` reaches the model and its copy alike."""

    def __init__(self, model: nn.Module, precision: str = "fp32") -> None:
        super().__init__()
        self.precision = resolve_precision(precision)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.model = model
        cast = copy.deepcopy(model).to(self.dtype) if self.precision == "bf16" else model
        # Not registered as a submodule (nn.Module.__setattr__ would): the wrapper's state_dict
        # and .to() see the fp32 original only.
        object.__setattr__(self, "_cast", cast)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._cast is self.model:
            return self.model(x)
        return self._cast(x.to(self.dtype)).float()

    def set_tta(self, mode: str) -> None:
        self.model.set_tta(mode)
        if self._cast is not self.model:
            self._cast.set_tta(mode)


def for_inference(model: nn.Module) -> nn.Module:
    """``model`` in eval mode, in the memory format its device computes convolutions fastest in
    (channels-last on the CPU for a model with 2-D convolutions); returns the same object."""
    model.eval()
    convs = any(isinstance(m, nn.Conv2d | nn.ConvTranspose2d) for m in model.modules())
    params = next(model.parameters(), None)
    if convs and params is not None and params.device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def top_k(probs: np.ndarray, class_names: Sequence[str], k: int) -> list[dict[str, Any]]:
    """Per image: ``{"label", "probability", "top_k": [{"label", "index", "probability"}]}``
    for the ``k`` most probable classes of ``[N, K]`` probabilities, highest first (ties keep
    the class order). The server's ``/v1/classify`` answer and :meth:`mve.api.Classifier.predict`
    are both built from this."""
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    preds = []
    for row, idx in zip(probs.tolist(), order.tolist(), strict=True):
        top = [{"label": class_names[i], "index": i, "probability": row[i]} for i in idx]
        preds.append({"label": top[0]["label"], "probability": top[0]["probability"],
                      "top_k": top})
    return preds
