"""The geometric CNN classifier from the research note, plus options for the tuner.

The plan is derived from four numbers: channels grow geometrically from
``starting_channels`` to ``final_channels`` over ``cnn_layers`` stages, spatial sizes
shrink geometrically from ``input_size`` to 2 through FractionalMaxPool2d, and the
fully-connected head narrows geometrically from the flattened features to
``num_classes``. The ``seed`` preset reproduces the note exactly (875,592 parameters).

Unlike the note, ``forward`` returns logits: the note put a Softmax inside the model
and trained it with cross-entropy, which applies softmax twice. Use ``predict_proba``
for inference-time probabilities.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

Activation = Literal["mish", "relu", "gelu", "silu"]
Pooling = Literal["fractional", "max", "avg"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "mish": nn.Mish,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of :class:`Classifier`. Defaults are the note's tuned values."""

    starting_channels: int = 46
    final_channels: int = 210
    cnn_layers: int = 6
    fcn_layers: int = 4
    input_size: int = 32  # pixels, square
    in_channels: int = 3
    num_classes: int = 10
    # Options beyond the note (all off / equal to the note in the `seed` preset).
    channels: tuple[int, ...] | None = None  # explicit per-stage widths, overrides the geometry
    residual: bool = False  # second conv per stage with an identity/1x1 shortcut
    pooling: Pooling = "fractional"
    activation: Activation = "mish"
    dropout: float = 0.0  # before each hidden linear layer of the head
    final_size: int = 2  # spatial size after the last stage

    def __post_init__(self) -> None:
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
            if len(self.channels) != self.cnn_layers:
                raise ValueError(
                    f"channels has {len(self.channels)} entries but cnn_layers={self.cnn_layers}"
                )
        for name in ("starting_channels", "final_channels", "cnn_layers", "fcn_layers",
                     "input_size", "in_channels", "num_classes", "final_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.final_size > self.input_size:
            raise ValueError(f"final_size={self.final_size} exceeds input_size={self.input_size}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        if self.pooling not in ("fractional", "max", "avg"):
            raise ValueError(f"pooling must be fractional, max or avg, got {self.pooling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        sizes = self.plan().sizes
        if any(b >= a for a, b in zip((self.input_size, *sizes), sizes, strict=False)) and (
            self.pooling == "fractional"
        ):
            raise ValueError(
                f"input_size={self.input_size} cannot shrink strictly through {self.cnn_layers} "
                f"fractional pools to {self.final_size} (sizes {sizes}); use fewer cnn_layers"
            )

    def plan(self) -> Plan:
        return Plan.from_config(self)


@dataclass(frozen=True)
class Plan:
    """The derived geometry: what the note logged at construction."""

    upscale_ratio: float
    channels: list[int] = field(default_factory=list)  # including the input channels
    sizes: list[int] = field(default_factory=list)  # spatial size after each stage
    fcn: list[int] = field(default_factory=list)  # head widths, flattened features first

    @classmethod
    def from_config(cls, c: ClassifierConfig) -> Plan:
        n = c.cnn_layers
        ratio = (c.final_channels / c.starting_channels) ** (1 / (n - 1)) if n > 1 else 1.0
        widths = (list(c.channels) if c.channels is not None
                  else [round(c.starting_channels * ratio**i) for i in range(n)])
        shrink = (c.final_size / c.input_size) ** (1 / n)
        sizes = [max(c.final_size, round(c.input_size * shrink ** (i + 1))) for i in range(n)]
        flat = widths[-1] * sizes[-1] ** 2
        narrow = (c.num_classes / flat) ** (1 / c.fcn_layers)
        fcn = [round(flat * narrow**i) for i in range(c.fcn_layers)] + [c.num_classes]
        return cls(ratio, [c.in_channels, *widths], sizes, fcn)

    def log_lines(self) -> list[str]:
        return [
            f"Classifier channel upscale ratio: {self.upscale_ratio}",
            f"Layers = {len(self.sizes)}, downsampled_sizes = {self.sizes}, channels = {self.channels}",
            f"FCN layers: {self.fcn}",
        ]


class FractionalMaxPool2d(nn.FractionalMaxPool2d):
    """FractionalMaxPool2d that is deterministic in eval mode.

    PyTorch draws new pooling regions on every call, even in eval mode, so the same
    checkpoint would give different predictions run to run. In eval mode we pin the
    pseudo-random offsets to 0.5, the centre of their range.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        batched = x if x.dim() == 4 else x.unsqueeze(0)
        samples = torch.full((batched.shape[0], batched.shape[1], 2), 0.5,
                             dtype=x.dtype, device=x.device)
        out = nn.functional.fractional_max_pool2d(
            batched, self.kernel_size, self.output_size, self.output_ratio,
            self.return_indices, _random_samples=samples)
        return out if x.dim() == 4 else out.squeeze(0)


def _pool(kind: str, size: int) -> nn.Module:
    if kind == "fractional":
        return FractionalMaxPool2d(kernel_size=2, output_size=size)
    if kind == "max":
        return nn.AdaptiveMaxPool2d(size)
    return nn.AdaptiveAvgPool2d(size)


class ResidualStage(nn.Module):
    """conv-BN-act-conv-BN plus a (1x1 conv-BN) shortcut, then act and pool."""

    def __init__(self, c_in: int, c_out: int, size: int, cfg: ClassifierConfig):
        super().__init__()
        act = _ACTIVATIONS[cfg.activation]
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), act(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = (nn.Identity() if c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)))
        self.act = act()
        self.pool = _pool(cfg.pooling, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.body(x) + self.shortcut(x)))


class Encoder(nn.Module):
    """The convolutional stages: conv 3x3 -> BatchNorm -> activation -> pool."""

    def __init__(self, cfg: ClassifierConfig, plan: Plan):
        super().__init__()
        act = _ACTIVATIONS[cfg.activation]
        layers: list[nn.Module] = []
        for c_in, c_out, size in zip(plan.channels[:-1], plan.channels[1:], plan.sizes, strict=True):
            if cfg.residual:
                layers.append(ResidualStage(c_in, c_out, size, cfg))
            else:
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), act(),
                           _pool(cfg.pooling, size)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Classifier(nn.Module):
    """Geometric CNN + narrowing FCN head. ``forward`` returns logits [B, num_classes]."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        self.plan = config.plan()
        for line in self.plan.log_lines():
            logger.info(line)
        act = _ACTIVATIONS[config.activation]
        self.encoder = Encoder(config, self.plan)
        head: list[nn.Module] = [act(), nn.Flatten()]
        widths = self.plan.fcn
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            if config.dropout > 0:
                head.append(nn.Dropout(config.dropout))
            head.append(nn.Linear(w_in, w_out))
            if i < len(widths) - 2:
                head.append(act())
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C_last, 2, 2) -> (B, num_classes)
        return self.head(self.encoder(x))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities for inference output only."""
        return self.forward(x).softmax(dim=-1)


# Presets are architecture overrides; the training recipe lives in mve.config presets.
PRESETS: dict[str, dict] = {
    "seed": dict(starting_channels=46, final_channels=210, cnn_layers=6, fcn_layers=4,
                 input_size=32, in_channels=3, num_classes=10),
}
