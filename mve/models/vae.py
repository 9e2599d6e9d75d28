"""Stable-Diffusion-style convolutional VAE (LDM ``AutoencoderKL``), scaled down for CIFAR.

Images live in model space ``[-1, 1]`` (``x / 127.5 - 1``); one 8-bit pixel bin is ``2/255`` wide.
Losses are in nats per image (summed over the ``C*H*W`` pixel dims or the latent dims, then averaged
over the batch); ``elbo_bpd`` converts the beta=1 negative ELBO to bits per dimension.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mve.prior import GaussianMixture

logger = logging.getLogger(__name__)

LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the posterior log-variance, as LDM
LOG_SCALE_RANGE = (-7.0, 2.0)  # clamp of the decoder's learned per-channel log std
MSE_SIGMA = 0.1  # fixed decoder std (model space) of the "mse" likelihood
L1_SCALE = 0.1  # fixed Laplace scale (model space) of the "l1" likelihood
_HALF_BIN = 1.0 / 255.0  # half of the 2/255 bin width
_LIKELIHOODS = ("discretized_gaussian", "mse", "l1")
_PRIORS = ("standard", "gmm")

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
    perceptual_classifier: str | None = None  # mve classifier checkpoint for perceptual features
    perceptual_layers: int = 3  # first N classifier stages whose activations are compared
    prior: str = "standard"  # what sample() draws from: "standard" N(0, I) or a fitted "gmm"
    prior_components: int = 0  # GMM components whose buffers the model carries (0: none)

    def __post_init__(self) -> None:
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
        _require(self.likelihood in _LIKELIHOODS,
                 f"likelihood must be one of {_LIKELIHOODS}, got {self.likelihood!r}")
        beta = self.beta
        ok = isinstance(beta, int | float) and not isinstance(beta, bool) and math.isfinite(beta)
        _require(ok and beta >= 0, f"beta must be a finite number >= 0, got {beta!r}")
        for name in ("kl_anneal", "free_bits", "perceptual_weight"):
            v = getattr(self, name)
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            _require(ok and v >= 0, f"{name} must be a finite number >= 0, got {v!r}")
        _require(self.kl_anneal <= 1, f"kl_anneal is a fraction of training, got {self.kl_anneal}")
        _require(self.perceptual_weight == 0 or bool(self.perceptual_classifier),
                 "perceptual_weight > 0 needs perceptual_classifier (a classifier checkpoint)")
        _require(_is_int(self.perceptual_layers) and self.perceptual_layers >= 1,
                 f"perceptual_layers must be a positive int, got {self.perceptual_layers!r}")
        _require(self.prior in _PRIORS, f"prior must be one of {_PRIORS}, got {self.prior!r}")
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


class VAEOutput(NamedTuple):
    recon: Tensor  # [B, C, H, W] decoded mean (model space, unbounded)
    mu: Tensor  # [B, L, h, w]
    logvar: Tensor  # [B, L, h, w]
    z: Tensor  # [B, L, h, w] sampled in training mode, == mu in eval mode


def to_pixels(x: Tensor) -> Tensor:
    """Model space ``[-1, 1]`` -> uint8 ``[0, 255]`` (clamp + round)."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def kl_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """Analytic ``KL(N(mu, exp(logvar)) || N(0, I))`` in nats, summed over all but dim 0 -> [B]."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise log-probability (nats) of 8-bit data under a discretised Gaussian.

    As DDPM's ``discretized_gaussian_log_likelihood`` (Ho et al. 2020): ``x`` lies on the 256-level
    grid in ``[-1, 1]``, each bin is ``2/255`` wide and the edge bins take the tails. Bin masses are
    computed stably in log space (``log_ndtr``), so far-tail bins stay finite and exact.

    Args:
        x: data in ``[-1, 1]``; mean, log_scale: broadcastable to ``x`` (log std in model space).
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + _HALF_BIN)  # standardised bin edges
    lower = inv_std * (x - mean - _HALF_BIN)
    # Mirror bins above the mean so both edges sit at or below it, where log_ndtr is accurate.
    flip = (upper + lower) > 0
    a = torch.where(flip, -upper, lower)
    b = torch.where(flip, -lower, upper)
    log_b = torch.special.log_ndtr(b)
    gap = (torch.special.log_ndtr(a) - log_b).clamp(max=0.0)
    log_mid = log_b + torch.log((-torch.expm1(gap)).clamp(min=1e-30))
    log_left = torch.special.log_ndtr(upper)  # bin 0 takes (-inf, upper]
    log_right = torch.special.log_ndtr(-lower)  # bin 255 takes [lower, inf)
    return torch.where(x < -0.999, log_left, torch.where(x > 0.999, log_right, log_mid))


