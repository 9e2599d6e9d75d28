"""What runs inside Ray for each trial: a single-worker trainable, or a driver of a Train run.

Both get their sampled params as ``config`` and everything else as ``setup`` (through
``tune.with_parameters``); the trial's config is the search's base config (which records the
resolved data path) plus the sampled params.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cluster.search import trial_config
from cluster.tune.settings import TuneSettings

__all__ = ["DRIVER_MEMORY", "trial_setup", "trainable", "train_trial", "train_driver_fn"]

DRIVER_MEMORY = 64 * 1024 * 1024  # logical bytes reserved by a Train-run trial's driver (no CPU)


def _trial_logging(level: int) -> None:
    """mve's epoch lines only with -v 2; Ray's per-checkpoint INFO lines likewise."""
    from mve.logs import plain_stderr

    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(min(max(level, logging.INFO), logging.WARNING))
    plain_stderr("mve", level)


def train_trial(config: dict[str, Any], setup: Mapping[str, Any]) -> None:
    """Single-worker trial: ``mve.train.fit`` in this process, one report per epoch.

    Resumes from ``ray.tune.get_checkpoint()`` (copied to a local temp dir) when Tune restarts
    the trial. Reports mve's scalar metrics plus ``node_id``.
    """
    import ray
    import ray.tune

    from cluster.common import fetch_checkpoint, scalar_metrics
    from cluster.tracking import worker_tracker
    from mve.data import load_data
    from mve.train import fit

    _trial_logging(setup.get("log_level", logging.INFO))
    cfg = trial_config(setup["train"], config)
    device = "cuda" if setup.get("use_gpu") else "cpu"
    data = load_data(cfg.data.path, val_size=cfg.data.val_size, seed=cfg.data.split_seed,
                     limit=cfg.data.limit, image_size=cfg.data.image_size,
                     cache_dir=setup.get("cache_dir"))
    node_id = ray.get_runtime_context().get_node_id()

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        flat = scalar_metrics(metrics)
        # Tune's progress table shows the first four metrics: put the informative ones first.
        first = [k for k in setup.get("show_first", ()) if k in flat]
        flat = {**{k: flat[k] for k in first}, **flat, "node_id": node_id}
        ckpt = ray.tune.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None
        ray.tune.report(flat, checkpoint=ckpt)

    tb = setup.get("tensorboard") or {}
    trial_id = ray.tune.get_context().get_trial_id()
    # no MLflow here: the driver's callback keeps each trial's MLflow run
    track, logdir = worker_tracker(
        {"tensorboard": bool(tb)}, storage_path=tb.get("storage_path", ""),
        fs=tb.get("storage_fs"), rel=f"{tb.get('experiment')}/trial_{trial_id}",
        hparams=dict(config), cfg=cfg, data=data)
    try:
        with tempfile.TemporaryDirectory(prefix="mve-tune-resume-") as tmp:
            resume = None
            latest = ray.tune.get_checkpoint()
            if latest is not None:
                resume = fetch_checkpoint(latest, Path(tmp) / "ckpt")
            fit(cfg, data, device=device, report=report, resume_from=resume, progress=False,
                track=track)
    finally:
        if logdir is not None:
            logdir.cleanup()


def train_driver_fn(config: dict[str, Any], setup: Mapping[str, Any]) -> None:
    """Data-parallel trial: drives a Ray Train V2 run named after the trial.

    ``TuneReportCallback`` forwards rank 0's metrics and the Train checkpoint's path
    (``checkpoint_path``); Tune itself holds no checkpoint for these trials. The deterministic
    name makes a restarted trial resume its Train run from the run's latest checkpoint.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cluster.train import ClusterConfig, build_trainer

    _trial_logging(setup.get("log_level", logging.INFO))
    cfg = trial_config(setup["train"], config)
    cluster = ClusterConfig(**setup["cluster"])
    trial_id = ray.tune.get_context().get_trial_id()
    tracking = {"tensorboard": bool(setup.get("tensorboard")), "hparams": dict(config)}
    trainer = build_trainer(cfg, cluster, cfg.data.path, name=f"train-trial_id={trial_id}",
                            callbacks=[TuneReportCallback()], cache_dir=setup.get("cache_dir"),
                            tracking=tracking)
    trainer.fit()


def trial_setup(s: TuneSettings, storage_path: str, storage_fs: Any | None = None
                ) -> dict[str, Any]:
    """What every trial gets besides its sampled params (via ``tune.with_parameters``);
    ``tensorboard`` says where a single-worker trial's event files go (its trial directory;
    a Train-run trial's go into its Train run's directory), or is None when they are off."""
    from mve.models import get_spec

    if s.storage and "://" in s.storage:
        train_storage = f"{s.storage.rstrip('/')}/{s.name}"
    else:
        train_storage = f"{storage_path.rstrip('/')}/{s.name}"
    second = "val_loss" if get_spec(s.model).task == "classification" else "val_psnr"
    return {
        "train": s.base.to_dict(),
        "cache_dir": os.environ.get("MVE_CACHE_DIR"), "use_gpu": s.gpus_per_trial > 0,
        "log_level": logging.INFO if s.verbose >= 2 else logging.WARNING,
        "show_first": [s.metric, second, "train_loss", "train_images_per_s"],
        "tensorboard": {"storage_path": storage_path, "storage_fs": storage_fs,
                        "experiment": s.name} if s.tracking.tensorboard else None,
        "cluster": {"num_workers": s.workers_per_trial, "use_gpu": s.gpus_per_trial > 0,
                    "cpus_per_worker": s.cpus_per_trial,
                    "gpus_per_worker": s.gpus_per_trial or 1.0,
                    "storage": train_storage, "s3_endpoint": s.s3_endpoint},
    }


def trainable(s: TuneSettings, setup: dict[str, Any]) -> Any:
    """The Tune trainable with its resources: one trial process, or a driver of W workers."""
    from ray import tune

    if s.workers_per_trial == 1:
        res: dict[str, float] = {"CPU": s.cpus_per_trial}
        if s.gpus_per_trial > 0:
            res["GPU"] = s.gpus_per_trial
        return tune.with_resources(tune.with_parameters(train_trial, setup=setup), res)
    return tune.with_resources(tune.with_parameters(train_driver_fn, setup=setup),
                               {"CPU": 0, "memory": DRIVER_MEMORY})
