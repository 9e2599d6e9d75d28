"""Optimiser parameter groups and the learning-rate schedules of the training loop."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from mve.config import OptimConfig
from mve.muon import Muon

__all__ = ["build_optimizer", "lr_factor", "build_scheduler"]


def build_optimizer(model: nn.Module, cfg: OptimConfig, *,
                    freeze_later: Iterable[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """Parameter groups by kind; frozen parameters are left out.

    - conv/linear weights: ``lr`` and ``weight_decay`` (``muon``: conv filters take Muon
      steps at ``muon_lr`` instead, the linear head stays on SGD);
    - normalisation parameters (BatchNorm/GroupNorm/LayerNorm): ``bias_lr_scale`` times the lr;
    - other biases: ``lr``;
    - ``freeze_later`` (e.g. the whitening bias): a group of their own, tagged
      ``freeze_after`` so that :func:`build_scheduler` can stop them (lr 0) after some steps.
    With ``decay_biases`` the biases and norm parameters decay by the same absolute amount per
    step as the weights (airbench: ``weight_decay / lr_scale``), else not at all.
    """
    later = {id(p) for p in freeze_later}
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, norm_types)
                for p in m.parameters(recurse=False)}
    kinds: dict[str, list[nn.Parameter]] = {k: [] for k in ("decay", "filters", "norms",
                                                           "biases", "later")}
    for _, p in model.named_parameters():
        if p.requires_grad:
            kinds[_kind(p, id(p) in later, id(p) in norm_ids, cfg.name == "muon")].append(p)
    scale = cfg.bias_lr_scale
    wd = cfg.weight_decay if cfg.decay_biases else 0.0
    groups = [{"params": kinds["decay"], "weight_decay": cfg.weight_decay, "lr": cfg.lr},
              {"params": kinds["norms"], "weight_decay": wd / scale, "lr": cfg.lr * scale},
              {"params": kinds["biases"], "weight_decay": wd, "lr": cfg.lr}]
    if kinds["later"]:
        groups.append({"params": kinds["later"], "weight_decay": wd, "lr": cfg.lr,
                       "freeze_after": True})
    if cfg.name == "muon":
        groups.append({"params": kinds["filters"], "lr": cfg.muon_lr,
                       "momentum": cfg.muon_momentum, "weight_decay": 0.0, "orthogonal": True})
        return Muon(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    betas = (cfg.momentum, cfg.beta2)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas)


def _kind(p: nn.Parameter, later: bool, norm: bool, muon: bool) -> str:
    if later:
        return "later"
    if norm:
        return "norms"
    if p.ndim == 4 and muon:
        return "filters"
    return "decay" if p.ndim > 1 else "biases"


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


def build_scheduler(opt: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig, *,
                    freeze_step: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of ``cfg`` on every group; groups tagged ``freeze_after`` get lr 0 from
    ``freeze_step`` on (airbench trains the whitening bias for its first 3 epochs only)."""
    def schedule(s: int) -> float:
        return lr_factor(s, total_steps, cfg)

    def frozen_later(s: int) -> float:
        return 0.0 if freeze_step is not None and s >= freeze_step else schedule(s)

    return torch.optim.lr_scheduler.LambdaLR(
        opt, [frozen_later if g.get("freeze_after") else schedule for g in opt.param_groups])

