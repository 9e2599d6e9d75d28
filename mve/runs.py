"""Run directories: epoch checkpoints, the final checkpoint, the run's report and summary.

Shared by the local trainer (``mve train --local``) and the Ray entrypoints in ``cluster/``,
which hand over a checkpoint (a directory, or one already loaded) and the metric history, and
print :func:`run_summary` last. ``python -m mve.runs DIR`` prints the summary of a finished
run (``make run`` ends with it).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mve.atomic import write_json, write_text
from mve.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    unflatten_state,
    verify_checkpoint,
)
from mve.config import TrainConfig
from mve.models import get_spec
from mve.report import vae_grids, write_run_report

__all__ = ["latest_checkpoint", "keep_checkpoint", "publish_checkpoint", "checkpoint_history",
           "eval_details", "finalize_run", "headline", "run_summary", "main"]

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


def _loaded(ckpt: Path | Checkpoint) -> Checkpoint:
    return ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(ckpt)


def publish_checkpoint(ckpt: Path | Checkpoint, out: Path) -> Path:
    """Writes ``ckpt``'s model into ``out`` as a servable checkpoint, without optimiser state.

    ``ckpt`` is a checkpoint directory, or one already loaded (then nothing is read again).
    """
    loaded = _loaded(ckpt)
    meta = loaded.meta
    return save_checkpoint(out, loaded.model, model_name=loaded.model_name,
                           model_config=loaded.model_config, preprocessing=meta["preprocessing"],
                           class_names=meta.get("class_names"), metrics=meta.get("metrics"),
                           provenance=meta.get("provenance"), train_config=meta.get("train_config"))


class _NoTensors(dict):
    """Stands in for a training state's tensors: every reference reads as ``None``."""

    def __missing__(self, key: str) -> None:
        return None


def checkpoint_history(ckpt: Checkpoint) -> list[dict[str, Any]]:
    """The metric history in a loaded checkpoint's training state (``[]`` without one).

    The history is plain JSON inside the manifest's training-state skeleton, so it is read
    from ``ckpt.meta`` without opening the state's tensor file (optimiser moments and such).
    """
    skeleton = ckpt.meta.get("training_state")
    if skeleton is None:
        return []
    try:
        state = unflatten_state(skeleton, _NoTensors())
    except Exception as exc:  # noqa: BLE001 - the history only feeds the report's plots
        logger.warning("%s: no history from its training state: %s", ckpt.path, exc)
        return []
    history = state.get("history") if isinstance(state, dict) else None
    return [dict(row) for row in history] if isinstance(history, list) else []


def eval_details(metrics: dict[str, Any]) -> dict[str, Any]:
    """Rebuilds the validation metrics (per-class table input) from a checkpoint's metrics."""
    return {k.removeprefix("val_"): v for k, v in metrics.items() if k.startswith("val_")}


def finalize_run(out: str | Path, final_ckpt: Path | Checkpoint, *, cfg: TrainConfig,
                 history: Sequence[dict[str, Any]] | None = None, command: str,
                 val_images: torch.Tensor | None = None) -> dict[str, Any]:
    """Makes ``out`` the final checkpoint and writes history, config and REPORT.md with plots.

    ``final_ckpt`` is a checkpoint directory, loaded here once, or a checkpoint already loaded
    (as the Tune export passes it); ``history`` defaults to the one in its training state.
    Returns the validation metrics of the final checkpoint.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _loaded(final_ckpt)
    history = list(checkpoint_history(ckpt) if history is None else history)
    publish_checkpoint(ckpt, out)  # the same model, metrics and preprocessing as `ckpt`
    meta = ckpt.meta
    details = eval_details(meta.get("metrics", {}))
    write_json(out / "history.json", history)
    write_text(out / "config.yaml", cfg.to_yaml())
    task = get_spec(cfg.model).task
    if task == "generation" and val_images is not None and len(val_images):
        prep = meta["preprocessing"]
        vae_grids(ckpt.model, val_images, out, mean=prep["mean"], std=prep["std"])
    write_run_report(out, title=f"mve {cfg.model}", cfg_yaml=cfg.to_yaml(), history=history,
                     eval_metrics=details, class_names=meta.get("class_names"), task=task,
                     command=command)
    # DEBUG: the run's summary (run_summary) says where the checkpoint and report are
    logger.debug("wrote checkpoint and report to %s", out)
    return details


def _number(v: Any) -> float | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def headline(model_name: str, metrics: dict[str, Any]) -> str:
    """The metric a run of ``model_name`` is judged by, as one phrase: ``val_accuracy 0.7390
    (73.9%)``, or ``val_elbo_bpd 4.5120 bits/dim, val_psnr 24.10 dB`` for the VAE."""
    spec = get_spec(model_name)
    value = _number(metrics.get(spec.metric))
    if value is None:
        return f"no {spec.metric} recorded"
    if spec.task == "classification":
        text = f"{spec.metric} {value:.4f} ({value:.1%})"
    else:
        text = f"{spec.metric} {value:.4f} bits/dim"
        if (psnr := _number(metrics.get("val_psnr"))) is not None:
            text += f", val_psnr {psnr:.2f} dB"
    epoch = metrics.get("epoch")
    return f"{text} at epoch {epoch}" if epoch is not None else text


def run_summary(out: str | Path, *, title: str,
                extra: Sequence[tuple[str, str]] = ()) -> str:
    """The lines that end a training run or a search: the headline metric, where the
    checkpoint, REPORT.md and plots are, ``extra`` ``(label, text)`` rows, and the command
    that serves the checkpoint. Printed, not logged: it is the result, shown even with -q.
    Reads the checkpoint's ``mve.json`` only.
    """
    out = Path(out)
    meta = read_meta(out)
    model = meta["model_name"]
    rows = [("result", headline(model, meta.get("metrics") or {})), ("checkpoint", str(out))]
    if (out / "REPORT.md").is_file():
        rows.append(("report", str(out / "REPORT.md")))
    plots = sorted(p.name for p in out.glob("*.png"))
    if plots:
        rows.append(("plots", f"{', '.join(plots)} (in the checkpoint)"))
    rows += list(extra)
    # `mve serve` names its model options after the registry's families (serve_app/families.py)
    rows.append(("serve it", f"mve serve --{model} {shlex.quote(str(out))}"))
    return "\n".join([title, *_rows(rows)])


def _rows(rows: Sequence[tuple[str, str]]) -> list[str]:
    """``label  text`` lines with the texts aligned; a text's own line breaks (a long list
    the caller wrapped) continue under it. Nothing is wrapped here: paths and commands stay
    whole, to be copied."""
    indent = max(len(label) for label, _ in rows)
    pad = "\n" + " " * (indent + 4)
    return [f"  {label.ljust(indent)}  {text.replace(chr(10), pad)}" for label, text in rows]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mve.runs DIR [--title T]``: the summary of a finished run."""
    p = argparse.ArgumentParser(prog="python -m mve.runs", description=main.__doc__)
    p.add_argument("checkpoint", help="a run's output directory (a checkpoint)")
    p.add_argument("--title", help="the first line (default: the directory)")
    args = p.parse_args(argv)
    try:
        print(run_summary(args.checkpoint, title=args.title or f"run {args.checkpoint}"))
    except CheckpointError as exc:
        print(f"python -m mve.runs: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
