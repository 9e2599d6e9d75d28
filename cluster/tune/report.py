"""The outputs of a Tune search: results table, plots, ``best.yaml``, ``best/`` and a summary.

Written by ``python -m cluster.tune`` into ``--out`` (default ``runs/tune-<model>``):

    results.csv / results.md   one row per trial: id, status, sampled params, epochs run, final
                               and best metric, whether ASHA stopped it early, node
    trial_curves.png           the metric per epoch of every trial; x marks ASHA's early stops
    param_importance.png       Optuna's fANOVA importances over the finished trials
    best.yaml                  the best trial's full TrainConfig (``mve train --config best.yaml``)
    best/                      the best trial's best checkpoint as a servable model folder, with
                               REPORT.md and plots (``mve evaluate DIR/best``)
    summary.json               best trial, metric, params and paths

This module does not import Ray: :mod:`cluster.tune.experiment` turns Ray's results into
:class:`TrialRecord` s, and :mod:`cluster.tune.runner` fetches and loads the best checkpoint
before calling :func:`write_outputs`.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mve.atomic import write_json, write_text
from mve.config import TrainConfig
from mve.plots import new_figure, save_figure

if TYPE_CHECKING:
    from mve.checkpoint import Checkpoint

__all__ = ["TrialRecord", "result_rows", "select_best", "write_results", "plot_trial_curves",
           "plot_param_importance", "write_outputs"]

logger = logging.getLogger(__name__)

TIME_ATTR = "epoch"  # ASHA's clock: mve's own epoch counter (see cluster.tune)


@dataclass
class TrialRecord:
    """One trial as Tune left it: params, every reported result, status and error."""

    trial_id: str
    status: str  # TERMINATED or ERROR (PENDING/RUNNING only for an interrupted search)
    params: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per report (epoch)
    error: str | None = None
    path: str | None = None

    def values(self, metric: str) -> list[tuple[int, float]]:
        """``(epoch, value)`` of every report that has a finite ``metric``."""
        out = []
        for i, row in enumerate(self.history):
            v = row.get(metric)
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                out.append((int(row.get(TIME_ATTR) or row.get("training_iteration") or i + 1),
                            float(v)))
        return out

    @property
    def epochs(self) -> int:
        """Epochs this trial completed (its last reported epoch)."""
        eps = [int(r[TIME_ATTR]) for r in self.history if isinstance(r.get(TIME_ATTR), int | float)]
        return max(eps) if eps else len(self.history)

    def final(self, metric: str) -> float | None:
        vals = self.values(metric)
        return vals[-1][1] if vals else None

    def best(self, metric: str, mode: str) -> tuple[int, float] | None:
        """``(epoch, value)`` of the best report (the first one on ties)."""
        vals = self.values(metric)
        if not vals:
            return None
        pick = max if mode == "max" else min
        return pick(vals, key=lambda ev: ev[1])

    def last(self, key: str) -> Any:
        for row in reversed(self.history):
            if row.get(key) not in (None, ""):
                return row[key]
        return None

    def early_stopped(self, max_epochs: int) -> bool:
        """ASHA stopped it: it ended without error before ``max_epochs``."""
        return self.status == "TERMINATED" and 0 < self.epochs < max_epochs


def select_best(trials: Sequence[TrialRecord], metric: str, mode: str
                ) -> tuple[TrialRecord, int, float] | None:
    """The trial with the best value of ``metric`` at any epoch: ``(trial, epoch, value)``."""
    scored = [(t, *b) for t in trials if (b := t.best(metric, mode)) is not None]
    if not scored:
        return None
    sign = -1.0 if mode == "max" else 1.0  # ties: the lower trial id, as in results.csv
    return min(scored, key=lambda s: (sign * s[2], s[0].trial_id))


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.6g}")
    return v


def result_rows(trials: Sequence[TrialRecord], *, metric: str, mode: str, max_epochs: int,
                param_keys: Sequence[str]) -> list[dict[str, Any]]:
    """One flat row per trial, best first (trials without a metric last)."""
    rows = []
    for t in trials:
        best = t.best(metric, mode)
        row: dict[str, Any] = {
            "trial_id": t.trial_id, "status": t.status,
            "early_stopped": t.early_stopped(max_epochs), "epochs": t.epochs,
            f"final_{metric}": t.final(metric),
            f"best_{metric}": best[1] if best else None,
            "best_epoch": best[0] if best else None,
        }
        row.update({f"param:{k}": t.params.get(k) for k in param_keys})
        row["time_s"] = t.last("time_total_s")
        row["node_ip"] = t.last("node_ip")
        row["node_id"] = t.last("node_id")
        row["error"] = (t.error or "").strip().splitlines()[-1][:200] if t.error else ""
        rows.append(row)
    sign = -1.0 if mode == "max" else 1.0
    rows.sort(key=lambda r: (r[f"best_{metric}"] is None,
                             sign * (r[f"best_{metric}"] or 0.0), r["trial_id"]))
    return rows


def write_results(rows: Sequence[Mapping[str, Any]], out: Path, *, title: str) -> tuple[Path, Path]:
    """``results.csv`` (full precision) and ``results.md`` (6 significant digits, no node id)."""
    out.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0]) if rows else ["trial_id"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    csv_path = out / "results.csv"
    write_text(csv_path, buf.getvalue())

    def cell(v: Any) -> str:
        if v is None or v == "":
            return ""
        if isinstance(v, bool):
            return "yes" if v else "no"
        return str(_fmt(v)).replace("|", "\\|")

    md_cols = [c for c in columns if c != "node_id"]  # long; kept in the CSV
    lines = [f"# {title}", "",
             "| " + " | ".join(c.removeprefix("param:") for c in md_cols) + " |",
             "|" + "|".join("---" for _ in md_cols) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in md_cols) + " |" for r in rows]
    md_path = out / "results.md"
    write_text(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


# -- plots -------------------------------------------------------------------------------

def plot_trial_curves(trials: Sequence[TrialRecord], path: Path, *, metric: str, mode: str,
                      max_epochs: int, title: str | None = None) -> Path:
    """``metric`` against epoch for every trial; x marks where ASHA stopped a trial early."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(figsize=(7.5, 4.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    best = select_best(trials, metric, mode)
    stopped = errored = False
    for t in trials:
        vals = t.values(metric)
        if not vals:
            continue
        xs, ys = zip(*vals, strict=True)
        is_best = best is not None and t is best[0]
        line, = ax.plot(xs, ys, marker="o", markersize=3, linewidth=2.4 if is_best else 1.2,
                        alpha=1.0 if is_best else 0.75,
                        label=f"{t.trial_id} (best)" if is_best else t.trial_id)
        if t.early_stopped(max_epochs):
            ax.plot([xs[-1]], [ys[-1]], marker="x", markersize=10, markeredgewidth=2.2,
                    color=line.get_color(), linestyle="none")
            stopped = True
        if t.status == "ERROR":
            ax.plot([xs[-1]], [ys[-1]], marker="s", markersize=7, color="black",
                    linestyle="none")
            errored = True
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, max_epochs + 0.5)
    ax.grid(True, alpha=0.3)
    if stopped:
        ax.plot([], [], marker="x", markersize=8, markeredgewidth=2, color="0.3",
                linestyle="none", label="stopped early by ASHA")
    if errored:
        ax.plot([], [], marker="s", markersize=6, color="black", linestyle="none",
                label="errored")
    if ax.lines:
        ax.legend(fontsize=7, ncol=1 if len(trials) <= 20 else 2, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.text(0.5, 0.5, "no trial reported a result", ha="center", va="center",
                transform=ax.transAxes)
    n_stop = sum(t.early_stopped(max_epochs) for t in trials)
    ax.set_title(title or f"{len(trials)} trials, {n_stop} stopped early by ASHA")
    return save_figure(fig, path)


def _message_figure(path: Path, title: str, message: str) -> Path:
    fig = new_figure(figsize=(6.0, 3.0), dpi=120)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes)
    return save_figure(fig, path)


