"""The Ray Train options of ``mve train`` and ``python -m cluster.train``, and the
:class:`ClusterConfig` they become (no Ray import, so ``mve --help`` stays fast)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

__all__ = ["ClusterConfig", "ray_train_parent", "train_parser"]


def ray_train_parent() -> argparse.ArgumentParser:
    """Where and how a Ray Train run runs: workers, GPUs, cluster address, storage, name."""
    p = argparse.ArgumentParser(add_help=False)
    r = p.add_argument_group("Ray Train (without --local)")
    r.add_argument("--workers", type=int, default=1, help="data-parallel workers (default 1)")
    r.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, bf16 autocast")
    r.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    r.add_argument("--address", help="Ray cluster address (default: start an embedded local Ray)")
    r.add_argument("--storage", help="storage path or URI for checkpoints: a local or shared "
                                     "folder, or s3://bucket/prefix (default runs/ray)")
    r.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (MinIO, moto, ...)")
    r.add_argument("--name", help="run name; reusing it with the same storage resumes the run "
                                  "(default: derived from the config and data, deterministic)")
    r.add_argument("--max-failures", type=int, default=2,
                   help="worker-group restarts from the latest checkpoint (default 2)")
    return p


def train_parser(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """The whole parser of a training entrypoint: mve's train options, the Ray group and
    ``-q``/``-v`` (as ``mve train`` has them)."""
    from mve.logs import verbosity_parent
    from mve.options import train_parent

    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   parents=[train_parent(), ray_train_parent(),
                                            verbosity_parent()])


@dataclass(frozen=True)
class ClusterConfig:
    """Where and how a run executes; never reaches ``mve``."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    storage: str | None = None  # local/shared path or s3://...; None: ./runs/ray
    s3_endpoint: str | None = None
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    num_to_keep: int = 2  # best checkpoints kept, by the validation metric

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
