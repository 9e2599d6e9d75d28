"""Run directories: epoch checkpoints, the final checkpoint, and the run's report.

Shared by the local trainer (``mve train --local``) and the Ray entrypoints in ``cluster/``,
which hand over only a checkpoint directory and the metric history.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mve.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    verify_checkpoint,
)
from mve.config import TrainConfig
from mve.models import get_spec
from mve.report import vae_grids, write_json, write_run_report

__all__ = ["latest_checkpoint", "keep_checkpoint", "publish_checkpoint", "eval_details",
           "finalize_run"]

logger = logging.getLogger(__name__)


def latest_checkpoint(ckpts: Path) -> Path | None:
    """The newest complete ``epoch_NNNN`` checkpoint under ``ckpts``.

    Complete as :func:`mve.checkpoint.verify_checkpoint` means it: the manifest and every file
    it lists, with matching sha256. A newer directory left partial by a crash during a copy or
    an upload is skipped (with a warning), so a resume never picks it up.
    """
    if not ckpts.is_dir():
        return None
    for candidate in sorted((p for p in ckpts.glob("epoch_*") if p.is_dir()), reverse=True):
        try:
            verify_checkpoint(candidate)
        except CheckpointError as exc:
            logger.warning("skipping incomplete checkpoint %s: %s", candidate, exc)
            continue
        return candidate
    return None


def keep_checkpoint(src: Path, dest: Path, keep: int) -> None:
    """Copies an epoch checkpoint into place atomically and prunes all but the newest ``keep``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    shutil.copytree(src, stage, dirs_exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(stage, dest)
    for old in sorted(dest.parent.glob("epoch_*"))[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)


def publish_checkpoint(ckpt: Path, out: Path) -> Path:
    """Writes ``ckpt``'s model into ``out`` as a servable checkpoint, without optimiser state."""
    meta = read_meta(ckpt)
    loaded = load_checkpoint(ckpt)
    return save_checkpoint(out, loaded.model, model_name=meta["model_name"],
                           model_config=loaded.model_config, preprocessing=meta["preprocessing"],
                           class_names=meta.get("class_names"), metrics=meta.get("metrics"),
                           provenance=meta.get("provenance"), train_config=meta.get("train_config"))


def eval_details(metrics: dict[str, Any]) -> dict[str, Any]:
    """Rebuilds the validation metrics (per-class table input) from a checkpoint's metrics."""
    return {k.removeprefix("val_"): v for k, v in metrics.items() if k.startswith("val_")}


def finalize_run(out: str | Path, final_ckpt: Path, *, cfg: TrainConfig,
                 history: Sequence[dict[str, Any]], command: str,
                 val_images: torch.Tensor | None = None) -> dict[str, Any]:
    """Makes ``out`` the final checkpoint and writes history, config and REPORT.md with plots.

    Returns the validation metrics of the final checkpoint.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    publish_checkpoint(final_ckpt, out)
    meta = read_meta(out)
    details = eval_details(meta.get("metrics", {}))
    write_json(out / "history.json", list(history))
    (out / "config.yaml").write_text(cfg.to_yaml())
    task = get_spec(cfg.model).task
    if task == "generation" and val_images is not None and len(val_images):
        prep = meta["preprocessing"]
        vae_grids(load_checkpoint(out).model, val_images, out, mean=prep["mean"], std=prep["std"])
    write_run_report(out, title=f"mve {cfg.model}", cfg_yaml=cfg.to_yaml(), history=list(history),
                     eval_metrics=details, class_names=meta.get("class_names"), task=task,
                     command=command)
    logger.info("wrote checkpoint and report to %s", out)
    return details
