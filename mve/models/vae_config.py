"""The VAE's typed config and presets: architecture and training objective, validated on build.

Kept apart from the model (``mve.models.vae``) and its networks (``mve.models.vae_nets``), which
both read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["VAEConfig", "PRESETS", "LIKELIHOODS", "PRIORS"]

LIKELIHOODS = ("discretized_gaussian", "mse", "l1")
PRIORS = ("standard", "gmm")

PRESETS: dict[str, dict[str, Any]] = {
    # ~2.7M params at 32x32 (channels 32/64/128, latent 8x8x8); ~0.85 s fwd+bwd, batch 64, 2 CPUs.
    "default": {"base_channels": 32, "channel_mult": None, "groups": 16, "latent_channels": 8,
                "downsample_factor": 4, "attention": True, "likelihood": "discretized_gaussian"},
    "tiny": {"base_channels": 16, "groups": 8, "latent_channels": 4, "attention": False},
    # Autoencoder-like objective (as SD's KL-f4): latent 8x8x4, MSE pixel loss, a small KL weight
    # warmed up over the first 10% of training; ~2.1M params (8.5 MB fp32). A GMM prior fitted
    # after training (`mve vae fit-prior`) adds ~1.3 MB for 10 components.
    "sd": {"base_channels": 48, "channel_mult": (1, 2, 2), "groups": 16, "latent_channels": 4,
           "downsample_factor": 4, "attention": True, "likelihood": "mse", "beta": 0.01,
           "kl_anneal": 0.1, "free_bits": 0.0},
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(f"VAEConfig: {msg}")


@dataclass(frozen=True)
class VAEConfig:
    """Architecture and objective of :class:`VAE` (validated on construction)."""

    in_channels: int = 3
    input_size: int = 32
    latent_channels: int = 8
    downsample_factor: int = 4  # power of two; latent is input_size/f square
    base_channels: int = 32
    channel_mult: tuple[int, ...] | None = None  # len == log2(f)+1; None -> (1, 2, 4, 4, ...)
    num_res_blocks: int = 1
    attention: bool = True  # single-head self-attention in the mid blocks
    dropout: float = 0.0
    groups: int = 16  # GroupNorm groups; must divide every channel count
    likelihood: str = "discretized_gaussian"  # training pixel loss: also "mse" or "l1"
    beta: float = 1.0  # KL weight relative to the pixel loss (the reported ELBO always uses 1)
    kl_anneal: float = 0.0  # fraction of training over which the KL weight ramps from 0 to beta
    free_bits: float = 0.0  # nats per latent element: per-channel KL below this is not penalised
    perceptual_weight: float = 0.0  # weight of the classifier-feature loss (0: off)
    # An mve classifier checkpoint whose feature maps the perceptual loss compares; the trainer
    # loads it (mve.perceptual) and hands it to the model, which does no I/O.
    perceptual_classifier: str | None = None
    perceptual_layers: int = 3  # first N classifier feature maps (stages) that are compared
    prior: str = "standard"  # what sample() draws from: "standard" N(0, I) or a fitted "gmm"
    prior_components: int = 0  # GMM components whose buffers the model carries (0: none)

    def __post_init__(self) -> None:
        self._check_architecture()
        self._check_objective()

    def _check_architecture(self) -> None:
        for name in ("in_channels", "input_size", "latent_channels", "downsample_factor",
                     "base_channels", "num_res_blocks", "groups"):
            v = getattr(self, name)
            _require(_is_int(v) and v >= 1, f"{name} must be a positive int, got {v!r}")
        f, mult = self.downsample_factor, self.channel_mult
        _require(f & (f - 1) == 0, f"downsample_factor must be a power of two, got {f}")
        _require(self.input_size % f == 0,
                 f"input_size={self.input_size} is not divisible by downsample_factor={f}")
        if mult is not None:
            _require(not isinstance(mult, str | bytes) and hasattr(mult, "__iter__"),
                     f"channel_mult must be a sequence of ints, got {mult!r}")
            mult = tuple(mult)
            object.__setattr__(self, "channel_mult", mult)  # list (YAML/JSON) -> tuple
            _require(len(mult) == self.num_levels, f"channel_mult needs log2(downsample_factor)+1"
                     f" = {self.num_levels} entries, got {len(mult)}: {mult}")
            _require(all(_is_int(m) and m >= 1 for m in mult),
                     f"channel_mult entries must be positive ints, got {mult}")
        _require(isinstance(self.attention, bool), f"attention must be a bool: {self.attention!r}")
        _require(isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0,
                 f"dropout must be in [0, 1), got {self.dropout!r}")
        bad = [c for c in self.channels if c % self.groups]
        _require(not bad, f"groups={self.groups} must divide every channel count {self.channels};"
                 f" it does not divide {bad}")

    def _check_objective(self) -> None:
        _require(self.likelihood in LIKELIHOODS,
                 f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        for name in ("beta", "kl_anneal", "free_bits", "perceptual_weight"):
            v = getattr(self, name)
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            _require(ok and v >= 0, f"{name} must be a finite number >= 0, got {v!r}")
        _require(self.kl_anneal <= 1, f"kl_anneal is a fraction of training, got {self.kl_anneal}")
        _require(self.perceptual_weight == 0 or bool(self.perceptual_classifier),
                 "perceptual_weight > 0 needs perceptual_classifier (a classifier checkpoint)")
        _require(_is_int(self.perceptual_layers) and self.perceptual_layers >= 1,
                 f"perceptual_layers must be a positive int, got {self.perceptual_layers!r}")
        _require(self.prior in PRIORS, f"prior must be one of {PRIORS}, got {self.prior!r}")
        k = self.prior_components
        _require(_is_int(k) and k >= 0, f"prior_components must be an int >= 0, got {k!r}")
        _require(self.prior != "gmm" or k >= 1,
                 "prior='gmm' needs prior_components >= 1 (fit one with `mve vae fit-prior`)")

    @property
    def num_levels(self) -> int:
        """Number of resolution levels, ``log2(downsample_factor) + 1``."""
        return self.downsample_factor.bit_length()

    @property
    def channels(self) -> tuple[int, ...]:
        """Feature channels per resolution level (highest resolution first)."""
        mult = self.channel_mult or tuple(min(2**i, 4) for i in range(self.num_levels))
        return tuple(self.base_channels * m for m in mult)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(latent_channels, h, w)`` of the spatial latent."""
        s = self.input_size // self.downsample_factor
        return (self.latent_channels, s, s)

    @property
    def latent_dim(self) -> int:
        """Number of values in one latent, ``L * h * w``."""
        c, h, w = self.latent_shape
        return c * h * w

