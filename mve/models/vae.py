"""Stable-Diffusion-style convolutional VAE (LDM ``AutoencoderKL``), scaled down for CIFAR.

Images live in model space ``[-1, 1]`` (``x / 127.5 - 1``); one 8-bit pixel bin is ``2/255`` wide.
Losses are in nats per image (summed over the ``C*H*W`` pixel dims or the latent dims, then averaged
over the batch); ``elbo_bpd`` converts the beta=1 negative ELBO to bits per dimension.

The model does no I/O: the optional perceptual loss compares feature maps of a frozen network
that the trainer builds (``mve.perceptual``) and injects with :meth:`VAE.set_perceptual`. The
config lives in ``mve.models.vae_config``, the encoder/decoder in ``mve.models.vae_nets``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mve.models.vae_config import PRESETS, PRIORS, VAEConfig
from mve.models.vae_nets import Decoder, Encoder
from mve.prior import GaussianMixture

SAMPLE_PRIORS = (*PRIORS, "diffusion")  # "diffusion": a trained LatentPrior, attached
DIFFUSION_STEPS = 16  # Heun steps (31 network calls) when the caller gives none

__all__ = [
    "VAE", "VAEConfig", "VAEOutput", "PRESETS", "Encoder", "Decoder", "to_pixels",
    "kl_standard_normal", "discretized_gaussian_log_likelihood", "FeatureNet",
]

logger = logging.getLogger(__name__)

LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the posterior log-variance, as LDM
LOG_SCALE_RANGE = (-7.0, 2.0)  # clamp of the decoder's learned per-channel log std
MSE_SIGMA = 0.1  # fixed decoder std (model space) of the "mse" likelihood
L1_SCALE = 0.1  # fixed Laplace scale (model space) of the "l1" likelihood
_HALF_BIN = 1.0 / 255.0  # half of the 2/255 bin width

# What the perceptual loss needs from its network: images [B, C, H, W] in model space [-1, 1]
# -> a list of feature maps [B, C_i, H_i, W_i] (mve.perceptual.FeatureExtractor is one).
FeatureNet = Callable[[Tensor], list[Tensor]]


class VAEOutput(NamedTuple):
    recon: Tensor  # [B, C, H, W] decoded mean (model space, unbounded)
    mu: Tensor  # [B, L, h, w]
    logvar: Tensor  # [B, L, h, w]
    z: Tensor  # [B, L, h, w] sampled in training mode, == mu in eval mode


def to_pixels(x: Tensor) -> Tensor:
    """Model space ``[-1, 1]`` -> uint8 ``[0, 255]`` (clamp + round)."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def kl_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """Analytic ``KL(N(mu, exp(logvar)) || N(0, I))`` in nats per latent element (same shape as
    ``mu``); ``.flatten(1).sum(1)`` gives the per-image KL [B]. The one KL of the VAE's loss."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def _unit_channels(h: Tensor) -> Tensor:
    """Feature maps scaled to unit L2 norm over channels at every position (as LPIPS)."""
    return h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


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
        self.set_perceptual(None)  # the perceptual loss's feature network, injected by the trainer
        self.set_diffusion_prior(None)  # a LatentPrior checkpoint found beside the VAE
        n_params = sum(p.numel() for p in self.parameters())
        logger.debug("VAE plan: %d levels, channels %s, latent %s (f=%d), attention=%s, "
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

    # -- perceptual loss (an injected collaborator) -------------------------------------------

    def set_perceptual(self, net: FeatureNet | None) -> None:
        """Hands the VAE the frozen feature network of its perceptual loss (``None`` removes it).

        ``mve.train.fit`` calls this with ``mve.perceptual.perceptual_network(...)`` whenever
        ``config.perceptual_weight > 0``. The network is a collaborator, not part of the model:
        it stays out of ``state_dict``, ``parameters()``, ``.train()`` and ``.to()`` (so build it
        on the VAE's device, and frozen).
        """
        self.__dict__["_perceptual"] = net

    def _perceptual_net(self) -> FeatureNet:
        net = self.__dict__.get("_perceptual")
        if net is None:
            raise RuntimeError(
                f"VAEConfig.perceptual_weight={self.config.perceptual_weight} asks for a "
                "perceptual loss but no perceptual network was injected: call "
                "vae.set_perceptual(mve.perceptual.perceptual_network("
                f"{self.config.perceptual_classifier!r}, device)) first (mve.train.fit does)")
        return net

    def perceptual_distance(self, x: Tensor, recon: Tensor) -> Tensor:
        """LPIPS-like distance [B] on the injected network's feature maps (no learned weights):
        channel-normalised activations, squared differences summed over channels, averaged over
        positions, summed over the maps."""
        net = self._perceptual_net()
        with torch.no_grad():
            fx = net(x)
        return sum(((_unit_channels(a) - _unit_channels(b)).pow(2).sum(1).mean((1, 2))
                    for a, b in zip(fx, net(recon), strict=True)),
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

    def set_diffusion_prior(self, prior: nn.Module | None) -> None:
        """Hands the VAE a trained :class:`~mve.models.latent_prior.LatentPrior` (a separate
        checkpoint, ``<vae>/prior``, matched by the VAE's weights hash when loaded). Like the
        perceptual network it stays out of ``state_dict`` and ``.to()``; ``sample`` then uses
        it by default."""
        self.__dict__["_diffusion"] = prior

    @property
    def diffusion_prior(self) -> nn.Module | None:
        return self.__dict__.get("_diffusion")

    def latent_space_id(self) -> str:
        """sha256 of the encoder's weights: what a latent prior is valid for (refitting the GMM
        or fine-tuning the decoder leaves it unchanged)."""
        h = hashlib.sha256()
        for name, t in sorted(self.encoder.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def default_prior(self) -> str:
        """What ``sample`` draws from without ``prior=``: the diffusion prior when one is
        attached, else ``config.prior``."""
        return "diffusion" if self.diffusion_prior is not None else self.config.prior

    def _diffusion_latents(self, n: int, temperature: float, seed: int | None,
                           steps: int | None) -> Tensor:
        from mve.diffusion import sample_latents

        net = self.diffusion_prior
        if net is None:
            raise ValueError("this VAE has no diffusion prior; train one with "
                             "`mve train prior --vae CHECKPOINT --data PATH`")
        x = sample_latents(net, n, net.latent_shape, steps=steps or DIFFUSION_STEPS, seed=seed,
                           temperature=temperature)
        return net.from_standard(x.to(net.latent_mean.device))

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
               device: torch.device | str | None = None, prior: str | None = None,
               steps: int | None = None) -> Tensor:
        """Decode ``n`` prior draws -> [n, C, H, W] (eval mode, seedable).

        ``prior`` (default :meth:`default_prior`): ``"standard"`` draws ``z ~ N(0, T^2 I)``;
        ``"gmm"`` draws from the fitted mixture with each component's spread scaled by ``T``;
        ``"diffusion"`` integrates the attached prior's flow in ``steps`` Heun steps from
        noise scaled by ``T``.
        """
        _check_draws(n, temperature)
        prior = prior or self.default_prior()
        if prior not in SAMPLE_PRIORS:
            raise ValueError(f"prior must be one of {SAMPLE_PRIORS}, got {prior!r}")
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if prior == "diffusion":
            z = self._diffusion_latents(n, temperature, seed, steps)
        elif prior == "gmm":
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


    # -- training objective -----------------------------------------------------------------

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
        * ``perceptual`` (training only, ``perceptual_weight > 0``): the mean
          :meth:`perceptual_distance`, added to ``recon_nll`` like a per-pixel squared error.
        """
        if out is None:
            out = self(x)
        x, recon_mean = x.float(), out.recon.float()  # likelihood math in fp32 under autocast
        recon, nll = self._pixel_terms(x, recon_mean)
        kl_el = kl_standard_normal(out.mu.float(), out.logvar.float())  # [B, L, h, w]
        kl = kl_el.flatten(1).sum(1)  # [B]
        dims = x[0].numel()
        terms: dict[str, Tensor] = {}
        if self.config.perceptual_weight > 0 and self.training and torch.is_grad_enabled():
            # Counted like a per-pixel squared error of the "mse" likelihood.
            p = self.perceptual_distance(x, out.recon)
            recon = recon + self.config.perceptual_weight * dims * p.float() / (2 * MSE_SIGMA**2)
            terms["perceptual"] = p.detach().mean()
        kl_w = self.kl_weight
        total = recon.mean() + kl_w * self._kl_penalty(kl_el, kl)
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

    def _pixel_terms(self, x: Tensor, recon_mean: Tensor) -> tuple[Tensor, Tensor]:
        """(training pixel loss [B] of ``config.likelihood``, discretised-Gaussian NLL [B])."""
        likelihood = self.config.likelihood
        fixed = likelihood != "discretized_gaussian"
        log_scale = self.log_scale.clamp(*LOG_SCALE_RANGE).view(1, -1, 1, 1)
        mean = recon_mean.detach() if fixed else recon_mean
        nll = -discretized_gaussian_log_likelihood(x, mean, log_scale).flatten(1).sum(1)
        fit_scale = nll - nll.detach()  # value 0; fits log_scale by ML so elbo_bpd stays a bound
        if likelihood == "mse":
            recon = (x - recon_mean).pow(2).flatten(1).sum(1) / (2 * MSE_SIGMA**2) + fit_scale
        elif likelihood == "l1":
            recon = (x - recon_mean).abs().flatten(1).sum(1) / L1_SCALE + fit_scale
        else:
            recon = nll
        return recon, nll

    def _kl_penalty(self, kl_el: Tensor, kl: Tensor) -> Tensor:
        """The KL the loss pays (scalar): with ``free_bits``, each latent channel's KL (averaged
        over batch and positions) is floored at ``free_bits`` nats per element."""
        free_bits = self.config.free_bits
        if free_bits <= 0:
            return kl.mean()
        per_channel = kl_el.mean(dim=(0, 2, 3)).clamp(min=free_bits)
        return per_channel.sum() * kl_el[0, 0].numel()
