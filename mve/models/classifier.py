"""The CIFAR classifier family: the research note's geometric CNN and a fast conv-group net.

``arch="geometric"`` is the note's network (below); ``arch="convgroups"`` is an airbench-style
network (Jordan 2024, after Page 2018 and hlb-CIFAR10): a frozen 2x2 patch-whitening first
layer initialised from the training data, three groups of conv-pool-BN-GELU with identity
(dirac) init, BatchNorm with frozen unit weights, and a scaled linear head. Test-time
augmentation (``tta``) averages logits over mirrored and translated views in eval mode.

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
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import torch
from torch import nn

logger = logging.getLogger(__name__)

Activation = Literal["mish", "relu", "gelu", "silu"]
Pooling = Literal["fractional", "max", "avg"]
Arch = Literal["geometric", "convgroups"]
TTA = Literal["none", "flip", "flip_translate"]
TTA_MODES: tuple[str, ...] = get_args(TTA)  # eval-time views: 1, 2, 6

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
    # Architecture family and the conv-group ("convgroups") net's options.
    arch: Arch = "geometric"
    widths: tuple[int, ...] = (64, 176, 176)  # convgroups: output channels of each group
    convs_per_group: int = 2  # convgroups: 2, or 3 = a residual over the last two convs
    whiten_kernel: int = 2  # convgroups: patch-whitening kernel size; 0 disables the layer
    whiten_eps: float = 5e-4  # added to the patch-covariance eigenvalues
    dirac_init: bool = True  # convgroups: identity init of the first c_in filters of each conv
    bn_momentum: float = 0.4  # convgroups: PyTorch BatchNorm momentum
    freeze_bn_weight: bool = True  # convgroups: BatchNorm scale fixed at 1 (bias still learned)
    logit_scale: float = 1 / 9  # convgroups: multiplies the logits
    tta: TTA = "none"  # eval-mode test-time augmentation, both architectures

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(c) for c in self.widths))
        if self.arch == "convgroups":
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
        if self.tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")
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
    """``forward`` returns logits [B, num_classes] (averaged over TTA views in eval mode)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        if config.arch == "convgroups":
            self.plan = None
            self.body = ConvGroupNet(config)
            return
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

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """One view, no test-time augmentation."""
        if self.config.arch == "convgroups":
            return self.body(x)
        # (B, C, H, W) -> (B, C_last, 2, 2) -> (B, num_classes)
        return self.head(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.config.tta == "none":
            return self.logits(x)
        return tta_logits(self.logits, x, self.config.tta)

    def set_tta(self, mode: str) -> None:
        """Switches the eval-time TTA (per replica: accuracy vs speed); unknown mode: ValueError."""
        self.config = replace(self.config, tta=mode)  # frozen; __post_init__ checks the mode

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, D] (the head's input; one view), e.g. for FID-style metrics."""
        if self.config.arch == "convgroups":
            return self.body.embed(x)
        return self.head[:-1](self.encoder(x))

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activations after each stage/group, highest resolution first (perceptual losses)."""
        if self.config.arch == "convgroups":
            return self.body.feature_maps(x)
        feats = []
        for layer in self.encoder.layers:
            x = layer(x)
            if isinstance(layer, ResidualStage | FractionalMaxPool2d | nn.AdaptiveMaxPool2d
                          | nn.AdaptiveAvgPool2d):
                feats.append(x)
        return feats

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Data-dependent initialisation (the whitening layer) from normalised training images."""
        if self.config.arch == "convgroups":
            self.body.init_whitening(images)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities for inference output only."""
        return self.forward(x).softmax(dim=-1)


# Most images per TTA forward call. A small batch runs all its views in one call (1 image: one
# batch-6 forward, ~3x a batch-1 forward, not 6x); a big one in even chunks, as CPU time per
# image is least at ~32-96 per call (shipped net, 2 threads: 0.70 ms; 0.82 at 128, 1.0 at 256).
TTA_MAX_BATCH = 64


def tta_logits(fn, x: torch.Tensor, mode: str, max_batch: int = TTA_MAX_BATCH) -> torch.Tensor:
    """airbench's TTA: the mean of the logits of ``x`` and its mirror; ``flip_translate`` also
    averages (weight 1/2) the mirrored pairs of two 1-pixel translations (reflect padding). All
    views share ``ceil(views * B / max_batch)`` calls of ``fn``: exact if ``fn`` treats samples
    independently, as an eval-mode net does (BatchNorm uses its running statistics)."""
    if mode not in ("flip", "flip_translate"):
        raise ValueError(f"tta_logits mode must be 'flip' or 'flip_translate', got {mode!r}")
    views, weights = [x, x.flip(-1)], [0.5, 0.5]
    if mode == "flip_translate":
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        for s in (padded[..., :-2, :-2], padded[..., 2:, 2:]):
            views += [s, s.flip(-1)]
        weights = [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    batch = torch.cat(views)
    out = torch.cat([fn(c) for c in batch.tensor_split(max(1, -(-len(batch) // max_batch)))])
    return sum(a * o for a, o in zip(weights, out.unflatten(0, (len(views), len(x))), strict=True))


class DiracConv2d(nn.Conv2d):
    """3x3 conv without bias; optionally identity-initialised on its first ``c_in`` filters."""

    def __init__(self, c_in: int, c_out: int, dirac: bool):
        self._dirac = dirac
        super().__init__(c_in, c_out, 3, padding=1, bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self._dirac:
            w = self.weight.data
            nn.init.dirac_(w[:min(w.size(0), w.size(1))])


def _bn(c: int, cfg: ClassifierConfig) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c, momentum=cfg.bn_momentum, eps=1e-12)
    if cfg.freeze_bn_weight:
        bn.weight.requires_grad_(False)
    return bn


class ConvGroup(nn.Module):
    """conv -> maxpool 2 -> BN -> act -> conv -> BN -> act [-> conv -> BN -> act, + residual]."""

    def __init__(self, c_in: int, c_out: int, cfg: ClassifierConfig):
        super().__init__()
        act = _ACTIVATIONS[cfg.activation]
        self.conv1, self.pool, self.norm1 = DiracConv2d(c_in, c_out, cfg.dirac_init), \
            nn.MaxPool2d(2), _bn(c_out, cfg)
        self.conv2, self.norm2 = DiracConv2d(c_out, c_out, cfg.dirac_init), _bn(c_out, cfg)
        self.residual = cfg.convs_per_group == 3
        if self.residual:
            self.conv3, self.norm3 = DiracConv2d(c_out, c_out, cfg.dirac_init), _bn(c_out, cfg)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        y = self.act(self.norm2(self.conv2(x)))
        if self.residual:
            y = self.act(self.norm3(self.conv3(y))) + x
        return y


class ConvGroupNet(nn.Module):
    """[whitening conv -> act] -> conv groups -> global max pool -> linear * logit_scale."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        act = _ACTIVATIONS[cfg.activation]
        c = cfg.in_channels
        k = cfg.whiten_kernel
        if k:
            width = 2 * c * k * k
            self.whiten = nn.Conv2d(c, width, k, padding=0, bias=True)
            self.whiten.weight.requires_grad_(False)  # set from the data, then frozen
            nn.init.zeros_(self.whiten.bias)
            self.whiten_act = act()
            c = width
        else:
            self.whiten = None
        groups = []
        for w in cfg.widths:
            groups.append(ConvGroup(c, w, cfg))
            c = w
        self.groups = nn.ModuleList(groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(c, cfg.num_classes, bias=False)

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor) -> None:
        """Sets the whitening filters to the patch covariance's eigenvectors scaled by
        ``1/sqrt(eigenvalue + eps)``, concatenated with their negations (airbench)."""
        if self.whiten is None:
            return
        w = self.whiten.weight
        k = w.shape[-1]
        x = images.to(device=w.device, dtype=torch.float64)
        c = x.shape[1]
        patches = x.unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, c, k, k)
        flat = patches.reshape(len(patches), -1)
        cov = flat.T @ flat / len(flat)
        eigval, eigvec = torch.linalg.eigh(cov)
        eigval, eigvec = eigval.flip(0), eigvec.T.flip(0).reshape(-1, c, k, k)
        scaled = eigvec / torch.sqrt(eigval.clamp_min(0) + self.cfg.whiten_eps).view(-1, 1, 1, 1)
        w.copy_(torch.cat([scaled, -scaled]).to(w.dtype))

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.whiten_act(self.whiten(x)) if self.whiten is not None else x

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, feats = self._stem(x), []
        for g in self.groups:
            x = g(x)
            feats.append(x)
        return feats

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem(x)
        for g in self.groups:
            x = g(x)
        return self.pool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x)) * self.cfg.logit_scale


# Presets are architecture overrides; the training recipe lives in mve.config presets.
PRESETS: dict[str, dict] = {
    "seed": dict(starting_channels=46, final_channels=210, cnn_layers=6, fcn_layers=4,
                 input_size=32, in_channels=3, num_classes=10),
    # airbench94's net shrunk under 1M parameters (widths 64/256/256 -> 64/176/176): 991,672.
    "convgroups": dict(arch="convgroups", widths=(64, 176, 176), convs_per_group=2,
                       whiten_kernel=2, activation="gelu", tta="flip_translate"),
}
