"""Data-parallel training of mve models on Ray Train (V2), CPU (gloo) or GPU (NCCL).

    python -m cluster.train classifier --data PATH --workers 2 --epochs 10 --out runs/ray-demo
    ray job submit --working-dir . -- python -m cluster.train classifier --data /mnt/data --workers 4 --gpu

A thin adapter: every worker runs ``mve.train.fit`` with a reporter that calls
``ray.train.report`` (every rank reports; rank 0 attaches the checkpoint) and
``prepare_model`` for DDP. Reusing the storage path and run name resumes the run from its
latest checkpoint (Train V2 has no ``restore``: the controller finds the run's snapshot
and ``ray.train.get_checkpoint()`` hands the checkpoint to the workers).

Checkpoints reach storage (a path or ``s3://``) through :func:`upload_checkpoint`, which
writes ``mve.json``, the manifest that records every file's sha256, last: object stores have
no rename, so the manifest is the commit record. Ray registers a checkpoint in the run's
snapshot only after its upload returned, and a resume verifies the checkpoint it is handed
(every file present, hashes matching) before training from it, falling back to the newest
earlier reported checkpoint that verifies.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from cluster.checkpoints import resume_point, upload_checkpoint
from cluster.common import check_gpus, fetch_checkpoint, init_ray, scalar_metrics
from cluster.options import ClusterConfig, train_parser
from cluster.torch_backend import LoopbackStoreTorchConfig
from cluster.tracking import tracking_setup, worker_tracker
from mve import local_train
from mve.checkpoint import load_checkpoint
from mve.config import TrainConfig
from mve.data import load_data, resolve_data_path
from mve.errors import run_command
from mve.logs import driver_level, plain_stderr, setup_logging, worker_logging
from mve.metrics import per_class_table
from mve.mlflow_runs import MlflowRun, flat_params, flat_values
from mve.models import target_metric
from mve.options import train_config_from_args
from mve.report import run_info, write_json
from mve.runs import finalize_run
from mve.storage import resolve_storage
from mve.tracking import TrackingOptions, publish_to_mlflow
from mve.train import fit

__all__ = ["ClusterConfig", "train_fn_per_worker", "upload_checkpoint", "build_trainer",
           "run_name", "run_training", "run_from_args", "run", "main"]

logger = logging.getLogger(__name__)


class _TrainMetrics:
    """Prometheus metrics of a run through Ray's metrics system, tagged by run and model."""

    def __init__(self, run: str, model: str):
        from ray.util.metrics import Gauge

        self.tags = {"run": run, "model": model}
        keys = ("run", "model")
        self.gauges = {
            "train_images_per_s": Gauge("mve_train_images_per_second",
                                        "Training throughput of the last epoch", tag_keys=keys),
            "train_loss": Gauge("mve_train_loss", "Mean training loss of the last epoch",
                                tag_keys=keys),
            "epoch": Gauge("mve_train_epoch", "Epochs completed", tag_keys=keys),
            "val_accuracy": Gauge("mve_val_accuracy", "Validation accuracy (classifier)",
                                  tag_keys=keys),
            "val_loss": Gauge("mve_val_loss", "Validation loss", tag_keys=keys),
            "val_elbo_bpd": Gauge("mve_val_elbo_bits_per_dim", "Validation ELBO (VAE)",
                                  tag_keys=keys),
        }

    def record(self, metrics: Mapping[str, Any]) -> None:
        for key, gauge in self.gauges.items():
            if isinstance(metrics.get(key), int | float):
                gauge.set(float(metrics[key]), tags=self.tags)


def _maybe_inject_failure(spec: Mapping[str, Any] | None, epoch: int, rank: int) -> None:
    """Test hook: kill this worker process once, after ``epoch`` was reported on ``rank``."""
    if not spec or spec.get("epoch") != epoch or spec.get("rank", 0) != rank:
        return
    marker = Path(spec["marker"])
    if marker.exists():
        return
    marker.write_text(f"killed rank {rank} after epoch {epoch}\n")
    logger.warning("injected failure: killing worker rank %d after epoch %d", rank, epoch)
    os._exit(1)


