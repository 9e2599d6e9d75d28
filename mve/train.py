"""The training loop as plain functions: ``fit`` over ``train_one_epoch`` and ``evaluate``.

Rank, world size, device and reporting are passed in; nothing is read from the
environment. ``cluster/`` wraps ``fit`` for Ray Train by passing a reporter that calls
``ray.train.report`` and a ``wrap_model`` hook that calls ``prepare_model``. One epoch's pass
lives in ``mve.loop``, the optimiser and schedules in ``mve.optim`` (both re-exported here).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mve.averaging import WeightAverager
from mve.checkpoint import CheckpointError, load_resume_state, save_checkpoint
from mve.config import TrainConfig
from mve.data import DataBundle, Split, TensorLoader, stratified_subset
from mve.data.transforms import normalize
from mve.distill import distill_step, load_teacher
from mve.loop import Stepper, evaluate, step_for, train_one_epoch
from mve.mlflow_runs import MlflowRun, flat_values
from mve.models import build_model, get_spec
from mve.optim import build_optimizer, build_scheduler, lr_factor
from mve.perceptual import perceptual_network
from mve.tracking import EpochTracker

__all__ = [
    "Reporter", "FitResult", "build_optimizer", "lr_factor", "build_scheduler",
    "train_one_epoch", "evaluate", "fit", "preprocessing_for", "make_loader", "tracker_for",
]

logger = logging.getLogger(__name__)

Reporter = Callable[[dict[str, Any], "Path | None"], None]


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


def tracker_for(cfg: TrainConfig, data: DataBundle, *, logdir: str | Path | None,
                mlflow: MlflowRun | None = None, hparams: Mapping[str, Any] | None = None
                ) -> EpochTracker:
    """The tracker of a run of ``cfg`` on ``data``: event files in ``logdir`` (None: none),
    MLflow when ``mlflow`` is a started run, ``hparams`` (default: the flattened config) with
    the final metrics; a VAE's grids use a showcase of the validation images."""
    track = EpochTracker(logdir=logdir, mlflow=mlflow,
                         hparams=flat_values(cfg.to_dict()) if hparams is None else hparams)
    if get_spec(cfg.model).task == "generation" and data.val is not None and len(data.val):
        track.watch_images(data.showcase_images(), preprocessing_for(cfg, data))
    return track


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
        checkpoint_every: int = 1, track: EpochTracker | None = None) -> FitResult:
    """Trains ``cfg.model`` on ``data`` for ``cfg.epochs`` epochs.

    After every epoch, rank 0 evaluates on the validation split, writes a checkpoint
    (weights + training state) to a temporary directory, and every rank calls
    ``report(metrics, checkpoint_dir_or_None)``; the directory is deleted after ``report``
    returns, so a reporter must copy what it keeps. ``resume_from`` continues from such
    a checkpoint (epochs already done are skipped). What a model's loss needs from disk (the
    VAE's perceptual network, ``mve.perceptual``) is loaded here and injected into the model.
    Rank 0 hands every epoch to ``track`` (TensorBoard, MLflow: ``mve.tracking``) and closes it
    at the end.
    """
    run = _setup(cfg, data, torch.device(device), rank=rank, world_size=world_size,
                 resume_from=resume_from, wrap_model=wrap_model)
    track = track if rank == 0 else None
    show = progress and rank == 0
    metrics: dict[str, Any] = {}
    try:
        for epoch in tqdm(range(run.start_epoch, cfg.epochs), desc=f"{cfg.model} epochs",
                          disable=not show, unit="epoch", initial=run.start_epoch,
                          total=cfg.epochs):
            metrics = _run_epoch(run, epoch, show)
            done = epoch + 1
            if track is not None:
                with _averaged(run.averager, run.net):  # the weights validation saw
                    track.epoch(metrics, run.net, last=done == cfg.epochs)
            ckpt_dir = None
            if rank == 0 and (done % checkpoint_every == 0 or done == cfg.epochs):
                ckpt_dir = _save_epoch_checkpoint(run, done, metrics)
            _report(report, metrics, ckpt_dir)
    finally:
        if track is not None:
            track.close()
    _keep_average(run)
    return FitResult(run.net, run.history, metrics)


