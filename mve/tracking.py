"""Experiment tracking of a training run: mve's own TensorBoard event files, and MLflow.

:class:`EpochTracker` is what ``mve.train.fit`` calls on rank 0 after every epoch. It writes

- the epoch's scalars (losses, accuracy or bits/dim, PSNR, lr, images/s) as TensorBoard tags
  ``train/loss``, ``val/accuracy``, ... and as MLflow metrics ``train_loss``, ``val_accuracy``;
- for the VAE, reconstructions of 8 fixed validation images and 8 prior samples every
  ``image_every`` epochs and after the last one (TensorBoard ``vae/reconstructions`` with the
  originals in the first row, ``vae/samples``);
- after the first epoch, the hyperparameters through TensorBoard's hparams plugin, naming the
  ``val/...`` scalars as its metrics, so ``tensorboard --logdir`` on a search's storage shows
  every trial in one table with its latest metrics (written first, not at the end: a trial that
  ASHA stops, or a killed worker, still has its row).

The writer is ``torch.utils.tensorboard`` (PyTorch's own, over the ``tensorboard`` package's
event format and the hparams plugin's protos); without the package a run logs one warning and
trains on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mve.data.transforms import denormalize_to_uint8, normalize
from mve.mlflow_runs import EXPERIMENT, MlflowRun, scalar_metrics, tracking_uri

__all__ = ["TensorBoardLog", "EpochTracker", "TrackingOptions", "publish_to_mlflow", "tag_of"]

logger = logging.getLogger(__name__)

_IMAGES = 8  # VAE images per grid


def tag_of(metric: str) -> str:
    """``train_loss`` -> ``train/loss``: TensorBoard groups tags by what precedes the slash."""
    head, sep, rest = metric.partition("_")
    return f"{head}/{rest}" if sep and head in ("train", "val") else metric


class TensorBoardLog:
    """Event files in ``logdir`` (``None``, or no ``tensorboard`` package: every call no-ops)."""

    def __init__(self, logdir: str | Path | None) -> None:
        self.writer: Any = None
        if logdir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("TensorBoard logging is off: the tensorboard package is not "
                           "installed (pip install tensorboard)")
            return
        self.logdir = Path(logdir)
        self.writer = SummaryWriter(str(logdir), flush_secs=30)

    def scalars(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in scalar_metrics(metrics).items():
            if key != "epoch":
                self.writer.add_scalar(tag_of(key), value, step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """``uint8 [N, 3, H, W]`` as one grid."""
        if self.writer is not None:
            self.writer.add_images(tag, images, step, dataformats="NCHW")

    def hparams(self, params: Mapping[str, Any], metrics: Sequence[str]) -> None:
        """The hparams plugin's records in this run's own directory (``add_hparams`` would
        write them into a new timestamped subdirectory, a second "run" per trial, and log the
        metrics once more). ``metrics`` name scalars of this run; the plugin shows their
        latest values."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, int | float | str | bool) else str(v)
                  for k, v in params.items()}
        for summary in hparams(values, {tag_of(k): 0.0 for k in metrics}):
            self.writer.file_writer.add_summary(summary)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class EpochTracker:
    """Rank 0's tracking: TensorBoard and MLflow, fed after every epoch by ``fit``."""

    def __init__(self, *, logdir: str | Path | None, mlflow: MlflowRun | None = None,
                 hparams: Mapping[str, Any] | None = None, image_every: int = 5,
                 after_flush: Callable[[], None] | None = None) -> None:
        self.tb = TensorBoardLog(logdir)
        self.mlflow = mlflow or MlflowRun()
        self.hparams = dict(hparams or {})
        self.image_every = max(1, image_every)
        self.after_flush = after_flush  # e.g. mirror the files to object storage
        self._vae_inputs: torch.Tensor | None = None
        self._hparams_written = False

    def watch_images(self, images: torch.Tensor, preprocessing: Mapping[str, Any]) -> None:
        """The validation images whose reconstructions are drawn (a VAE's ``uint8`` split)."""
        x = images[:_IMAGES]
        self._prep = dict(preprocessing)
        self._vae_inputs = normalize(x, self._prep["mean"], self._prep["std"])

    def epoch(self, metrics: Mapping[str, Any], net: nn.Module, *, last: bool) -> None:
        """One epoch's metrics (and, every ``image_every`` epochs, the VAE's pictures)."""
        step = int(metrics["epoch"])
        self.tb.scalars(metrics, step)
        self.mlflow.log_metrics(metrics, step)
        if not self._hparams_written and self.hparams:
            shown = [k for k in scalar_metrics(metrics) if k.startswith("val_")]
            self.tb.hparams(self.hparams, shown)
            self._hparams_written = True
        if self._vae_inputs is not None and (step % self.image_every == 0 or last):
            self._draw(net, step)
        self.flush()

    def flush(self) -> None:
        self.tb.flush()
        if self.after_flush is not None and self.tb.writer is not None:
            self.after_flush()

    @torch.no_grad()
    def _draw(self, net: nn.Module, step: int) -> None:
        was_training = net.training
        net.eval()
        try:
            device = next(net.parameters()).device
            x = self._vae_inputs.to(device)
            recon = net.reconstruct(x).float().cpu()
            samples = net.sample(_IMAGES, seed=0).float().cpu()
        finally:
            net.train(was_training)
        mean, std = self._prep["mean"], self._prep["std"]
        pixels = denormalize_to_uint8(torch.cat([x.cpu(), recon]), mean, std)
        self.tb.images("vae/reconstructions", pixels, step)
        self.tb.images("vae/samples", denormalize_to_uint8(samples, mean, std), step)

    def close(self) -> None:
        """Closes the event files (mirrored once more when they live elsewhere)."""
        if self.tb.writer is not None:
            self.flush()
        self.tb.close()


@dataclass(frozen=True)
class TrackingOptions:
    """What ``--no-tensorboard``, ``--mlflow``, ``--mlflow-experiment`` and
    ``--register-model`` ask for (the defaults: event files on, MLflow off)."""

    tensorboard: bool = True
    mlflow: str | None = None  # the tracking URI, $MLFLOW_TRACKING_URI already applied
    experiment: str = EXPERIMENT
    register_as: str | None = None

    @classmethod
    def from_args(cls, args: Any) -> TrackingOptions:
        return cls(tensorboard=getattr(args, "tensorboard", True),
                   mlflow=tracking_uri(getattr(args, "mlflow", None)),
                   experiment=getattr(args, "mlflow_experiment", None) or EXPERIMENT,
                   register_as=getattr(args, "register_model", None))

    def start_mlflow(self, run_name: str, *, params: Mapping[str, str] | None = None,
                     tags: Mapping[str, str] | None = None,
                     parent_run_id: str | None = None) -> MlflowRun:
        return MlflowRun.start(self.mlflow, run_name=run_name, params=params, tags=tags,
                               parent_run_id=parent_run_id, experiment=self.experiment)


def publish_to_mlflow(run: MlflowRun, out: Path, *, register_as: str | None) -> str | None:
    """A finished run's checkpoint directory ``out`` (its top-level files: weights, mve.json,
    config, REPORT.md, plots) as the artifact ``checkpoint/``, REPORT.md also at the top, and
    with ``register_as`` a new version of that registered model; returns the version."""
    if not run.active:
        return None
    for f in sorted(p for p in Path(out).iterdir() if p.is_file()):
        run.log_artifacts(f, "checkpoint")
    run.log_artifacts(Path(out) / "REPORT.md")
    version = run.register(register_as, "checkpoint") if register_as else None
    if version is not None:
        logger.info("MLflow: registered %s version %s", register_as, version)
    return version
