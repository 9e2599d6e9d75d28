"""One pass over a loader: ``train_one_epoch`` and ``evaluate``, and the per-task steps.

Rank, world size and device are passed in; nothing is read from the environment.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from mve.averaging import WeightAverager
from mve.checkpoint import unwrap_model
from mve.data import TensorLoader
from mve.metrics import ConfusionMatrix, MeanAccumulator, psnr, ssim

__all__ = ["Stepper", "step_for", "train_one_epoch", "evaluate"]


class Stepper(Protocol):
    """One training step's loss (with a graph) and its detached metrics."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, float]]: ...


def step_for(task: str, label_smoothing: float = 0.0) -> Stepper:
    """The training step of a registry task: ``"classification"`` or ``"generation"``."""
    return _classifier_step(label_smoothing) if task == "classification" else _vae_step


def _classifier_step(label_smoothing: float) -> Stepper:
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


def _optimizer_step(model: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                    grad_clip: float | None) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {loss.item()}; lower optim.lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def train_one_epoch(model: nn.Module, loader: TensorLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, step_fn: Stepper, *,
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
        _optimizer_step(model, loss, optimizer, grad_clip)
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

