"""``mve train --local``: one training run in this process, without Ray.

The output directory becomes the final checkpoint, with REPORT.md, plots, the config (which
records the resolved data path), run.json and history.jsonl; epoch checkpoints rotate under
``checkpoints/``. Ray Train runs (``cluster.train``) end with the same layout.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from mve.config import TrainConfig
from mve.data import load_data, resolve_data_path
from mve.metrics import per_class_table
from mve.mlflow_runs import flat_params
from mve.options import progress_enabled, resolve_device, train_config_from_args
from mve.report import run_info, write_json
from mve.runs import finalize_run, keep_checkpoint, latest_checkpoint, run_summary
from mve.tracking import TrackingOptions, publish_to_mlflow
from mve.train import fit, tracker_for

__all__ = ["train_local", "run_from_args"]

logger = logging.getLogger("mve")


def train_local(cfg: TrainConfig, out: str | Path, *, device: torch.device,
                resume: bool = False, keep_checkpoints: int = 2,
                tracking: TrackingOptions | None = None) -> dict[str, Any]:
    """Trains ``cfg`` (whose ``data.path`` is resolved here) into ``out``; returns the final
    checkpoint's details (metrics, per-class table data). Event files go to
    ``out/tensorboard``; with ``tracking.mlflow`` the run is also an MLflow run."""
    tracking = tracking or TrackingOptions()
    cfg = cfg.with_data_path(resolve_data_path(cfg.data.path))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpts = out / "checkpoints"
    resume_from = latest_checkpoint(ckpts) if resume else None
    if resume and resume_from is None:
        logger.warning("--resume: no epoch checkpoint under %s, starting fresh", ckpts)
    info = run_info()
    (out / "config.yaml").write_text(cfg.to_yaml())
    write_json(out / "run.json", info)
    data = load_data(cfg.data.path, val_size=cfg.data.val_size, seed=cfg.data.split_seed,
                     limit=cfg.data.limit, image_size=cfg.data.image_size,
                     progress=progress_enabled())
    logger.info("data: %s train, %s val, %d classes, from %s", len(data.train),
                len(data.val) if data.val is not None else 0, len(data.class_names),
                cfg.data.path)
    history = out / "history.jsonl"
    if not resume:
        history.unlink(missing_ok=True)

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        with open(history, "a") as f:
            f.write(json.dumps({k: v for k, v in metrics.items() if not k.startswith("_")}) + "\n")
        if ckpt_dir is not None:
            keep_checkpoint(ckpt_dir, ckpts / f"epoch_{metrics['epoch']:04d}", keep_checkpoints)

    mlflow = tracking.start_mlflow(out.name, params=flat_params(cfg.to_dict()),
                                   tags={"mve.command": info["command"], "mve.run": "train"})
    track = tracker_for(cfg, data, logdir=out / "tensorboard" if tracking.tensorboard else None,
                        mlflow=mlflow)
    try:
        result = fit(cfg, data, device=device, report=report, resume_from=resume_from,
                     progress=progress_enabled(), track=track)
        final = latest_checkpoint(ckpts)
        if final is None:
            raise RuntimeError(f"training finished without writing a checkpoint under {ckpts}")
        details = finalize_run(out, final, cfg=cfg, history=result.history,
                               command=info["command"],
                               val_images=data.showcase_images())
        publish_to_mlflow(mlflow, out, register_as=tracking.register_as)
    except BaseException:
        mlflow.end("FAILED")
        raise
    mlflow.end()
    return details


def run_from_args(args: argparse.Namespace) -> int:
    """``mve train --local`` (and ``python -m cluster.train --local``)."""
    cfg = train_config_from_args(args)
    if args.data:
        cfg = cfg.with_data_path(args.data)
    out = args.out or f"runs/{cfg.model}-local"
    details = train_local(cfg, out, device=resolve_device(args.device), resume=args.resume,
                          keep_checkpoints=args.keep_checkpoints,
                          tracking=TrackingOptions.from_args(args))
    if "per_class" in details:
        print(per_class_table(details))
    tensorboard = ([("tensorboard", f"tensorboard --logdir {Path(out) / 'tensorboard'}")]
                   if getattr(args, "tensorboard", True) else [])
    print(run_summary(out, title=f"mve train {cfg.model} (local, {cfg.epochs} epoch(s)): done",
                      extra=tensorboard))
    return 0
