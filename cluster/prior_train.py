"""The latent diffusion prior on Ray Train: ``mve train prior --vae CKPT`` without ``--local``.

    mve train prior --vae models/cifar10-vae --data PATH --workers 2 --out runs/prior
    ray job submit --working-dir . -- python -m cluster.train prior --vae /mnt/vae --data /mnt/data --gpu

The same adapter as ``cluster.train`` for the classifier and the VAE: every worker runs
``mve.prior_train.train_prior`` with DDP (``prepare_model``) and a reporter that calls
``ray.train.report`` each epoch, rank 0 attaching its resumable ``last/`` checkpoint
(uploaded manifest-last by ``cluster.checkpoints``). A failed worker group restarts from the
latest verified checkpoint, and reusing ``--storage`` and ``--name`` resumes a run. The driver
turns the final reported checkpoint into the prior checkpoint (EMA weights) at ``--out``.
The VAE and the data must be readable at the same paths on every worker's node.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from cluster.checkpoints import resume_point, upload_checkpoint
from cluster.common import check_gpus, fetch_checkpoint, init_ray, scalar_metrics
from cluster.options import ClusterConfig
from cluster.torch_backend import LoopbackStoreTorchConfig
from mve.checkpoint import load_checkpoint, read_meta
from mve.data import load_data, resolve_data_path
from mve.errors import UserError
from mve.logs import driver_level, plain_stderr, worker_logging
from mve.models import make_config
from mve.models.latent_prior import LatentPriorConfig
from mve.prior_run import done_message, prior_configs, vae_path
from mve.prior_train import PriorTrainConfig, export_prior, train_prior
from mve.storage import resolve_storage

__all__ = ["prior_worker", "build_prior_trainer", "prior_run_name", "run_prior_training",
           "run_from_args"]

logger = logging.getLogger(__name__)


def prior_worker(config: dict) -> None:
    """Ray Train worker: loads the VAE and the data, then trains its shard of every batch."""
    level = config.get("log_level", logging.INFO)
    worker_logging(level)
    plain_stderr("cluster", level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    vae = load_checkpoint(config["vae"], device=device)
    data = load_data(config["data"], val_size=config["val_size"], seed=0, limit=config["limit"],
                     cache_dir=config.get("cache_dir"))
    model_cfg = make_config("prior", config["model"])
    cfg = PriorTrainConfig(**config["train"])

    with tempfile.TemporaryDirectory(prefix="mve-prior-") as tmp:
        resume, _ = resume_point(Path(tmp), rank)

        def report(row: dict[str, Any], last: Path | None) -> None:
            ckpt = ray.train.Checkpoint.from_directory(str(last)) if last else None
            ray.train.report(scalar_metrics(row), checkpoint=ckpt,
                             checkpoint_dir_name=f"epoch_{row['epoch']:04d}" if ckpt else None,
                             checkpoint_upload_fn=upload_checkpoint if ckpt else None)

        train_prior(vae, data.train.images, data.val.images if data.val is not None else None,
                    Path(tmp) / "run", model_config=model_cfg, cfg=cfg, device=device,
                    resume_from=resume, rank=rank, world_size=world,
                    wrap_model=ray.train.torch.prepare_model, report=report)


def prior_run_name(vae: Path, data: Path, model_cfg: LatentPriorConfig, cfg: PriorTrainConfig,
                   cluster: ClusterConfig) -> str:
    """Deterministic: the same VAE, data, configs and workers give the same name (and resume)."""
    h = hashlib.sha256()
    for part in (vae.absolute(), data.absolute(), dataclasses.asdict(model_cfg),
                 dataclasses.asdict(cfg), cluster.num_workers, cluster.use_gpu):
        h.update(repr(part).encode())
    return f"mve-prior-{h.hexdigest()[:10]}"


def build_prior_trainer(loop_config: dict[str, Any], cluster: ClusterConfig, *, name: str
                        ) -> ray.train.torch.TorchTrainer:
    """A Train V2 ``TorchTrainer`` running :func:`prior_worker`; it keeps the newest
    ``cluster.num_to_keep`` checkpoints (a prior's latest is its best: its EMA only improves)."""
    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = cluster.gpus_per_worker
    storage_path, fs = resolve_storage(cluster.storage, s3_endpoint=cluster.s3_endpoint)
    run_config = RunConfig(
        name=name, storage_path=storage_path, storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=cluster.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cluster.num_to_keep),
        logging_config=ray.train.LoggingConfig(
            log_level="INFO" if driver_level() < logging.INFO else "WARNING"))
    return ray.train.torch.TorchTrainer(
        prior_worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu,
                                     resources_per_worker=resources),
        torch_config=LoopbackStoreTorchConfig(), run_config=run_config)


