"""Optimiser parameter groups and the learning-rate schedules of the training loop."""

from __future__ import annotations

import math

import torch
from torch import nn

from mve.config import OptimConfig

__all__ = ["build_optimizer", "lr_factor", "build_scheduler"]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Three parameter groups; frozen parameters are left out.

    - conv/linear weights: ``lr`` and ``weight_decay``;
    - normalisation parameters (BatchNorm/GroupNorm/LayerNorm): ``bias_lr_scale`` times the lr;
    - other biases: ``lr``.
    With ``decay_biases`` the last two decay by the same absolute amount per step as the
    weights (airbench: ``weight_decay / lr_scale``), else not at all.
    """
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, norm_types)
                for p in m.parameters(recurse=False)}
    decay, norms, biases = [], [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in norm_ids:
            norms.append(p)
        elif p.ndim > 1:
            decay.append(p)
        else:
            biases.append(p)
    scale = cfg.bias_lr_scale
    wd = cfg.weight_decay if cfg.decay_biases else 0.0
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
              {"params": norms, "weight_decay": wd / scale, "lr": cfg.lr * scale},
              {"params": biases, "weight_decay": wd, "lr": cfg.lr}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    betas = (cfg.momentum, cfg.beta2)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at ``step`` (0-based) of ``total`` steps.

    onecycle: linear warm-up from 0.1x, then cosine to ``final_lr_fraction``; cosine: linear
    warm-up from 0, then cosine; linear: warm-up then linear decay (airbench's triangle).
    ``warmup_start`` overrides where the warm-up starts.
    """
    if cfg.schedule == "constant" or total <= 1:
        return 1.0
    warm = int(round(cfg.warmup * total))
    final = cfg.final_lr_fraction
    if step < warm:
        start = cfg.warmup_start
        if start is None:
            start = 0.1 if cfg.schedule == "onecycle" else 0.0
        return start + (1.0 - start) * (step + 1) / warm
    t = (step - warm) / max(1, total - 1 - warm)  # 0 -> 1 over the decay phase
    t = min(max(t, 0.0), 1.0)
    if cfg.schedule == "linear":
        return 1.0 + (final - 1.0) * t
    return final + (1.0 - final) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(opt: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg))