# -- fit: setup and resume --------------------------------------------------------------

@dataclass
class _Run:
    """What ``fit`` sets up once and every epoch reads (``history`` and ``train_time`` grow)."""

    cfg: TrainConfig
    data: DataBundle
    device: torch.device
    rank: int
    world_size: int
    task: str
    prep: dict[str, Any]
    net: nn.Module  # the bare model: averaged, checkpointed and returned
    model: nn.Module  # ``net`` as trained: wrapped by ``wrap_model`` and torch.compile
    train_loader: TensorLoader
    val_loader: TensorLoader | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    averager: WeightAverager | None
    step_fn: Stepper
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    train_time: float = 0.0  # seconds of training over all epochs, resumed ones included


def _setup(cfg: TrainConfig, data: DataBundle, device: torch.device, *, rank: int,
           world_size: int, resume_from: str | Path | None,
           wrap_model: Callable[[nn.Module], nn.Module] | None) -> _Run:
    """Seeds, checks the data, builds (or resumes) the model, its loaders, optimiser, schedule
    and weight averager."""
    torch.manual_seed(cfg.seed + rank)
    fitted = cfg.fitted_to(len(data.train), world_size)
    if fitted is not cfg:
        logger.info("%d training images: batch %d -> %d and lr %.4g -> %.4g, for at least %d "
                    "steps per epoch (min_steps_per_epoch)", len(data.train), cfg.batch_size,
                    fitted.batch_size, cfg.optim.lr, fitted.optim.lr, cfg.min_steps_per_epoch)
        cfg = fitted
    if rank == 0:
        _warn_few_steps(cfg, len(data.train), world_size)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    task = get_spec(cfg.model).task
    _check_classes(cfg, task, data)
    prep = preprocessing_for(cfg, data)
    net = _build_model(cfg, device)
    start_epoch, history, state = 0, [], None
    if resume_from is not None:
        start_epoch, history, state = _resume_weights(net, resume_from)
    elif hasattr(net, "init_from_data"):
        net.init_from_data(_init_batch(data.train, prep, device, num_classes=len(data.class_names),
                                       seed=cfg.seed))
    model = wrap_model(net) if wrap_model is not None else net
    if cfg.compile:
        model = torch.compile(model)
    train_loader, val_loader = _loaders(cfg, data, prep, rank=rank, world_size=world_size,
                                        device=device)
    total_steps = cfg.epochs * len(train_loader)
    optimizer, scheduler = _optimization(cfg, net, model, len(train_loader))
    averager = (WeightAverager(net, mode=cfg.averaging, decay=cfg.averaging_decay,
                               every=cfg.averaging_every, total_steps=total_steps)
                if cfg.averaging != "none" else None)
    if state is not None:
        _restore_training_state(state, optimizer, scheduler, averager)
    step_fn = _step_fn(cfg, task, prep, data, device)
    train_time = float(history[-1].get("train_time_s", 0.0)) if history else 0.0
    return _Run(cfg=cfg, data=data, device=device, rank=rank, world_size=world_size, task=task,
                prep=prep, net=net, model=model, train_loader=train_loader,
                val_loader=val_loader, optimizer=optimizer, scheduler=scheduler,
                averager=averager, step_fn=step_fn, start_epoch=start_epoch, history=history,
                train_time=train_time)


