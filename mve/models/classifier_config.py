"""The classifier family's typed config, its derived geometry (``Plan``) and its presets.

The geometric plan is derived from four numbers: channels grow geometrically from
``starting_channels`` to ``final_channels`` over ``cnn_layers`` stages, spatial sizes shrink
geometrically from ``input_size`` to ``final_size`` through FractionalMaxPool2d, and the
fully-connected head narrows geometrically from the flattened features to ``num_classes``.
Kept apart from the networks (``mve.models.classifier``), which read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator

__all__ = ["Activation", "Pooling", "Arch", "TTA", "TTA_MODES",
           "ClassifierConfig", "Plan", "PRESETS"]

Activation = Literal["mish", "relu", "gelu", "silu"]
Pooling = Literal["fractional", "max", "avg"]
Arch = Literal["geometric", "convgroups"]
TTA = Literal["none", "flip", "flip_translate"]
TTA_MODES: tuple[str, ...] = get_args(TTA)  # eval-time views: 1, 2, 6


def parse_widths(value: Any) -> Any:
    """``"64,176,176"`` or ``"64x176x176"`` -> ``(64, 176, 176)``: a search space's choices
    and ``--set`` values are scalars, and a width triple is one architecture."""
    if isinstance(value, str):
        return tuple(int(w) for w in value.replace("x", ",").split(",") if w.strip())
    return value


Widths = Annotated[tuple[int, ...], BeforeValidator(parse_widths)]


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
    # Architecture family and the conv-group ("convgroups") net's options.
    arch: Arch = "geometric"
    widths: Widths = (64, 176, 176)  # convgroups: output channels of each group
    convs_per_group: int = 2  # convgroups: 2, or 3 = a residual over the last two convs
    whiten_kernel: int = 2  # convgroups: patch-whitening kernel size; 0 disables the layer
    whiten_eps: float = 5e-4  # added to the patch-covariance eigenvalues
    dirac_init: bool = True  # convgroups: identity init of the first c_in filters of each conv
    bn_momentum: float = 0.4  # convgroups: PyTorch BatchNorm momentum
    freeze_bn_weight: bool = True  # convgroups: BatchNorm scale fixed at 1 (bias still learned)
    logit_scale: float = 1 / 9  # convgroups: multiplies the logits
    tta: TTA = "none"  # eval-mode test-time augmentation, both architectures

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(c) for c in parse_widths(self.widths)))
        if self.arch == "convgroups":
            self._check_convgroups()
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
            if len(self.channels) != self.cnn_layers:
                raise ValueError(
                    f"channels has {len(self.channels)} entries but cnn_layers={self.cnn_layers}"
                )
        self._check_common()
        self._check_plan()

    def _check_convgroups(self) -> None:
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be positive ints, got {self.widths}")
        if self.convs_per_group not in (2, 3):
            raise ValueError(f"convs_per_group must be 2 or 3, got {self.convs_per_group}")
        if self.whiten_kernel not in (0, 2, 3):
            raise ValueError(f"whiten_kernel must be 0, 2 or 3, got {self.whiten_kernel}")
        size = self.input_size - (self.whiten_kernel - 1 if self.whiten_kernel else 0)
        for _ in self.widths:
            size //= 2
        if size < 1:
            raise ValueError(f"input_size={self.input_size} is too small for "
                             f"{len(self.widths)} conv groups")
        if not 0 < self.bn_momentum <= 1:
            raise ValueError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}")
        if self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale}")

    def _check_common(self) -> None:
        for name in ("starting_channels", "final_channels", "cnn_layers", "fcn_layers",
                     "input_size", "in_channels", "num_classes", "final_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.final_size > self.input_size:
            raise ValueError(f"final_size={self.final_size} exceeds input_size={self.input_size}")
        if self.activation not in get_args(Activation):
            raise ValueError(f"activation must be one of {sorted(get_args(Activation))}, "
                             f"got {self.activation!r}")
        if self.pooling not in get_args(Pooling):
            raise ValueError(f"pooling must be fractional, max or avg, got {self.pooling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def _check_plan(self) -> None:
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


# Presets are architecture overrides; the training recipe lives in mve.config presets.
PRESETS: dict[str, dict] = {
    "seed": dict(starting_channels=46, final_channels=210, cnn_layers=6, fcn_layers=4,
                 input_size=32, in_channels=3, num_classes=10),
    # airbench94's net shrunk under 1M parameters (widths 64/256/256 -> 64/176/176): 991,672.
    "convgroups": dict(arch="convgroups", widths=(64, 176, 176), convs_per_group=2,
                       whiten_kernel=2, activation="gelu", tta="flip_translate"),
}
# airbench96's third conv per group, at widths that keep the net under 1M parameters (970,824):
# the deeper arm of the issue-14 recipe comparison (bench/device/recipes14.py).
PRESETS["convgroups-res3"] = {**PRESETS["convgroups"], "widths": (56, 128, 144),
                              "convs_per_group": 3}