def plot_param_importance(trials: Sequence[TrialRecord], path: Path, *, metric: str, mode: str,
                          distributions: Mapping[str, Any], min_trials: int = 3) -> Path:
    """Optuna's parameter importances (fANOVA) of the trials that finished without error.

    The study is rebuilt from each trial's sampled params and its final ``metric``. With fewer
    than ``min_trials`` such trials, or when Optuna cannot compute importances, the figure says
    so instead.
    """
    title = f"Hyperparameter importance for {metric}"
    done = [t for t in trials if t.status == "TERMINATED" and t.final(metric) is not None]
    if len(done) < min_trials or not distributions:
        return _message_figure(path, title, f"not enough trials: {len(done)} finished with a "
                                            f"{metric}, {min_trials} needed")
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
        for t in done:
            params = {k: t.params[k] for k in distributions if k in t.params}
            dists = {k: distributions[k] for k in params}
            try:
                study.add_trial(optuna.trial.create_trial(params=params, distributions=dists,
                                                          value=t.final(metric)))
            except ValueError as exc:  # e.g. a float off a quantised grid
                logger.warning("param importance: skipping trial %s: %s", t.trial_id, exc)
        if len(study.trials) < min_trials:
            return _message_figure(path, title, f"not enough trials: {len(study.trials)} "
                                                f"usable, {min_trials} needed")
        importances = optuna.importance.get_param_importances(study)
    except Exception as exc:  # noqa: BLE001 - a report figure must not fail the search
        logger.warning("param importance failed: %s", exc)
        return _message_figure(path, title, f"could not compute importances:\n{exc}")
    if not importances:
        return _message_figure(path, title, "no parameter varied across the finished trials")
    names = list(importances)[::-1]
    vals = [importances[n] for n in names]
    fig = new_figure(figsize=(6.5, 0.45 * len(names) + 1.4), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    ax.barh(names, vals, color="tab:blue")
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel("importance (fANOVA, sums to 1)")
    ax.set_xlim(0, max(vals) * 1.2 if max(vals) > 0 else 1)
    ax.set_title(f"{title}\n({len(study.trials)} finished trials, final value)")
    return save_figure(fig, path)


# -- everything --------------------------------------------------------------------------

def write_outputs(out: str | Path, trials: Sequence[TrialRecord], *, model: str, metric: str,
                  mode: str, max_epochs: int, param_keys: Sequence[str],
                  distributions: Mapping[str, Any], best_cfg: TrainConfig | None,
                  best_ckpt: Checkpoint | None, command: str, experiment_path: str,
                  val_images: Any = None, extra_summary: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Writes every output file into ``out`` and returns the summary (also ``summary.json``).

    Args:
        best_cfg: the best trial's resolved config (written as ``best.yaml``).
        best_ckpt: the best trial's best checkpoint, loaded (exported to ``best/``).
        val_images: validation images for the VAE's reconstruction grids in ``best/``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"mve tune {model}: {metric} ({mode})"
    rows = result_rows(trials, metric=metric, mode=mode, max_epochs=max_epochs,
                       param_keys=param_keys)
    csv_path, md_path = write_results(rows, out, title=title)
    curves = plot_trial_curves(trials, out / "trial_curves.png", metric=metric, mode=mode,
                               max_epochs=max_epochs)
    importance = plot_param_importance(trials, out / "param_importance.png", metric=metric,
                                       mode=mode, distributions=distributions)
    summary: dict[str, Any] = {
        "model": model, "metric": metric, "mode": mode, "max_epochs": max_epochs,
        "experiment_path": experiment_path,
        "trials": len(trials),
        "terminated": sum(t.status == "TERMINATED" for t in trials),
        "errored": sum(t.status == "ERROR" for t in trials),
        "stopped_early": sum(t.early_stopped(max_epochs) for t in trials),
        "results_csv": str(csv_path), "results_md": str(md_path),
        "trial_curves": str(curves), "param_importance": str(importance),
        **dict(extra_summary or {}),
    }
    best = select_best(trials, metric, mode)
    if best is not None:
        trial, epoch, value = best
        summary.update({"best_trial_id": trial.trial_id, "best_value": value,
                        "best_epoch": epoch, "best_params": trial.params})
    if best_cfg is not None:
        summary.update(_export_best(out, best_cfg, best_ckpt, metric=metric, command=command,
                                    val_images=val_images))
    write_json(out / "summary.json", summary)
    return summary


def _export_best(out: Path, cfg: TrainConfig, ckpt: Checkpoint | None, *, metric: str,
                 command: str, val_images: Any) -> dict[str, Any]:
    """``best.yaml``, and ``best/`` from the loaded checkpoint (no file is read again)."""
    from mve.runs import checkpoint_history, finalize_run

    best_yaml = write_text(out / "best.yaml", cfg.to_yaml())
    entries: dict[str, Any] = {"best_yaml": str(best_yaml)}
    if ckpt is not None:
        finalize_run(out / "best", ckpt, cfg=cfg, history=checkpoint_history(ckpt),
                     command=command, val_images=val_images)
        entries.update({"best_checkpoint": str(out / "best"),
                        "best_checkpoint_epoch": ckpt.metrics.get("epoch"),
                        "best_checkpoint_value": ckpt.metrics.get(metric)})
    return entries


def _near(path: str) -> str:
    """``path`` relative to the working directory when it lies under it (Ray keeps the
    experiment's path absolute; the user gave a relative one), else as it is (s3://...)."""
    if "://" in path:
        return path
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def format_summary(summary: Mapping[str, Any]) -> str:
    """The lines that end ``mve tune``: how the trials ended, then the best checkpoint's
    summary (:func:`mve.runs.run_summary`: metric, checkpoint, REPORT.md, plots, the serve
    command) with the best params and the search's own outputs."""
    from cluster.tune.progress import format_value, short_names
    from mve.runs import run_summary

    title = [f"mve tune {summary['model']}: {summary['trials']} trials, {summary['terminated']} "
             f"finished ({summary['stopped_early']} stopped early by ASHA), "
             f"{summary['errored']} errored{' (resumed)' if summary.get('resumed') else ''}"]
    rows: list[tuple[str, str]] = []
    if "best_trial_id" in summary:
        title.append(f"best trial {summary['best_trial_id']}: {summary['metric']} "
                     f"{summary['best_value']:.4f} at epoch {summary['best_epoch']} of "
                     f"{summary['max_epochs']}")
        params = summary.get("best_params") or {}
        names = short_names(list(params))
        # wrapped here: the summary's other rows are paths and commands, kept whole
        rows.append(("params", "\n".join(textwrap.wrap(", ".join(
            f"{names[k]}={format_value(v)}" for k, v in params.items()), width=80))))
    out = Path(summary["results_md"]).parent
    rows += [("results", f"{summary['results_md']} (every trial)"),
             ("search plots", f"trial_curves.png, param_importance.png in {out}"),
             ("ray storage", _near(str(summary["experiment_path"]))),
             ("tensorboard", f"tensorboard --logdir {_near(str(summary['experiment_path']))}")]
    if "best_yaml" in summary:
        rows.append(("retrain", f"mve train {summary['model']} --config {summary['best_yaml']}"))
    if "best_checkpoint" in summary:
        return run_summary(summary["best_checkpoint"], title="\n".join(title), extra=rows)
    return "\n".join([*title, *(f"  {label}: {text}" for label, text in rows)])
