"""The training loop as plain functions: ``train_one_epoch``, ``evaluate`` and ``fit``.

Rank, world size, device and reporting are passed in; nothing is read from the
environment. ``cluster/`` wraps ``fit`` for Ray Train by passing a reporter that calls
``ray.train.report`` and a ``wrap_model`` hook that calls ``prepare_model``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from mve.averaging import WeightAverager
from mve.checkpoint import load_checkpoint, load_training_state, save_checkpoint, unwrap_model
from mve.config import OptimConfig, TrainConfig
from mve.data import DataBundle, Split, TensorLoader
from mve.data.transforms import normalize
from mve.metrics import ConfusionMatrix, MeanAccumulator, psnr, ssim
from mve.models import build_model, get_spec

__all__ = [
    "Reporter", "FitResult", "build_optimizer", "lr_factor", "build_scheduler",
    "train_one_epoch", "evaluate", "fit", "preprocessing_for", "make_loader",
]

logger = logging.getLogger(__name__)

Reporter = Callable[[dict[str, Any], "Path | None"], None]


class _Stepper(Protocol):
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, float]]: ...


# -- optimiser and schedule ------------------------------------------------------------

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


# -- tasks -----------------------------------------------------------------------------

def _classifier_step(label_smoothing: float) -> _Stepper:
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        logits = model(x)
        loss = loss_fn(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": acc}

    return step


def _vae_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    out = model(x)
    terms = unwrap_model(model).loss(x, out)
    return terms["loss"], {k: v.detach() for k, v in terms.items()}


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _all_reduce_means(acc: MeanAccumulator, device: torch.device, world_size: int) -> dict[str, float]:
    """Sample-weighted means over all ranks (a no-op for one process)."""
    local = acc.compute()
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return local
    keys = sorted(local)
    n = float(acc.count)
    t = torch.tensor([local[k] * n for k in keys] + [n], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: (t[i] / t[-1]).item() for i, k in enumerate(keys)}


def train_one_epoch(model: nn.Module, loader: TensorLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, step_fn: _Stepper, *,
                    device: torch.device, precision: str = "fp32", grad_clip: float | None = None,
                    world_size: int = 1, progress: bool = False, desc: str = "train",
                    averager: WeightAverager | None = None, start_step: int = 0,
                    total_steps: int | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns sample-weighted means of the step metrics and images/s.

    ``start_step``/``total_steps`` place the epoch in the run: the model's
    ``set_train_progress(fraction)`` (when it has one, e.g. for KL annealing) is called before
    every step, and ``averager`` is updated after every optimiser step.
    """
    model.train()
    net = unwrap_model(model)
    progress_hook = getattr(net, "set_train_progress", None)
    total = total_steps or max(1, start_step + len(loader))
    acc = MeanAccumulator()
    start, seen = time.perf_counter(), 0
    step = start_step
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch")
    for x, y in bar:
        if progress_hook is not None:
            progress_hook(step / total)
        with _autocast(device, precision):
            loss, stats = step_fn(model, x, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()}; lower optim.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        step += 1
        if scheduler is not None:
            scheduler.step()
        if averager is not None:
            averager.update(net, step)
        acc.update({k: float(v) for k, v in stats.items()}, n=len(y))
        seen += len(y)
        if progress:
            bar.set_postfix(loss=f"{acc.compute()['loss']:.3f}", refresh=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    out = _all_reduce_means(acc, device, world_size)
    out["images_per_s"] = seen * world_size / max(elapsed, 1e-9)
    out["time_s"] = elapsed
    out["lr"] = optimizer.param_groups[0]["lr"]
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader: TensorLoader, *, task: str, device: torch.device,
             class_names: list[str] | tuple[str, ...] | None = None, precision: str = "fp32",
             label_smoothing: float = 0.0, progress: bool = False) -> dict[str, Any]:
    """Evaluates on every sample of ``loader`` in eval mode.

    Classification: loss, accuracy, mean per-class accuracy, per-class precision/recall/F1,
    macro F1 and the confusion matrix. Generation (VAE): loss, reconstruction MSE, PSNR and
    SSIM (pixels in [0, 1]), KL and the ELBO in bits/dim.
    """
    was_training = model.training
    model.eval()
    net = unwrap_model(model)
    acc = MeanAccumulator()
    cm = ConfusionMatrix(len(class_names)) if task == "classification" else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    for x, y in tqdm(loader, desc="eval", leave=False, disable=not progress, unit="batch"):
        with _autocast(device, precision):
            if task == "classification":
                logits = net(x).float()
                acc.update({"loss": loss_fn(logits, y).item()}, n=len(y))
                cm.update(logits.argmax(1), y)
            else:
                out = net(x)
                terms = net.loss(x, out)
                a, b = _to_unit(x), _to_unit(out.recon.float())
                stats = {k: float(v) for k, v in terms.items()}
                stats["psnr"] = psnr(b, a).mean().item()
                stats["ssim"] = ssim(b, a).mean().item()
                acc.update(stats, n=len(y))
    model.train(was_training)
    out_metrics: dict[str, Any] = dict(acc.compute())
    if cm is not None:
        out_metrics.update(cm.compute(class_names))
    out_metrics["num_samples"] = acc.count
    return out_metrics


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """VAE model space [-1, 1] -> pixels in [0, 1] (quantised like a saved image)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 255.0


# -- fit -------------------------------------------------------------------------------

@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    final_metrics: dict[str, Any] = field(default_factory=dict)


def preprocessing_for(cfg: TrainConfig, data: DataBundle) -> dict[str, Any]:
    """The preprocessing recorded in checkpoints: classifiers use the training data's stats,
    the VAE maps pixels to [-1, 1]."""
    h, w = data.image_size
    if get_spec(cfg.model).task == "generation":
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    else:
        mean, std = data.mean, data.std
    return {"input_size": [h, w], "mean": list(mean), "std": list(std), "pixel_scale": 1 / 255}


def make_loader(split: Split, cfg: TrainConfig, prep: Mapping[str, Any], *, train: bool,
                rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                ) -> TensorLoader:
    if train:
        return TensorLoader(split, batch_size=cfg.batch_size, mean=prep["mean"], std=prep["std"],
                            shuffle=True, drop_last=len(split) >= cfg.batch_size * world_size,
                            augment=cfg.data.augment, seed=cfg.seed, rank=rank,
                            world_size=world_size, device=device)
    return TensorLoader(split, batch_size=cfg.eval_batch_size, mean=prep["mean"], std=prep["std"],
                        device=device)


def fit(cfg: TrainConfig, data: DataBundle, *, device: torch.device | str = "cpu", rank: int = 0,
        world_size: int = 1, report: Reporter | None = None,
        resume_from: str | Path | None = None, progress: bool = True,
        wrap_model: Callable[[nn.Module], nn.Module] | None = None,
        checkpoint_every: int = 1) -> FitResult:
    """Trains ``cfg.model`` on ``data`` for ``cfg.epochs`` epochs.

    After every epoch, rank 0 evaluates on the validation split, writes a checkpoint
    (weights + training state) to a temporary directory, and every rank calls
    ``report(metrics, checkpoint_dir_or_None)``; the directory is deleted after ``report``
    returns, so a reporter must copy what it keeps. ``resume_from`` continues from such
    a checkpoint (epochs already done are skipped).
    """
    device = torch.device(device)
    torch.manual_seed(cfg.seed + rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    spec = get_spec(cfg.model)
    class_names = list(data.class_names)
    if spec.task == "classification" and cfg.model_config.num_classes != len(class_names):
        raise ValueError(f"model.num_classes={cfg.model_config.num_classes} but the data has "
                         f"{len(class_names)} classes ({', '.join(class_names)})")
    prep = preprocessing_for(cfg, data)
    model = build_model(cfg.model, cfg.model_config).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    start_epoch, history = 0, []
    state = None
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, device=device)
        model.load_state_dict(ckpt.model.state_dict())
        state = load_training_state(resume_from)
        if state is not None:
            start_epoch, history = int(state["epoch"]), list(state.get("history", []))
            if "raw_model" in state:  # EMA runs save the average; training resumes on the raw
                model.load_state_dict({**model.state_dict(), **state["raw_model"]})
        logger.info("resuming from %s at epoch %d", resume_from, start_epoch)
    elif hasattr(model, "init_from_data"):
        model.init_from_data(_init_batch(data.train, prep, device))
    net = model
    if wrap_model is not None:
        model = wrap_model(model)
    if cfg.compile:
        model = torch.compile(model)
    train_loader = make_loader(data.train, cfg, prep, train=True, rank=rank,
                               world_size=world_size, device=device)
    val_loader = (make_loader(data.val, cfg, prep, train=False, device=device)
                  if data.val is not None and len(data.val) else None)
    optimizer = build_optimizer(model, cfg.optim)
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, total_steps, cfg.optim)
    averager = (WeightAverager(net, mode=cfg.averaging, decay=cfg.averaging_decay,
                               every=cfg.averaging_every, total_steps=total_steps)
                if cfg.averaging != "none" else None)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if averager is not None and "averager" in state:
            averager.load_state_dict(state["averager"])
    step_fn = (_classifier_step(cfg.label_smoothing) if spec.task == "classification"
               else _vae_step)
    show = progress and rank == 0
    metrics: dict[str, Any] = {}
    train_time = float(history[-1].get("train_time_s", 0.0)) if history else 0.0
    epochs = range(start_epoch, cfg.epochs)
    for epoch in tqdm(epochs, desc=f"{cfg.model} epochs", disable=not show, unit="epoch",
                      initial=start_epoch, total=cfg.epochs):
        train_loader.set_epoch(epoch)
        train_m = train_one_epoch(model, train_loader, optimizer, scheduler, step_fn,
                                  device=device, precision=cfg.precision,
                                  grad_clip=cfg.optim.grad_clip, world_size=world_size,
                                  progress=show, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                                  averager=averager, start_step=epoch * steps_per_epoch,
                                  total_steps=total_steps)
        train_time += train_m["time_s"]
        metrics = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in train_m.items()},
                   "train_time_s": train_time}
        if rank == 0 and val_loader is not None:
            t0 = time.perf_counter()
            with _averaged(averager, net):
                val_m = evaluate(model, val_loader, task=spec.task, device=device,
                                 class_names=class_names, precision=cfg.precision)
            metrics["val_time_s"] = time.perf_counter() - t0
            metrics.update({f"val_{k}": v for k, v in val_m.items()
                            if isinstance(v, int | float) and k != "num_samples"})
            metrics["_val_details"] = val_m
        history.append({k: v for k, v in metrics.items() if not k.startswith("_")})
        if rank == 0:
            logger.info("epoch %d: %s", epoch + 1, _brief(history[-1]))
        ckpt_dir = None
        is_last = epoch + 1 == cfg.epochs
        if rank == 0 and ((epoch + 1) % checkpoint_every == 0 or is_last):
            ckpt_dir = Path(tempfile.mkdtemp(prefix="mve-ckpt-")) / "checkpoint"
            training_state = {"epoch": epoch + 1, "history": history,
                              "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict()}
            if averager is not None:
                training_state["averager"] = averager.state_dict()
                if averager.mode == "ema":
                    training_state["raw_model"] = {
                        k: v.detach().clone() for k, v in net.state_dict().items()
                        if v.is_floating_point()}
            with _averaged(averager, net):
                save_checkpoint(
                    ckpt_dir, net, model_name=cfg.model, model_config=cfg.model_config,
                    preprocessing=prep, class_names=class_names,
                    metrics=_checkpoint_metrics(metrics), provenance=data.provenance,
                    train_config=cfg.to_dict(), training_state=training_state)
        try:
            if report is not None:
                report(metrics, ckpt_dir)
        finally:
            if ckpt_dir is not None:
                shutil.rmtree(ckpt_dir.parent, ignore_errors=True)
    if averager is not None and averager.mode == "ema":
        with torch.no_grad():  # the returned model carries the averaged weights
            for k, v in net.state_dict().items():
                if k in averager.avg:
                    v.copy_(averager.avg[k])
    return FitResult(net, history, metrics)


def _averaged(averager: WeightAverager | None, net: nn.Module):
    return averager.averaged(net) if averager is not None else contextlib.nullcontext(net)


def _init_batch(split: Split, prep: Mapping[str, Any], device: torch.device,
                n: int = 5000) -> torch.Tensor:
    """The first ``n`` training images, normalised: the data for data-dependent init
    (identical on every rank, so replicas start equal)."""
    return normalize(split.images[:n].to(device), prep["mean"], prep["std"])


def _checkpoint_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in metrics.items() if not k.startswith("_")}
    details = metrics.get("_val_details")
    if details and "per_class" in details:
        out["val_per_class"] = details["per_class"]
        out["val_confusion_matrix"] = details["confusion_matrix"]
    return out


def _brief(m: Mapping[str, Any]) -> str:
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_elbo_bpd", "val_psnr",
            "train_images_per_s")
    return ", ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)
