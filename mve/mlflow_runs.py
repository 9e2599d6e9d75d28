"""MLflow tracking of mve runs: ``--mlflow URI`` or ``$MLFLOW_TRACKING_URI``.

One :class:`MlflowRun` is one MLflow run: a training run, a Tune trial (a child of its search's
run through MLflow's ``mlflow.parentRunId`` tag) or a whole search. It talks to the server with
``MlflowClient`` and explicit run ids, never the module-level "active run": a Ray worker, a
trial and the driver each address the run they were handed, and nothing leaks between threads.

Tracking must never cost a run: when ``mlflow`` is not installed or the server does not
answer, :meth:`MlflowRun.start` logs one warning and returns a run whose methods do nothing,
and a call that fails later logs one warning and switches that run off.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MlflowRun", "tracking_uri", "flat_values", "flat_params", "scalar_metrics"]

logger = logging.getLogger(__name__)

EXPERIMENT = "mve"  # the MLflow experiment every run lands in unless told otherwise
_MAX_PARAM = 6000  # MLflow's limit on a param value's length (characters)
_BATCH = 100  # params per log_batch call: the server's limit


def tracking_uri(value: str | None) -> str | None:
    """``--mlflow URI``, else ``$MLFLOW_TRACKING_URI``, else None (no tracking)."""
    return value or os.environ.get("MLFLOW_TRACKING_URI") or None


def flat_values(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config with dotted keys (``optim.lr: 0.1``); numbers, booleans and text stay
    as they are (TensorBoard's hparams filter on them), anything else becomes text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_values(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


def flat_params(config: Mapping[str, Any]) -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, values as text (``optim.lr: "0.1"``)."""
    return {k: str(v)[:_MAX_PARAM] for k, v in flat_values(config).items()}


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric scalars of an epoch's metrics (per-class tables and matrices are left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and not k.startswith("_")}


def _reachable(uri: str) -> str | None:
    """Why an http(s) tracking server cannot be used, or None. MLflow's own client retries for
    minutes; a short probe keeps a typo in --mlflow from stalling the run."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
            return None if r.status == 200 else f"/health answered {r.status}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))


@dataclass
class MlflowRun:
    """An MLflow run addressed by id (``client`` None: tracking is off and every call no-ops)."""

    uri: str | None = None
    run_id: str | None = None
    client: Any = field(default=None, repr=False)

    @classmethod
    def start(cls, uri: str | None, *, run_name: str, params: Mapping[str, str] | None = None,
              tags: Mapping[str, str] | None = None, parent_run_id: str | None = None,
              experiment: str = EXPERIMENT) -> MlflowRun:
        """A new run in ``experiment`` (created when missing), or an off run with one warning."""
        if uri is None:
            return cls()
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            logger.warning("--mlflow %s: the mlflow package is not installed (pip install "
                           "mlflow); this run is not tracked in MLflow", uri)
            return cls()
        why = _reachable(uri)
        if why is not None:
            logger.warning("--mlflow %s: the tracking server does not answer (%s); this run is "
                           "not tracked in MLflow", uri, why)
            return cls()
        run = cls(uri, None, MlflowClient(uri))
        all_tags = {**(tags or {}), **({"mlflow.parentRunId": parent_run_id}
                                       if parent_run_id else {})}
        run._call("start", lambda c: run._create(c, experiment, run_name, all_tags))
        run.log_params(params or {})
        return run

    @classmethod
    def attach(cls, uri: str | None, run_id: str | None) -> MlflowRun:
        """The existing run ``run_id`` (started elsewhere, e.g. by the driver of a Ray job)."""
        if uri is None or run_id is None:
            return cls()
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            return cls()  # the driver already warned
        return cls(uri, run_id, MlflowClient(uri))

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None

    def _create(self, client: Any, experiment: str, run_name: str, tags: dict[str, str]) -> None:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        self.run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id

    def _call(self, what: str, fn: Any) -> Any:
        if self.client is None:
            return None
        try:
            return fn(self.client)
        except Exception as exc:  # a tracking failure must not end the training run
            logger.warning("MLflow %s failed at %s (%s: %s); MLflow tracking of this run stops",
                           what, self.uri, type(exc).__name__, exc)
            self.client = None
            return None

    def log_params(self, params: Mapping[str, str]) -> None:
        from_items = list(params.items())

        def log(c: Any) -> None:
            from mlflow.entities import Param

            for i in range(0, len(from_items), _BATCH):
                c.log_batch(self.run_id, params=[Param(k, v) for k, v in from_items[i:i + _BATCH]])
        if self.active and from_items:
            self._call("log_params", log)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """The numeric scalars of ``metrics`` at ``step`` (the epoch)."""
        values = scalar_metrics(metrics)

        def log(c: Any) -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            c.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
        if self.active and values:
            self._call("log_metrics", log)

    def log_artifacts(self, local: str | Path, artifact_path: str | None = None) -> None:
        """A file or a directory's files under ``artifact_path``."""
        p = Path(local)
        if not self.active or not p.exists():
            return
        if p.is_dir():
            self._call("log_artifacts", lambda c: c.log_artifacts(self.run_id, str(p),
                                                                  artifact_path))
        else:
            self._call("log_artifact", lambda c: c.log_artifact(self.run_id, str(p),
                                                                artifact_path))

    def register(self, name: str, artifact_path: str) -> str | None:
        """Registers the artifact directory ``artifact_path`` as a new version of model
        ``name`` (created when missing); returns the version."""
        def reg(c: Any) -> str:
            from mlflow.exceptions import MlflowException

            try:
                c.create_registered_model(name)
            except MlflowException as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                    raise
            source = f"{c.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
            return c.create_model_version(name, source=source, run_id=self.run_id).version
        return self._call("register", reg) if self.active else None

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            self._call("end", lambda c: c.set_terminated(self.run_id, status))
