"""MLflow for a search: one parent run per search, a child run per trial.

The child runs are kept by a Tune callback in the driver, as Ray's own
``MLflowLoggerCallback`` does, and not by the trials: the driver sees every trial start, every
result (single-worker trials and Train-run trials alike), and every end, including trials that
ASHA stops or that die, so no child run is left "running". Ray's callback is not used as it is
because it logs only the sampled params and knows nothing of parent runs; each child here gets
the trial's whole resolved config as params, the sampled ones also as tags ``search.KEY``.

TensorBoard files are written by the trials themselves (``mve.tracking.EpochTracker``), into
each trial's directory in storage.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from cluster.search import trial_config
from mve.mlflow_runs import MlflowRun, flat_params
from mve.tracking import publish_to_mlflow

__all__ = ["MlflowSearchCallback", "trial_metrics", "start_search_run", "finish_search_run"]

logger = logging.getLogger("cluster.tune")

_NOT_METRICS = set(AUTO_RESULT_KEYS) | {"node_id", "resumed_from_epoch", "done",
                                         "trial_id", "experiment_tag", "should_checkpoint"}


def trial_metrics(result: Mapping[str, Any]) -> dict[str, Any]:
    """mve's metrics in a Tune result (Ray's bookkeeping keys left out)."""
    return {k: v for k, v in result.items() if k not in _NOT_METRICS}


class MlflowSearchCallback(Callback):
    """Child runs of ``parent`` (an MLflow run of this search), one per trial.

    Holds only plain values (the URI and run ids), so Tune can pickle it with the experiment
    and a resumed search goes on logging into the same runs.
    """

    def __init__(self, parent: MlflowRun, *, base: Mapping[str, Any], experiment: str,
                 storage_fs: Any | None = None) -> None:
        self.uri = parent.uri
        self.parent_id = parent.run_id
        self.base = dict(base)
        self.experiment = experiment
        self.storage_fs = storage_fs
        self.children: dict[str, str] = {}  # trial id -> MLflow run id
        self.steps: dict[str, int] = {}  # trial id -> last epoch logged

    def _run(self, trial: Any) -> MlflowRun:
        return MlflowRun.attach(self.uri, self.children.get(trial.trial_id))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.children:  # restarted or resumed: same run
            return
        params = flat_params(trial_config(self.base, trial.config).to_dict())
        tags = {f"search.{k}": str(v) for k, v in trial.config.items()}
        tags.update({"mve.run": "trial", "mve.trial_id": trial.trial_id})
        run = MlflowRun.start(self.uri, run_name=f"trial_{trial.trial_id}", params=params,
                              tags=tags, parent_run_id=self.parent_id,
                              experiment=self.experiment)
        if run.active:
            self.children[trial.trial_id] = run.run_id

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        if step <= self.steps.get(trial.trial_id, 0):
            return  # a restarted trial re-reports epochs it had logged
        self.steps[trial.trial_id] = step
        self._run(trial).log_metrics(trial_metrics(result), step)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self._run(trial)
        self._log_checkpoint(run, trial)
        run.end("FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run(trial).end("FAILED")

    def _log_checkpoint(self, run: MlflowRun, trial: Any) -> None:
        """The trial's latest checkpoint as the artifact ``checkpoint/``: Tune's own for a
        single-worker trial, the Train run's ``checkpoint_path`` for a data-parallel one."""
        if not run.active:
            return
        from cluster.common import fetch_checkpoint

        last = trial.last_result or {}
        try:
            with tempfile.TemporaryDirectory(prefix="mve-mlflow-") as tmp:
                if trial.checkpoint is not None:
                    local = fetch_checkpoint(trial.checkpoint, Path(tmp) / "checkpoint")
                elif last.get("checkpoint_path"):
                    local = fetch_checkpoint(str(last["checkpoint_path"]),
                                             Path(tmp) / "checkpoint", filesystem=self.storage_fs)
                else:
                    return
                run.log_artifacts(local, "checkpoint")
        except Exception as exc:  # noqa: BLE001 - the search goes on without the artifact
            logger.warning("MLflow: trial %s's checkpoint not logged: %s", trial.trial_id, exc)


def start_search_run(s: Any) -> MlflowRun:
    """The search's parent run (an off run without ``--mlflow``): params are the search's
    spec (model, metric, budgets, space, base config), tags its name and command."""
    return s.tracking.start_mlflow(s.name, params=flat_params(s.spec()), tags={
        "mve.run": "search", "mve.command": s.command, "mve.search": s.name})


def finish_search_run(run: MlflowRun, s: Any, summary: Mapping[str, Any]) -> None:
    """The search's report (results, plots, summary, ``best.yaml``) and the exported best
    model (``best/``, registered as ``--register-model``) on the parent run, which ends
    FINISHED, or KILLED when trials were left unfinished."""
    if not run.active:
        return
    out = Path(s.out)
    for f in sorted(p for p in out.iterdir() if p.is_file()):
        run.log_artifacts(f)
    if "best_value" in summary:
        run.log_metrics({f"best_{s.metric}": summary["best_value"]},
                        int(summary.get("best_epoch") or 0))
    if (out / "best").is_dir():
        publish_to_mlflow(run, out / "best", register_as=s.tracking.register_as)
    run.end("KILLED" if summary.get("unfinished") else "FINISHED")
