"""A diffusion prior over a VAE's latent: a small UNet that predicts the flow-matching velocity
of a noisy latent (``mve.diffusion`` has the loss and the sampler).

Why a UNet at 8x8: the latent is an image of 4 channels at 8x8, and its statistics are local
(it decodes to 4x4-pixel patches), so convolutions with one self-attention at 4x4 (16 tokens)
see it whole at a cost far below a DiT's. Sizes follow DDPM's CIFAR UNet scaled to a 64x
smaller input: two levels (8x8 and 4x4), GroupNorm + SiLU residual blocks with the time added
as a per-channel scale and shift (the "adaptive GroupNorm" of Improved DDPM), zero-initialised
output convolutions so that a new block is the identity.

The prior works in standardised latent space; the per-channel mean and std of the training
latents are buffers here, so ``to_latent``/``from_latent`` travel with the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LatentPriorConfig", "LatentPrior", "PRESETS", "check_prior_fits"]


@dataclass(frozen=True)
class LatentPriorConfig:
    """Architecture of :class:`LatentPrior`. Defaults: the prior shipped beside the VAE."""

    latent_channels: int = 4  # the VAE's latent channels
    latent_size: int = 8  # the VAE's latent height = width
    channels: int = 48  # width of the 8x8 level; the 4x4 level has ``2 * channels``
    blocks: int = 2  # residual blocks per level on the way down (one more on the way up)
    attention: bool = True  # self-attention at 4x4 and in the middle
    dropout: float = 0.1
    groups: int = 16  # GroupNorm groups

    def __post_init__(self) -> None:
        for name in ("latent_channels", "latent_size", "channels", "blocks", "groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.latent_size % 2:
            raise ValueError(f"latent_size must be even (one 2x downsampling), got "
                             f"{self.latent_size}")
        if self.channels % self.groups:
            raise ValueError(f"channels ({self.channels}) must be a multiple of groups "
                             f"({self.groups})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


PRESETS: dict[str, dict] = {
    "default": {},  # 2.2M parameters, 8.8 MB: within the 10 MB the prior may add to the VAE
    "small": dict(channels=32, groups=8),  # 1.0M: what 2 CPU cores train in minutes
    "tiny": dict(channels=16, blocks=1, groups=8, dropout=0.0),  # tests and smoke runs
}


def time_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of ``t`` in [0, 1] -> [N, dim] (frequencies 1..1000, as DDPM's)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class Attention(nn.Module):
    def __init__(self, c: int, groups: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.out = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w) \
            .permute(1, 0, 2, 4, 3).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)  # [n, heads, hw, c/heads]
        return x + self.out(y.permute(0, 1, 3, 2).reshape(n, c, h, w))


class LatentPrior(nn.Module):
    """``forward(x_t, t) -> v``: the velocity of a standardised latent at time ``t`` in [0, 1]
    (``t = 0`` data, ``t = 1`` noise)."""

    def __init__(self, config: LatentPriorConfig | None = None):
        super().__init__()
        cfg = self.config = config or LatentPriorConfig()
        c, c2, g, emb = cfg.channels, 2 * cfg.channels, cfg.groups, 4 * cfg.channels
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))
        self.time = nn.Sequential(nn.Linear(c, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(cfg.latent_channels, c, 3, padding=1)
        block = lambda a, b: ResBlock(a, b, emb, g, cfg.dropout)  # noqa: E731
        self.down1 = nn.ModuleList([block(c, c) for _ in range(cfg.blocks)])
        self.pool = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.down2 = nn.ModuleList([block(c if i == 0 else c2, c2) for i in range(cfg.blocks)])
        self.mid = nn.ModuleList([block(c2, c2), block(c2, c2)])
        self.attn = nn.ModuleList([Attention(c2, g) for _ in range(2)]) if cfg.attention else None
        self.up2 = nn.ModuleList([block(2 * c2 if i < cfg.blocks else c2 + c, c2)
                                  for i in range(cfg.blocks + 1)])
        self.unpool = nn.Upsample(scale_factor=2, mode="nearest")
        self.up1 = nn.ModuleList([block((c2 if i == 0 else c) + c, c)
                                  for i in range(cfg.blocks + 1)])
        self.out = nn.Sequential(nn.GroupNorm(g, c), nn.SiLU(),
                                 nn.Conv2d(c, cfg.latent_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.config.latent_size
        return (self.config.latent_channels, s, s)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time(time_embedding(t.expand(len(x)), self.config.channels))
        h = self.inp(x)
        skips = [h]
        for blk in self.down1:
            h = blk(h, emb)
            skips.append(h)
        h = self.pool(h)
        skips.append(h)
        for i, blk in enumerate(self.down2):
            h = blk(h, emb)
            if self.attn is not None and i == len(self.down2) - 1:
                h = self.attn[0](h)
            skips.append(h)
        h = self.mid[0](h, emb)
        if self.attn is not None:
            h = self.attn[1](h)
        h = self.mid[1](h, emb)
        for blk in self.up2:
            h = blk(torch.cat([h, skips.pop()], dim=1), emb)
        h = self.unpool(h)
        for blk in self.up1:
            h = blk(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    # -- latent space <-> the prior's standardised space --------------------------------------

    @torch.no_grad()
    def set_latent_stats(self, latents: Tensor) -> None:
        """Per-channel mean and std of VAE latents ``[N, C, h, w]``."""
        if latents.ndim != 4 or latents.shape[1:] != self.latent_shape:
            raise ValueError(f"latents must be [N, {', '.join(map(str, self.latent_shape))}], "
                             f"got {tuple(latents.shape)}")
        self.latent_mean.copy_(latents.mean(dim=(0, 2, 3)))
        self.latent_std.copy_(latents.std(dim=(0, 2, 3)).clamp_min(1e-6))

    def to_standard(self, z: Tensor) -> Tensor:
        return (z - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def from_standard(self, x: Tensor) -> Tensor:
        return x * self.latent_std[:, None, None] + self.latent_mean[:, None, None]


def check_prior_fits(prior_meta: Mapping[str, Any], vae: nn.Module, *, prior_path: Any,
                     where: str) -> None:
    """ValueError unless the prior of manifest ``prior_meta`` was fitted to ``vae``'s latent
    space (its encoder, ``VAE.latent_space_id``)."""
    want = vae.latent_space_id()
    have = (prior_meta.get("vae") or {}).get("latent_space_id")
    if have != want:
        raise ValueError(f"the prior {prior_path} was fitted to another VAE's latent space "
                         f"(encoder {str(have)[:12]}), not to {where}'s ({want[:12]})")