def _optimization(cfg: TrainConfig, net: nn.Module, model: nn.Module, steps_per_epoch: int
                  ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimiser and schedule; with ``whiten_bias_epochs`` the whitening bias (of a net
    that has one) gets lr 0 after that many epochs."""
    bias = getattr(net, "whitening_bias", lambda: None)()
    freeze = cfg.whiten_bias_epochs is not None and bias is not None
    optimizer = build_optimizer(model, cfg.optim, freeze_later=[bias] if freeze else ())
    scheduler = build_scheduler(optimizer, cfg.epochs * steps_per_epoch, cfg.optim,
                                freeze_step=cfg.whiten_bias_epochs * steps_per_epoch
                                if freeze else None)
    return optimizer, scheduler


def _step_fn(cfg: TrainConfig, task: str, prep: Mapping[str, Any], data: DataBundle,
             device: torch.device) -> Stepper:
    """The training step: a classifier with ``distill.teacher`` learns from it too."""
    if cfg.distill.teacher is None:
        return step_for(task, cfg.label_smoothing)
    if task != "classification":
        raise ValueError("distill.teacher is for classifiers only")
    teacher = load_teacher(cfg.distill, prep, list(data.class_names), device)
    return distill_step(teacher, cfg.distill, cfg.label_smoothing)


_warned_few_steps: set[str] = set()


def _warn_few_steps(cfg: TrainConfig, train_size: int, world_size: int) -> None:
    """The warning of ``TrainConfig.few_steps_note``, once per process for the same sizes."""
    note = cfg.few_steps_note(train_size, world_size)
    if note is not None and note not in _warned_few_steps:
        _warned_few_steps.add(note)
        logger.warning(note)


def _check_classes(cfg: TrainConfig, task: str, data: DataBundle) -> None:
    names = list(data.class_names)
    if task == "classification" and cfg.model_config.num_classes != len(names):
        raise ValueError(f"model.num_classes={cfg.model_config.num_classes} but the data has "
                         f"{len(names)} classes ({', '.join(names)})")


def _build_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The model on ``device``, with the collaborators its loss needs injected: models do no
    I/O, so what a loss reads from disk (the perceptual network) is loaded here."""
    model = build_model(cfg.model, cfg.model_config).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    mc = cfg.model_config
    if getattr(mc, "perceptual_weight", 0) > 0:
        model.set_perceptual(perceptual_network(mc.perceptual_classifier, device,
                                                stages=mc.perceptual_layers))
    return model


def _resume_weights(model: nn.Module, path: str | Path
                    ) -> tuple[int, list[dict[str, Any]], dict[str, Any] | None]:
    """Loads the weights saved at ``path`` into ``model``; returns the epochs done, the history
    and the training state (None for a weights-only checkpoint)."""
    weights, state = load_resume_state(path)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: its weights do not fit this run's model (resume with "
                              f"the config it was trained with): {exc}") from None
    start_epoch, history = 0, []
    if state is not None:
        start_epoch, history = int(state["epoch"]), list(state.get("history", []))
        if "raw_model" in state:  # EMA runs save the average; training resumes on the raw
            model.load_state_dict({**model.state_dict(), **state["raw_model"]})
    logger.info("resuming from %s at epoch %d", path, start_epoch)
    return start_epoch, history, state


def _loaders(cfg: TrainConfig, data: DataBundle, prep: Mapping[str, Any], *, rank: int,
             world_size: int, device: torch.device) -> tuple[TensorLoader, TensorLoader | None]:
    """This rank's training loader and, when the data has a validation split, its loader."""
    train = make_loader(data.train, cfg, prep, train=True, rank=rank, world_size=world_size,
                        device=device)
    val = (make_loader(data.val, cfg, prep, train=False, device=device)
           if data.val is not None and len(data.val) else None)
    return train, val


def _restore_training_state(state: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                            scheduler: torch.optim.lr_scheduler.LRScheduler,
                            averager: WeightAverager | None) -> None:
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if averager is not None and "averager" in state:
        averager.load_state_dict(state["averager"])


# -- fit: one epoch and its validation ----------------------------------------------------

def _run_epoch(run: _Run, epoch: int, show: bool) -> dict[str, Any]:
    """Trains epoch ``epoch`` (0-based), validates on rank 0 and appends to the history; returns
    the epoch's metrics (with the full validation results under ``_val_details``)."""
    cfg, steps = run.cfg, len(run.train_loader)
    run.train_loader.set_epoch(epoch)
    train_m = train_one_epoch(run.model, run.train_loader, run.optimizer, run.scheduler,
                              run.step_fn, device=run.device, precision=cfg.precision,
                              grad_clip=cfg.optim.grad_clip, world_size=run.world_size,
                              progress=show, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                              averager=run.averager, start_step=epoch * steps,
                              total_steps=cfg.epochs * steps)
    run.train_time += train_m["time_s"]
    metrics = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in train_m.items()},
               "train_time_s": run.train_time}
    if run.rank == 0 and run.val_loader is not None:
        metrics.update(_validate(run))
    run.history.append({k: v for k, v in metrics.items() if not k.startswith("_")})
    if run.rank == 0:
        logger.info("epoch %d: %s", epoch + 1, _brief(run.history[-1]))
    return metrics