def train_fn_per_worker(config: dict) -> None:
    """Ray Train worker: rebuilds the typed config and runs ``mve.train.fit``."""
    # which checkpoint a worker resumes from reaches the driver's output, like mve's epochs
    level = config.get("log_level", logging.INFO)  # the driver's -q/-v
    worker_logging(level)
    plain_stderr("cluster", level)

    cfg = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    data = load_data(cfg.data.path, val_size=cfg.data.val_size, seed=cfg.data.split_seed,
                     limit=cfg.data.limit, image_size=cfg.data.image_size,
                     cache_dir=config.get("cache_dir"))
    metrics_sink = _TrainMetrics(ctx.get_experiment_name(), cfg.model) if rank == 0 else None
    track, logdir = (_rank0_tracker(config.get("tracking"), cfg, data) if rank == 0
                     else (None, None))
    node_id = ray.get_runtime_context().get_node_id()

    with tempfile.TemporaryDirectory(prefix="mve-resume-") as tmp:
        resume, resumed_from = resume_point(Path(tmp), rank)

        def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
            # resumed_from_epoch: the epoch this worker group started after (0: from scratch)
            flat = {**scalar_metrics(metrics), "resumed_from_epoch": resumed_from,
                    "node_id": node_id}
            if metrics_sink is not None:
                metrics_sink.record(flat)
            ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None
            ray.train.report(flat, checkpoint=ckpt,
                             checkpoint_dir_name=f"epoch_{metrics['epoch']:04d}" if ckpt else None,
                             checkpoint_upload_fn=upload_checkpoint if ckpt else None)
            _maybe_inject_failure(config.get("inject_failure"), metrics["epoch"], rank)

        try:
            fit(cfg, data, device=device, rank=rank, world_size=world, report=report,
                resume_from=resume, progress=False, wrap_model=ray.train.torch.prepare_model,
                track=track)
        finally:
            if logdir is not None:
                logdir.cleanup()


def _rank0_tracker(setup: Mapping[str, Any] | None, cfg: TrainConfig, data: Any) -> Any:
    """Event files in ``tensorboard/`` of the run's directory in storage (a search's storage
    root for a Train-run trial) and the driver's MLflow run; ``setup["hparams"]``, or the
    flattened config, as the run's hyperparameters."""
    storage = ray.train.get_context().get_storage()
    setup = dict(setup or {})
    hparams = setup.get("hparams") or flat_values(cfg.to_dict())
    return worker_tracker(setup, storage_path=storage.experiment_fs_path,
                          fs=storage.storage_filesystem, rel="tensorboard", hparams=hparams,
                          cfg=cfg, data=data)


def run_name(cfg: TrainConfig, data_path: str, cluster: ClusterConfig) -> str:
    """Deterministic: the same config, data and worker count give the same name (and resume)."""
    h = hashlib.sha256()
    h.update(cfg.to_yaml().encode())
    h.update(str(Path(data_path).absolute()).encode())
    h.update(f"{cluster.num_workers}-{cluster.use_gpu}".encode())
    return f"mve-{cfg.model}-{h.hexdigest()[:10]}"


def build_trainer(cfg: TrainConfig, cluster: ClusterConfig, data_path: str, *, name: str,
                  callbacks: Sequence[Any] = (), cache_dir: str | None = None,
                  inject_failure: Mapping[str, Any] | None = None,
                  tracking: Mapping[str, Any] | None = None) -> ray.train.torch.TorchTrainer:
    """A Train V2 ``TorchTrainer`` running ``train_fn_per_worker`` on ``cluster.num_workers``;
    ``tracking`` is what rank 0 tracks (``cluster.tracking.tracking_setup``; default: event
    files only)."""
    if cluster.use_gpu and cfg.precision == "fp32":
        cfg = dataclasses.replace(cfg, precision="bf16")
    cfg = cfg.with_data_path(Path(data_path).absolute())
    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = cluster.gpus_per_worker
    storage_path, fs = resolve_storage(cluster.storage, s3_endpoint=cluster.s3_endpoint)
    metric, mode = target_metric(cfg.model)
    run_config = RunConfig(
        name=name, storage_path=storage_path, storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=cluster.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cluster.num_to_keep,
                                           checkpoint_score_attribute=metric,
                                           checkpoint_score_order=mode),
        callbacks=list(callbacks),
        # Ray Train's own progress lines (resources, worker group, reports) only with -v
        logging_config=ray.train.LoggingConfig(
            log_level="INFO" if driver_level() < logging.INFO else "WARNING"))
    loop_config = {"train": cfg.to_dict(),
                   "cache_dir": cache_dir or os.environ.get("MVE_CACHE_DIR"),
                   "inject_failure": dict(inject_failure) if inject_failure else None,
                   "tracking": dict(tracking) if tracking else None,
                   "log_level": driver_level()}
    return ray.train.torch.TorchTrainer(
        train_fn_per_worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu,
                                     resources_per_worker=resources),
        torch_config=LoopbackStoreTorchConfig(), run_config=run_config)