def _randn(shape: tuple[int, ...], seed: int | None) -> Tensor:
    """Standard-normal CPU noise; seeded draws are identical on every device."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(shape, generator=gen)


def _check_draws(n: int, temperature: float) -> None:
    if n < 1 or temperature < 0:
        raise ValueError(f"need n >= 1 and temperature >= 0, got n={n}, temperature={temperature}")


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv x2 with a 1x1 shortcut when channels change (LDM, no time embedding)."""

    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection (LDM ``AttnBlock``)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        return x + self.proj_out(h.squeeze(1).transpose(1, 2).reshape(b, c, hh, ww))


def _downsample(c: int) -> nn.Module:
    """Stride-2 3x3 conv with LDM's asymmetric (0, 1, 0, 1) padding."""
    return nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, c, 3, stride=2))


def _upsample(c: int) -> nn.Module:
    """Nearest-neighbour x2 followed by a 3x3 conv."""
    return nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(c, c, 3, padding=1))


def _mid_block(c: int, cfg: VAEConfig) -> nn.Sequential:
    attn = AttnBlock(c, cfg.groups) if cfg.attention else nn.Identity()
    return nn.Sequential(ResnetBlock(c, c, cfg.groups, cfg.dropout), attn,
                         ResnetBlock(c, c, cfg.groups, cfg.dropout))


