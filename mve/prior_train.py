"""Training the latent diffusion prior (``mve train prior --vae CKPT``): encode the data once
with the frozen VAE, then fit :class:`~mve.models.latent_prior.LatentPrior` by flow matching.

Why encode once: the VAE is frozen, so its latents are a fixed data set of ``N x 4 x 8 x 8``
floats (46 MB for 45,000 images and their mirror images) and an epoch costs only the prior's
own passes. Mirror images are encoded too (the VAE's data augmentation, as the classifier's),
which doubles the data at no risk: a flipped CIFAR image is a CIFAR image.

The prior keeps an exponential moving average of its weights (``torch.optim.swa_utils``,
decay 0.999 as DDPM's); the checkpoint holds the EMA weights, and ``last/`` under the output
holds the raw weights, optimiser and EMA state to resume from. The manifest names its VAE by
the sha256 of the VAE's weights: a prior is only valid for the latent space it was fitted to.

Data parallel (``cluster/prior_train.py`` runs it on Ray Train): with ``world_size`` W every
rank takes a rank-strided shard of the same global batch of ``W * batch_size`` latents (as
the classifier's loader does), ``wrap_model`` (DDP) averages the gradients, and only rank 0
writes checkpoints. One worker reproduces the single-process run exactly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from mve.atomic import write_json
from mve.checkpoint import Checkpoint, load_checkpoint, load_resume_state, save_checkpoint
from mve.diffusion import flow_matching_loss
from mve.models.latent_prior import LatentPrior, LatentPriorConfig, check_prior_fits

__all__ = ["PriorTrainConfig", "encode_split", "train_prior", "export_prior",
           "load_prior", "vae_reference"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PriorTrainConfig:
    """How the prior is trained. Defaults: DDPM's CIFAR settings scaled to a small model."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 500
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    flip: bool = True  # encode mirror images too
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


def vae_reference(vae: Checkpoint) -> dict[str, Any]:
    """What a prior's manifest records of its VAE (the sha256 of its weights is the key)."""
    return {"path": str(vae.path), "checkpoint_id": vae.checkpoint_id,
            "weights_sha256": vae.meta["files"]["model.safetensors"]["sha256"],
            "latent_space_id": vae.model.latent_space_id(),
            "latent_shape": list(vae.model.config.latent_shape)}


@torch.no_grad()
def encode_split(vae: nn.Module, images: torch.Tensor, *, flip: bool = False,
                 batch_size: int = 500, progress: bool = False) -> torch.Tensor:
    """Posterior means ``[N (x2 with flip), C, h, w]`` of uint8 images ``[N, 3, H, W]``."""
    vae.eval()
    device = next(vae.parameters()).device
    out = []
    views = (False, True) if flip else (False,)
    total = math.ceil(len(images) / batch_size) * len(views)
    bar = tqdm(total=total, desc="encode", disable=not progress, unit="batch", leave=False)
    for mirrored in views:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device).float() / 127.5 - 1.0
            if mirrored:
                x = x.flip(3)
            mu, _ = vae.encode(x)
            out.append(mu.float().cpu())
            bar.update()
    bar.close()
    return torch.cat(out)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% (DDPM uses a constant lr; the decay lets a
    short CPU run end on a settled model)."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