def run_prior_training(vae: Path, data: Path, out: Path, *, model_cfg: LatentPriorConfig,
                       cfg: PriorTrainConfig, cluster: ClusterConfig, val_size: int = 5000,
                       limit: int | None = None, name: str | None = None,
                       address: str | None = None) -> dict[str, Any]:
    """Runs the Train job and writes the prior checkpoint into ``out``; returns a summary."""
    vae, data = vae.absolute(), data.absolute()  # workers may start in another directory
    name = name or prior_run_name(vae, data, model_cfg, cfg, cluster)
    loop_config = {"vae": str(vae), "data": str(data), "val_size": val_size, "limit": limit,
                   "model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(cfg),
                   "cache_dir": os.environ.get("MVE_CACHE_DIR"), "log_level": driver_level()}
    started = init_ray(address)
    try:
        check_gpus(cluster.gpus_per_worker if cluster.use_gpu else 0, embedded=started,
                   what="--gpu (one per worker)")
        logger.info("Ray Train run %s (latent prior): %d worker(s), gpu=%s", name,
                    cluster.num_workers, cluster.use_gpu)
        result = build_prior_trainer(loop_config, cluster, name=name).fit()
        if result.error is not None:
            raise RuntimeError(f"Ray Train run {name} failed: {result.error}")
        if result.checkpoint is None:
            raise RuntimeError(f"Ray Train run {name} finished without a checkpoint")
        with tempfile.TemporaryDirectory(prefix="mve-prior-final-") as tmp:
            export_prior(fetch_checkpoint(result.checkpoint, Path(tmp) / "last"), out)
        return {"run_name": name, "storage": str(result.path), "out": str(out),
                "checkpoint": str(result.checkpoint.path),
                "metrics": scalar_metrics(result.metrics or {})}
    finally:
        if started:
            ray.shutdown()


def run_from_args(args: argparse.Namespace) -> int:
    """``mve train prior`` without ``--local``."""
    model_cfg, cfg = prior_configs(args.preset, args.overrides, epochs=args.epochs,
                                   seed=args.seed)
    vae = vae_path(getattr(args, "vae", None))
    if read_meta(vae).get("model_name") != "vae":
        raise UserError(f"--vae {vae} is not a VAE checkpoint")
    cluster = ClusterConfig(num_workers=args.workers, use_gpu=args.gpu,
                            cpus_per_worker=args.cpus_per_worker, storage=args.storage,
                            s3_endpoint=args.s3_endpoint, max_failures=args.max_failures,
                            num_to_keep=args.keep_checkpoints)
    out = Path(args.out or "runs/prior-ray")
    summary = run_prior_training(
        vae, Path(resolve_data_path(args.data)), out, model_cfg=model_cfg, cfg=cfg,
        cluster=cluster, val_size=args.val_size if args.val_size is not None else 5000,
        limit=args.limit, name=args.name, address=args.address)
    print(done_message(vae, out, f"on Ray Train ({cfg.epochs} epoch(s), {cluster.num_workers} "
                                 f"worker(s), run {summary['run_name']} in {summary['storage']})"))
    return 0