class Encoder(nn.Module):
    """Image [B, C, H, W] -> moments [B, 2L, H/f, W/f]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        layers: list[nn.Module] = []
        c = chans[0]
        for i, c_out in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResnetBlock(c, c_out, cfg.groups, cfg.dropout))
                c = c_out
            if i != len(chans) - 1:
                layers.append(_downsample(c))
        self.down = nn.Sequential(*layers)
        self.mid = _mid_block(c, cfg)
        self.norm_out = _norm(c, cfg.groups)
        self.conv_out = nn.Conv2d(c, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, L, h, w] -> mean image [B, C, h*f, w*f]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans = cfg.channels
        c = chans[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, c, 3, padding=1)
        self.mid = _mid_block(c, cfg)
        layers: list[nn.Module] = []
        for i in reversed(range(len(chans))):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResnetBlock(c, chans[i], cfg.groups, cfg.dropout))
                c = chans[i]
            if i != 0:
                layers.append(_upsample(c))
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(c, cfg.groups)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)
        with torch.no_grad():  # near-zero initial reconstructions, gradients still flow
            self.conv_out.weight.mul_(1e-2)
            self.conv_out.bias.zero_()

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    """Conv VAE: diagonal-Gaussian spatial latent, discretised-Gaussian decoder (LDM-style)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # Learned per-channel log std (model space) of the decoder's discretised Gaussian.
        self.log_scale = nn.Parameter(torch.full((config.in_channels,), math.log(0.1)))
        # Second-stage prior over the flattened latent (buffers only; see mve.prior).
        self.latent_prior: GaussianMixture | None = (
            GaussianMixture(config.prior_components, config.latent_dim)
            if config.prior_components else None)
        self._progress = 1.0  # fraction of training done; set by the trainer for KL annealing
        n_params = sum(p.numel() for p in self.parameters())
        logger.info("VAE plan: %d levels, channels %s, latent %s (f=%d), attention=%s, "
                    "likelihood=%s, %.2fM params", config.num_levels, list(config.channels),
                    config.latent_shape, config.downsample_factor, config.attention,
                    config.likelihood, n_params / 1e6)

    # -- training objective levers ---------------------------------------------------------

    def set_train_progress(self, fraction: float) -> None:
        """Called by the trainer before every step with ``global step / total steps``."""
        self._progress = min(max(float(fraction), 0.0), 1.0)

    @property
    def kl_weight(self) -> float:
        """The KL weight of the training loss now: ``beta``, ramped up over ``kl_anneal``."""
        cfg = self.config
        if cfg.kl_anneal <= 0:
            return cfg.beta
        return cfg.beta * min(1.0, self._progress / cfg.kl_anneal)

    def _perceptual_net(self, device: torch.device) -> _FeatureTaps:
        """The frozen classifier, loaded once; kept out of ``state_dict`` and ``parameters``."""
        taps = self.__dict__.get("_perceptual")
        if taps is None:
            from mve.checkpoint import load_checkpoint  # mve.checkpoint imports mve.models

            ckpt = load_checkpoint(self.config.perceptual_classifier, device=device)
            taps = _FeatureTaps(ckpt.model, ckpt.preprocessing, self.config.perceptual_layers)
            self.__dict__["_perceptual"] = taps
        return taps.to(device)

    def perceptual_distance(self, x: Tensor, recon: Tensor) -> Tensor:
        """LPIPS-like distance [B] on the frozen classifier's first stages (no learned weights):
        channel-normalised activations, squared differences summed over channels, averaged over
        positions, summed over stages."""
        taps = self._perceptual_net(x.device)
        with torch.no_grad():
            fx = taps(x)
        return sum(((a - b).pow(2).sum(1).mean((1, 2)) for a, b in zip(fx, taps(recon),
                                                                        strict=True)),
                   start=x.new_zeros(len(x)))

    # -- latent prior -----------------------------------------------------------------------

    def set_latent_prior(self, weights: Tensor, means: Tensor, chol: Tensor) -> None:
        """Installs a fitted GMM (weights [K], means [K, D], Cholesky [K, D, D]) and switches
        ``config`` to ``prior="gmm", prior_components=K``."""
        k = int(means.shape[0])
        if self.latent_prior is None or self.latent_prior.components != k:
            self.latent_prior = GaussianMixture(k, self.config.latent_dim).to(self.log_scale.device)
        self.latent_prior.set(weights, means, chol)
        self.config = dataclasses.replace(self.config, prior="gmm", prior_components=k)

    def _check_input(self, x: Tensor) -> None:
        f = self.config.downsample_factor
        c = self.config.in_channels
        if x.ndim != 4 or x.shape[1] != c or x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"expected images [B, {c}, H, W] with H, W "
                             f"divisible by {f}, got {tuple(x.shape)}")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B, C, H, W] in [-1, 1] -> (mu, logvar), each [B, L, H/f, W/f]."""
        self._check_input(x)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        """Latent [B, L, h, w] -> decoded mean image [B, C, h*f, w*f] (unbounded)."""
        return self.decoder(z)

    def forward(self, x: Tensor) -> VAEOutput:
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu
        return VAEOutput(self.decode(z), mu, logvar, z)

    def reconstruct(self, x: Tensor, *, sample: bool = False) -> Tensor:
        """Decode the posterior mean (or a posterior sample) of ``x`` [B, C, H, W]."""
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if sample else mu
        return self.decode(z)

    @torch.no_grad()
    def sample(self, n: int, *, temperature: float = 1.0, seed: int | None = None,
               device: torch.device | str | None = None, prior: str | None = None) -> Tensor:
        """Decode ``n`` prior draws -> [n, C, H, W] (eval mode, seedable).

        ``prior`` (default ``config.prior``): ``"standard"`` draws ``z ~ N(0, T^2 I)``; ``"gmm"``
        draws from the fitted mixture with each component's spread scaled by ``T``.
        """
        _check_draws(n, temperature)
        prior = prior or self.config.prior
        if prior not in _PRIORS:
            raise ValueError(f"prior must be one of {_PRIORS}, got {prior!r}")
        if prior == "gmm":
            if self.latent_prior is None or not self.latent_prior.is_fitted:
                raise ValueError("this VAE has no fitted GMM prior; fit one with "
                                 "`mve vae fit-prior CHECKPOINT --data PATH`")
            z = self.latent_prior.sample(n, temperature=temperature, seed=seed)
            z = z.view(n, *self.config.latent_shape)
        else:
            z = temperature * _randn((n, *self.config.latent_shape), seed)
        z = z.to(device=device or self.log_scale.device, dtype=self.log_scale.dtype)
        with _eval_mode(self):
            return self.decode(z)

    def _single(self, image: Tensor) -> Tensor:
        x = image.unsqueeze(0) if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[0] != 1:
            raise ValueError(f"expected one image [C, H, W] or [1, C, H, W], got {tuple(x.shape)}")
        return x.to(self.log_scale)

    @torch.no_grad()
    def variations(self, image: Tensor, n: int, *, temperature: float = 1.0,
                   seed: int | None = None) -> Tensor:
        """``n`` decodes of ``z = mu + T * sigma * eps`` around the posterior of one image.

        Returns [n, C, H, W]; ``temperature=0`` gives ``n`` copies of ``reconstruct(image)``.
        """
        _check_draws(n, temperature)
        with _eval_mode(self):
            mu, logvar = self.encode(self._single(image))  # [1, L, h, w]
            eps = _randn((n, *mu.shape[1:]), seed).to(mu)
            z = mu + temperature * torch.exp(0.5 * logvar) * eps
            return self.decode(z)

    @torch.no_grad()
    def interpolate(self, a: Tensor, b: Tensor, steps: int, *, method: str = "slerp") -> Tensor:
        """Decode ``steps`` latents between the posterior means of images ``a`` and ``b``.

        Returns [steps, C, H, W]; the first/last equal ``reconstruct(a)``/``reconstruct(b)``.
        ``method`` is ``"lerp"`` or ``"slerp"`` (spherical, over the flattened latent).
        """
        if steps < 2 or method not in ("lerp", "slerp"):
            raise ValueError(f"need steps >= 2 and method 'lerp'|'slerp', got {steps}, {method!r}")
        with _eval_mode(self):
            za, _ = self.encode(self._single(a))
            zb, _ = self.encode(self._single(b))
            t = torch.linspace(0.0, 1.0, steps, device=za.device, dtype=za.dtype).view(-1, 1, 1, 1)
            wa, wb = 1.0 - t, t
            if method == "slerp":
                ua, ub = F.normalize(za.flatten(), dim=0), F.normalize(zb.flatten(), dim=0)
                omega = torch.arccos((ua @ ub).clamp(-1.0, 1.0))
                sin = torch.sin(omega)
                if sin > 1e-6:  # otherwise (near-)parallel: lerp is exact enough
                    wa, wb = torch.sin(wa * omega) / sin, torch.sin(wb * omega) / sin
            z = wa * za + wb * zb  # [steps, L, h, w]
            z[0], z[-1] = za[0], zb[0]
            return self.decode(z)

    def loss(self, x: Tensor, out: VAEOutput | None = None) -> dict[str, Tensor]:
        """Negative ELBO and metrics for a batch ``x`` [B, C, H, W] on the 8-bit grid in [-1, 1].

        Units: nats per image (summed over dims, averaged over the batch). ``loss = recon_nll +
        beta * kl`` is the only entry with a graph; the others are detached metrics.

        * ``discretized_gaussian``: ``recon_nll = -log p(x|z)`` under the discretised Gaussian
          with the learned ``log_scale``.
        * ``mse``: ``recon_nll = sum((x - recon)^2) / (2 * MSE_SIGMA^2)``, a fixed-variance Gaussian
          NLL without its constant. ``log_scale`` is still fitted (by maximum likelihood against the
          detached decoder mean, through a zero-valued term) so ``elbo_bpd`` stays a real bound.
        * ``elbo_bpd``: ``(discretised NLL + KL) / (C*H*W * ln 2)`` with beta = 1, an upper bound on
          the NLL in bits/dim; ``mse``: mean squared error in [0, 1] pixel units (clamped recon).
        """
        if out is None:
            out = self(x)
        cfg = self.config
        fixed = cfg.likelihood != "discretized_gaussian"
        log_scale = self.log_scale.clamp(*LOG_SCALE_RANGE).view(1, -1, 1, 1)
        x, recon_mean = x.float(), out.recon.float()  # likelihood math in fp32 under autocast
        mean = recon_mean.detach() if fixed else recon_mean
        nll = -discretized_gaussian_log_likelihood(x, mean, log_scale).flatten(1).sum(1)  # [B]
        mu, logvar = out.mu.float(), out.logvar.float()
        kl_el = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)  # [B, L, h, w]
        kl = kl_el.flatten(1).sum(1)  # [B]
        fit_scale = nll - nll.detach()  # value 0; fits log_scale by ML so elbo_bpd stays a bound
        if cfg.likelihood == "mse":
            recon = (x - recon_mean).pow(2).flatten(1).sum(1) / (2 * MSE_SIGMA**2) + fit_scale
        elif cfg.likelihood == "l1":
            recon = (x - recon_mean).abs().flatten(1).sum(1) / L1_SCALE + fit_scale
        else:
            recon = nll
        dims = x[0].numel()
        terms: dict[str, Tensor] = {}
        if cfg.perceptual_weight > 0 and self.training and torch.is_grad_enabled():
            # Counted like a per-pixel squared error of the "mse" likelihood.
            p = self.perceptual_distance(x, out.recon)
            recon = recon + cfg.perceptual_weight * dims * p.float() / (2 * MSE_SIGMA**2)
            terms["perceptual"] = p.detach().mean()
        if cfg.free_bits > 0:  # per latent channel, averaged over batch and positions
            per_channel = kl_el.mean(dim=(0, 2, 3)).clamp(min=cfg.free_bits)
            kl_term = per_channel.sum() * (kl_el[0, 0].numel())
        else:
            kl_term = kl.mean()
        kl_w = self.kl_weight
        total = recon.mean() + kl_w * kl_term
        pix_err = (recon_mean.detach().clamp(-1.0, 1.0) - x) / 2.0  # [0, 1] pixel units
        if self.training:
            terms["kl_weight"] = torch.tensor(kl_w)
        return {
            "loss": total,
            "recon_nll": recon.detach().mean(),
            "kl": kl.detach().mean(),
            "elbo_bpd": (nll + kl).detach().mean() / (dims * math.log(2.0)),
            "mse": pix_err.pow(2).mean(),
            **terms,
        }


class _FeatureTaps(nn.Module):
    """Activations of the first ``n`` stages of a frozen mve classifier, for a perceptual loss.

    Input: images in VAE model space ``[-1, 1]``; they are mapped to the classifier's own
    normalisation. A stage ends at each activation module (plain stacks) or residual stage.
    """

    def __init__(self, classifier: nn.Module, preprocessing: dict[str, Any], n: int) -> None:
        super().__init__()
        classifier.eval().requires_grad_(False)
        self.layers = list(classifier.encoder.layers.children())
        acts = (nn.Mish, nn.ReLU, nn.GELU, nn.SiLU)
        ends = [i for i, m in enumerate(self.layers)
                if isinstance(m, acts) or type(m).__name__ == "ResidualStage"]
        if not ends:
            raise ValueError("perceptual_classifier has no activation stages to tap")
        self.ends = ends[:n]
        self.net = classifier
        self.register_buffer("mean", torch.tensor(preprocessing["mean"]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing["std"]).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> list[Tensor]:
        h = ((x + 1.0) / 2.0 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        feats = []
        for i, layer in enumerate(self.layers[: self.ends[-1] + 1]):
            h = layer(h)
            if i in self.ends:
                feats.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return feats