@torch.no_grad()
def _val_loss(model: nn.Module, latents: torch.Tensor, batch_size: int = 1000) -> float:
    """Flow-matching loss on fixed times and noise (seed 0): comparable between epochs."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for i in range(0, len(latents), batch_size):
        x0 = latents[i:i + batch_size].to(device)
        total += flow_matching_loss(model, x0, generator=gen).item() * len(x0)
        n += len(x0)
    return total / max(n, 1)


def train_prior(vae: Checkpoint, train_images: torch.Tensor, val_images: torch.Tensor | None,
                out: str | Path, *, model_config: LatentPriorConfig | None = None,
                cfg: PriorTrainConfig | None = None, device: str | torch.device = "cpu",
                resume: bool = False, resume_from: str | Path | None = None,
                progress: bool = False, rank: int = 0, world_size: int = 1,
                wrap_model: Callable[[nn.Module], nn.Module] | None = None,
                report: Callable[[dict[str, Any], Path | None], None] | None = None) -> Path:
    """Trains a prior for ``vae`` and saves its EMA weights at ``out`` (a checkpoint dir).

    Returns ``out``. With ``resume``, continues from ``out/last`` when it exists;
    ``resume_from`` names such a checkpoint explicitly. As in :func:`mve.train.fit`,
    ``rank``/``world_size``/``wrap_model`` make it one worker of a data-parallel run, and
    ``report`` is called after every epoch on every rank with the epoch's row and, on rank 0,
    the resumable ``last/`` checkpoint just written (else None).
    """
    cfg, model_config = cfg or PriorTrainConfig(), model_config or LatentPriorConfig()
    out, device = Path(out), torch.device(device)
    if resume_from is None and resume and (out / "last").exists():
        resume_from = out / "last"
    torch.manual_seed(cfg.seed)
    vae.model.to(device)
    train_z = encode_split(vae.model, train_images, flip=cfg.flip, progress=progress)
    val_z = encode_split(vae.model, val_images, progress=progress) \
        if val_images is not None and len(val_images) else None
    model = LatentPrior(_fit_shape(model_config, train_z)).to(device)
    model.set_latent_stats(train_z.to(device))
    train_x = model.to_standard(train_z.to(device)).cpu()
    val_x = model.to_standard(val_z.to(device)).cpu() if val_z is not None else None
    state = _State.create(model, cfg, len(train_x) // world_size, wrap_model)
    if resume_from is not None:
        state.load(Path(resume_from))
    lead = rank == 0
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        loss = _train_epoch(state, train_x, cfg, device, epoch, progress and lead,
                            (rank, world_size))
        row = {"epoch": epoch, "train_loss": loss, "train_time_s": time.perf_counter() - t0,
               "lr": state.opt.param_groups[0]["lr"]}
        if val_x is not None and lead:
            row["val_loss"] = _val_loss(state.ema.module, val_x)
        state.history.append(row)
        state.epoch = epoch
        last = None
        if lead:
            logger.info("prior epoch %d: %s", epoch, json.dumps(row))
            last = state.save(out / "last", vae, cfg)
        if report is not None:
            report(row, last)
    if lead:
        _save_final(state, vae, out, cfg)
    return out


def _fit_shape(cfg: LatentPriorConfig, latents: torch.Tensor) -> LatentPriorConfig:
    """The config with the VAE's latent channels and size (a prior fits one latent shape)."""
    c, h, w = latents.shape[1:]
    if h != w:
        raise ValueError(f"the latent prior needs square latents, got {h}x{w}")
    return replace(cfg, latent_channels=int(c), latent_size=int(h))