def run_training(cfg: TrainConfig, cluster: ClusterConfig, data_path: str, *, out: str | Path,
                 name: str | None = None, address: str | None = None,
                 inject_failure: Mapping[str, Any] | None = None,
                 tracking: TrackingOptions | None = None) -> dict[str, Any]:
    """Runs a Train job and writes the final checkpoint and report into ``out``; with
    ``tracking.mlflow`` the run is an MLflow run (params here, metrics from rank 0, the
    checkpoint and report once ``out`` is written)."""
    tracking = tracking or TrackingOptions()
    name = name or run_name(cfg, data_path, cluster)
    cfg = cfg.with_data_path(Path(data_path).absolute())  # the saved config records its data
    started = init_ray(address)
    mlflow = MlflowRun()
    try:
        check_gpus(cluster.gpus_per_worker if cluster.use_gpu else 0, embedded=started,
                   what="--gpu (one per worker)")
        logger.info("Ray Train run %s: %d worker(s), gpu=%s", name, cluster.num_workers,
                    cluster.use_gpu)
        mlflow = tracking.start_mlflow(name, params=flat_params(cfg.to_dict()), tags={
            "mve.run": "ray-train", "mve.command": run_info()["command"],
            "mve.workers": str(cluster.num_workers)})
        result = build_trainer(cfg, cluster, data_path, name=name, inject_failure=inject_failure,
                               tracking=tracking_setup(tracking, mlflow)).fit()
        if result.error is not None:
            raise RuntimeError(f"Ray Train run {name} failed: {result.error}")
        if result.checkpoint is None:
            raise RuntimeError(f"Ray Train run {name} finished without a checkpoint")
        with tempfile.TemporaryDirectory(prefix="mve-final-") as tmp:
            # fetched and opened once: the report, history and published model all read it
            final = load_checkpoint(fetch_checkpoint(result.checkpoint, Path(tmp) / "final"))
            data = load_data(data_path, val_size=cfg.data.val_size, seed=cfg.data.split_seed,
                             limit=cfg.data.limit, image_size=cfg.data.image_size)
            details = finalize_run(out, final, cfg=cfg, command=run_info()["command"],
                                   val_images=data.showcase_images())
        summary = {"run_name": name, "storage": str(result.path), "out": str(out),
                   "checkpoint": str(result.checkpoint.path),
                   "metrics": scalar_metrics(result.metrics or {}), "details": details}
        write_json(Path(out) / "ray_run.json", summary)
        publish_to_mlflow(mlflow, Path(out), register_as=tracking.register_as)
        mlflow.end()
        return summary
    except BaseException:
        mlflow.end("FAILED")
        raise
    finally:
        if started:
            ray.shutdown()


def run_from_args(args: argparse.Namespace) -> int:
    """``mve train`` without ``--local``."""
    from mve.runs import run_summary

    cfg = train_config_from_args(args)
    data_path = str(resolve_data_path(args.data or cfg.data.path))
    cluster = ClusterConfig(num_workers=args.workers, use_gpu=args.gpu,
                            cpus_per_worker=args.cpus_per_worker, storage=args.storage,
                            s3_endpoint=args.s3_endpoint, max_failures=args.max_failures,
                            num_to_keep=args.keep_checkpoints)
    out = args.out or f"runs/{cfg.model}-ray"
    summary = run_training(cfg, cluster, data_path, out=out, name=args.name, address=args.address,
                           tracking=TrackingOptions.from_args(args))
    if "per_class" in summary["details"]:
        print(per_class_table(summary["details"]))
    print(run_summary(out, title=f"mve train {cfg.model} on Ray Train ({cfg.epochs} epoch(s), "
                                 f"{cluster.num_workers} worker(s)): done",
                      extra=[("ray run", str(summary["storage"])),
                             *([("tensorboard", f"tensorboard --logdir {summary['storage']}")]
                               if args.tensorboard else [])]))
    return 0


def run(args: argparse.Namespace) -> int:
    """``mve train`` and ``python -m cluster.train``: on Ray Train, or in-process with --local."""
    if args.model == "prior":
        from cluster import prior_train
        from mve import prior_run

        return prior_run.run_from_args(args) if args.local else prior_train.run_from_args(args)
    return local_train.run_from_args(args) if args.local else run_from_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cluster.train``: the same options as ``mve train``."""
    args = train_parser("python -m cluster.train", __doc__).parse_args(argv)
    setup_logging(quiet=args.quiet, verbose=args.log_verbose)
    return run_command(run, args, prog="cluster.train")


if __name__ == "__main__":
    sys.exit(main())
