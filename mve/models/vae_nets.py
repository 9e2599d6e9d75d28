"""The VAE's encoder and decoder networks (LDM ``AutoencoderKL`` blocks, no time embedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mve.models.vae_config import VAEConfig

__all__ = ["Encoder", "Decoder", "ResnetBlock", "AttnBlock"]


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