def _train_epoch(state: _State, data: torch.Tensor, cfg: PriorTrainConfig,
                 device: torch.device, epoch: int, progress: bool, shard: tuple[int, int]
                 ) -> float:
    model, opt, ema = state.model, state.opt, state.ema
    rank, world_size = shard
    model.train()
    # every rank draws the same permutation; rank 0 goes on drawing its noise from the same
    # stream, so one worker reproduces the single-process run, and other ranks use their own
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(len(data), generator=gen)
    noise = gen if rank == 0 else torch.Generator().manual_seed(
        (cfg.seed * 100_003 + epoch) * 1_009 + rank)
    width = cfg.batch_size * world_size  # the global batch
    steps = len(data) // width
    total = 0.0
    bar = tqdm(range(steps), desc=f"prior {epoch}/{cfg.epochs}", disable=not progress,
               unit="step", leave=False)
    for i in bar:
        x0 = data[order[i * width:(i + 1) * width][rank::world_size]].to(device)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(state.step, state.total_steps, cfg.warmup_steps)
        loss = flow_matching_loss(state.forward, x0, generator=noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update_parameters(model)
        state.step += 1
        total += loss.item()
    return total / max(steps, 1)


def _save_final(state: _State, vae: Checkpoint, out: Path, cfg: PriorTrainConfig) -> None:
    _write_prior(state.ema.module, state.model, out, history=state.history,
                 train_config=asdict(cfg), vae=vae_reference(vae))


def _write_prior(ema: LatentPrior, raw: LatentPrior, out: Path, *, history: list[dict],
                 train_config: dict[str, Any], vae: dict[str, Any]) -> None:
    """The prior checkpoint: the EMA weights with the raw model's latent statistics (fixed
    buffers, which the average must not blur), and ``history.json`` beside it."""
    ema.latent_mean.copy_(raw.latent_mean)
    ema.latent_std.copy_(raw.latent_std)
    save_checkpoint(out, ema, model_name="prior", model_config=ema.config,
                    preprocessing=_preprocessing(ema), metrics=history[-1] if history else {},
                    train_config=train_config, extra={"vae": vae})
    write_json(out / "history.json", history)


def export_prior(last: str | Path, out: str | Path) -> Path:
    """The prior checkpoint at ``out`` from a run's resumable ``last/`` checkpoint: what
    :func:`train_prior` writes when it ends, for a driver that only holds the checkpoint its
    workers reported (Ray Train)."""
    raw = load_checkpoint(last)
    weights, state = load_resume_state(last)
    if raw.model_name != "prior" or state is None:
        raise ValueError(f"{last} is not a resumable prior checkpoint")
    ema = LatentPrior(raw.model.config)
    ema.load_state_dict({k.removeprefix("ema."): v for k, v in state["ema"].items()})
    _write_prior(ema, raw.model, Path(out), history=json.loads(state["history"]),
                 train_config=raw.meta.get("train_config") or {}, vae=raw.meta["vae"])
    return Path(out)


def _preprocessing(model: LatentPrior) -> dict[str, Any]:
    """The manifest's preprocessing: the latent statistics the prior standardises with."""
    s = model.config.latent_size
    return {"input_size": [s, s], "mean": model.latent_mean.tolist(),
            "std": model.latent_std.tolist()}


def _ema_with_warmup(decay: float):
    """EMA whose decay ramps up as ``(1 + n) / (10 + n)`` (TensorFlow's ExponentialMovingAverage
    with num_updates): a short run's average is not held back by the zero-initialised head."""

    def avg(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        return averaged * d + current * (1.0 - d)

    return avg


class _State:
    """The model, optimiser, EMA and counters of a run; saved to and loaded from ``last/``."""

    def __init__(self, model: LatentPrior, opt: torch.optim.Optimizer, ema: AveragedModel,
                 total_steps: int, forward: nn.Module):
        self.model, self.opt, self.ema, self.total_steps = model, opt, ema, total_steps
        self.forward = forward  # the model as wrapped for data parallelism (or itself)
        self.step, self.epoch, self.history = 0, 0, []

    @classmethod
    def create(cls, model: LatentPrior, cfg: PriorTrainConfig, n_per_rank: int,
               wrap: Callable[[nn.Module], nn.Module] | None = None) -> _State:
        ema = AveragedModel(model, avg_fn=_ema_with_warmup(cfg.ema_decay), use_buffers=True)
        forward = wrap(model) if wrap is not None else model
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        return cls(model, opt, ema, cfg.epochs * (n_per_rank // cfg.batch_size), forward)

    def save(self, path: Path, vae: Checkpoint, cfg: PriorTrainConfig) -> Path:
        ema = {f"ema.{k}": v for k, v in self.ema.module.state_dict().items()}
        state = {"optimizer": self.opt.state_dict(), "ema": ema, "step": self.step,
                 "epoch": self.epoch, "history": json.dumps(self.history),
                 "n_averaged": self.ema.n_averaged}
        return save_checkpoint(path, self.model, model_name="prior",
                               model_config=self.model.config,
                               preprocessing=_preprocessing(self.model), training_state=state,
                               metrics=self.history[-1] if self.history else {},
                               train_config=asdict(cfg), extra={"vae": vae_reference(vae)})

    def load(self, path: Path) -> None:
        weights, state = load_resume_state(path)
        if state is None:
            raise ValueError(f"{path} has no training state to resume from")
        self.model.load_state_dict(weights)
        self.opt.load_state_dict(state["optimizer"])
        self.ema.module.load_state_dict({k.removeprefix("ema."): v
                                         for k, v in state["ema"].items()})
        self.ema.n_averaged.copy_(state["n_averaged"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.history = json.loads(state["history"])
        logger.info("prior: resuming after epoch %d (step %d) from %s", self.epoch, self.step, path)


def load_prior(path: str | Path, *, vae: Checkpoint | None = None,
               device: str | torch.device = "cpu") -> Checkpoint:
    """A prior checkpoint; with ``vae``, refuses a prior fitted to another VAE."""
    ckpt = load_checkpoint(path, device=device)
    if ckpt.model_name != "prior":
        raise ValueError(f"{path} is a {ckpt.model_name} checkpoint, not a latent prior")
    if vae is not None:
        check_prior_fits(ckpt.meta, vae.model, prior_path=ckpt.path, where=str(vae.path))
    return ckpt
