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
``num_classes``. The ``seed`` preset reproduces the note exactly (875,592 parameters). The
config, its ``Plan`` and the presets live in ``mve.models.classifier_config``.

Unlike the note, ``forward`` returns logits: the note put a Softmax inside the model
and trained it with cross-entropy, which applies softmax twice. Use ``predict_proba``
for inference-time probabilities.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from mve.models.classifier_config import (
    PRESETS,
    TTA,
    TTA_MODES,
    Activation,
    Arch,
    ClassifierConfig,
    Plan,
    Pooling,
)

__all__ = [
    "Classifier", "ClassifierConfig", "Plan", "PRESETS", "Activation", "Pooling", "Arch", "TTA",
    "TTA_MODES", "FractionalMaxPool2d", "ResidualStage", "Encoder", "ConvGroupNet",
    "TTA_MAX_BATCH", "tta_logits",
]

logger = logging.getLogger(__name__)


_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "mish": nn.Mish,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


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
        ends: list[int] = []
        for c_in, c_out, size in zip(plan.channels[:-1], plan.channels[1:], plan.sizes, strict=True):
            if cfg.residual:
                layers.append(ResidualStage(c_in, c_out, size, cfg))
            else:
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), act(),
                           _pool(cfg.pooling, size)]
            ends.append(len(layers) - 1)
        # One flat Sequential keeps the checkpoints' parameter names; the stage boundaries are
        # recorded here rather than guessed from layer types later.
        self.layers = nn.Sequential(*layers)
        self.stage_ends = tuple(ends)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def feature_maps(self, x: torch.Tensor, stages: int | None = None) -> list[torch.Tensor]:
        """The output of each stage (after its pool), or of the first ``stages`` only."""
        ends = self.stage_ends[:stages]
        feats: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers[: ends[-1] + 1]):
            x = layer(x)
            if i in ends:
                feats.append(x)
        return feats


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

    def feature_maps(self, x: torch.Tensor, stages: int | None = None) -> list[torch.Tensor]:
        """Intermediate feature maps of one view, highest resolution first, for every ``arch``.

        ``x`` is a normalised batch [B, C, H, W] (as ``forward`` takes); returns one
        [B, C_i, H_i, W_i] tensor per stage: ``geometric``, the output of each conv stage (after
        its pool; a whole ``ResidualStage`` when ``residual``); ``convgroups``, the output of
        each conv group (the whitening stem is not a stage). ``stages`` keeps the first ``n``
        and skips computing the deeper ones. This is the public surface for perceptual losses
        and feature probes: callers need not know the layer layout.
        """
        if stages is not None and stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        if self.config.arch == "convgroups":
            return self.body.feature_maps(x, stages)
        return self.encoder.feature_maps(x, stages)

    def whitening_bias(self) -> nn.Parameter | None:
        """The whitening layer's bias (``convgroups`` with whitening), which a recipe may stop
        training after a few epochs (``TrainConfig.whiten_bias_epochs``); else None."""
        whiten = getattr(self.body, "whiten", None) if self.config.arch == "convgroups" else None
        return whiten.bias if whiten is not None else None

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

    def feature_maps(self, x: torch.Tensor, stages: int | None = None) -> list[torch.Tensor]:
        """The output of each conv group (or of the first ``stages``)."""
        x, feats = self._stem(x), []
        for g in list(self.groups)[:stages]:
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