def _validate(run: _Run) -> dict[str, Any]:
    """Validation of the (averaged) model: ``val_time_s``, the scalar metrics prefixed
    ``val_``, and everything ``evaluate`` returned under ``_val_details``."""
    t0 = time.perf_counter()
    with _averaged(run.averager, run.net):
        val_m = evaluate(run.model, run.val_loader, task=run.task, device=run.device,
                         class_names=list(run.data.class_names), precision=run.cfg.precision)
    out: dict[str, Any] = {"val_time_s": time.perf_counter() - t0}
    out.update({f"val_{k}": v for k, v in val_m.items()
                if isinstance(v, int | float) and k != "num_samples"})
    out["_val_details"] = val_m
    return out


# -- fit: checkpoints and reports ---------------------------------------------------------

def _save_epoch_checkpoint(run: _Run, epochs_done: int, metrics: Mapping[str, Any]) -> Path:
    """Writes the weights (the average, for EMA) and the training state to a new temporary
    directory; returns it (``fit`` deletes it once reported)."""
    cfg = run.cfg
    ckpt_dir = Path(tempfile.mkdtemp(prefix="mve-ckpt-")) / "checkpoint"
    training_state = _training_state(run, epochs_done)  # before averaging: keeps raw weights
    with _averaged(run.averager, run.net):
        save_checkpoint(
            ckpt_dir, run.net, model_name=cfg.model, model_config=cfg.model_config,
            preprocessing=run.prep, class_names=list(run.data.class_names),
            metrics=_checkpoint_metrics(metrics), provenance=run.data.provenance,
            train_config=cfg.to_dict(), training_state=training_state)
    return ckpt_dir


def _training_state(run: _Run, epochs_done: int) -> dict[str, Any]:
    """What resuming needs beyond the weights; EMA runs also keep the raw (unaveraged) ones."""
    state: dict[str, Any] = {"epoch": epochs_done, "history": run.history,
                             "optimizer": run.optimizer.state_dict(),
                             "scheduler": run.scheduler.state_dict()}
    averager = run.averager
    if averager is not None:
        state["averager"] = averager.state_dict()
        if averager.mode == "ema":
            state["raw_model"] = {k: v.detach().clone() for k, v in run.net.state_dict().items()
                                  if v.is_floating_point()}
    return state


def _report(report: Reporter | None, metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
    """Calls ``report`` (when given), then deletes the temporary checkpoint whatever happens."""
    try:
        if report is not None:
            report(metrics, ckpt_dir)
    finally:
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir.parent, ignore_errors=True)


def _keep_average(run: _Run) -> None:
    """EMA runs return the model with the averaged weights."""
    averager = run.averager
    if averager is None or averager.mode != "ema":
        return
    with torch.no_grad():
        for k, v in run.net.state_dict().items():
            if k in averager.avg:
                v.copy_(averager.avg[k])


def _averaged(averager: WeightAverager | None, net: nn.Module):
    return averager.averaged(net) if averager is not None else contextlib.nullcontext(net)


def _init_batch(split: Split, prep: Mapping[str, Any], device: torch.device, *,
                num_classes: int, seed: int, n: int = 5000) -> torch.Tensor:
    """``n`` training images drawn per class in proportion, seeded, normalised: the data for
    data-dependent init (the whitening layer). Identical on every rank, so replicas start
    equal. Not the first ``n``: a split keeps its source's order, which for an image folder
    is by class (the first 5,000 CIFAR-10 images were 4,500 airplanes)."""
    sample = stratified_subset(split, n, num_classes, seed=seed)
    return normalize(sample.images.to(device), prep["mean"], prep["std"])


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
