"""The search itself: a new or restored ``Tuner`` (ASHA + seeded Optuna), run, then exported."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.search import trial_config
from cluster.tune.experiment import (
    SPEC_FILE,
    check_spec,
    fetch_best,
    filesystem,
    records,
    write_text,
)
from cluster.tune.placement import final_sweep, placement_group_reaper
from cluster.tune.progress import CompactReporter
from cluster.tune.report import TIME_ATTR, TrialRecord, select_best, write_outputs
from cluster.tune.settings import TuneSettings
from cluster.tune.trainables import trainable, trial_setup

__all__ = ["max_concurrent_trials", "run_search", "trial_dirname"]

logger = logging.getLogger("cluster.tune")


@dataclass(frozen=True)
class _Store:
    """Where the experiment lives: as Ray names it, and on a concrete pyarrow filesystem."""

    storage_path: str
    storage_fs: Any | None  # what Ray gets (None: inferred from the path)
    fs: Any
    exp_path: str
    exp_on_fs: str


def max_concurrent_trials(resources: Mapping[str, float], *, workers: int, cpus: float,
                          gpus: float) -> int:
    """How many trials fit the cluster at once: each needs ``workers`` x (cpus, gpus)."""
    n = math.floor(resources.get("CPU", 0.0) / (workers * cpus) + 1e-9)
    if gpus > 0:
        n = min(n, math.floor(resources.get("GPU", 0.0) / (workers * gpus) + 1e-9))
    return max(1, n)


def trial_dirname(trial: Any) -> str:
    """``trial_<id>``: the folder of a trial in the experiment (Tune pickles this by name)."""
    return f"trial_{trial.trial_id}"


def _store(s: TuneSettings) -> _Store:
    import ray

    from mve.storage import resolve_storage

    storage_path, storage_fs = resolve_storage(s.storage, s3_endpoint=s.s3_endpoint)
    fs, root = filesystem(storage_path, storage_fs)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and storage_fs is None and "://" not in storage_path:
        logger.warning("%d nodes share this search: %s must be a filesystem every node mounts "
                       "at the same path (or pass --storage s3://...)", len(nodes), storage_path)
    return _Store(storage_path, storage_fs, fs, f"{storage_path.rstrip('/')}/{s.name}",
                  f"{root.rstrip('/')}/{s.name}")


def _callbacks(s: TuneSettings, mlflow: Any | None) -> list[Any]:
    """Ray's JSON and CSV loggers (the report reads them), mve's MLflow callback, and the
    placement-group reaper of Train-run trials. Ray's own TensorBoard logger is left out
    (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS, set by :func:`run_search`): the trials write mve's
    event files, and a second set would show every trial twice in TensorBoard."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    callbacks: list[Any] = [JsonLoggerCallback(), CSVLoggerCallback()]
    if mlflow is not None:
        callbacks.append(mlflow)
    if s.workers_per_trial > 1:
        callbacks.append(placement_group_reaper())
    return callbacks


def _console(s: TuneSettings) -> dict[str, Any]:
    """The ``RunConfig`` fields of the search's console: mve's compact table (``-v 1``, plus a
    line per result with ``-v 2``) through Tune's legacy output engine, whose verbosity 1
    prints only what the reporter prints; nothing with ``-v 0`` (``-q``)."""
    reporter = CompactReporter(name=s.name, metric=s.metric, mode=s.mode,
                               param_keys=list(s.space.params), max_epochs=s.max_epochs,
                               level=s.verbose)
    return {"progress_reporter": reporter, "verbose": min(s.verbose, 1)}


@contextmanager
def _legacy_output() -> Iterator[None]:
    """Tune's legacy output engine while the search runs: the new one (the default since Ray
    2.6) ignores a passed-in reporter. Restored afterwards: other Tune runs in this process
    (tests) keep Ray's default."""
    saved = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved


def _say_plan(s: TuneSettings, concurrent: int) -> dict[str, Any] | None:
    """Logs the plan in a few short lines; returns the base config's point in the space (the
    first trial), or None when the base config lies outside it."""
    gpu = f" + {s.gpus_per_trial:g} GPU" if s.gpus_per_trial else ""
    logger.info("new search %s: %d samples x <= %d epochs of %s, %s %s", s.name, s.samples,
                s.max_epochs, s.model, s.mode, s.metric)
    logger.info("ASHA(grace %d, reduction %g) + Optuna(seed %d); %d concurrent trial(s) of %d "
                "worker(s) x %g CPU%s", s.grace_period, s.reduction_factor, s.seed, concurrent,
                s.workers_per_trial, s.cpus_per_trial, gpu)
    point, outside = s.space.base_point(s.base.to_dict())
    searched = f"{len(s.space.params)} searched params ({Path(s.space.source).name})"
    if point is not None:
        logger.info("%s; the first trial is the base config's own values", searched)
        logger.debug("the base config's point: %s", point)
    else:
        shown = ", ".join(outside[:3]) + (f" and {len(outside) - 3} more" if outside[3:] else "")
        logger.info("%s; the base config lies outside the space at %s: no trial starts from it",
                    searched, shown)
    return point


def _new_tuner(s: TuneSettings, store: _Store, fn: Any, mlflow: Any | None = None) -> Any:
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    concurrent = s.max_concurrent or max_concurrent_trials(
        ray.cluster_resources(), workers=s.workers_per_trial, cpus=s.cpus_per_trial,
        gpus=s.gpus_per_trial)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created": noise here
    point = _say_plan(s, concurrent)
    # a trial at max_t ends by itself (Train-run trials then shut their worker group down
    # cleanly), hence stop_last_trials=False
    scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=s.max_epochs,
                              grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                              stop_last_trials=False)
    return tune.Tuner(
        fn,
        param_space=s.space.param_space(),
        tune_config=tune.TuneConfig(
            metric=s.metric, mode=s.mode,  # the one place metric/mode are set
            search_alg=OptunaSearch(seed=s.seed, points_to_evaluate=[point] if point else None),
            scheduler=scheduler,
            num_samples=s.samples, max_concurrent_trials=concurrent,
            trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=s.name, storage_path=store.storage_path, storage_filesystem=store.storage_fs,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=s.metric,
                checkpoint_score_order=s.mode),
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            callbacks=_callbacks(s, mlflow), **_console(s)))


def _tuner(s: TuneSettings, store: _Store, mlflow: Any | None) -> tuple[Any, bool]:
    """The restored experiment when there is one (refused if it searches something else),
    else a new one; and whether it was restored. A restored experiment keeps the callbacks
    it was started with (Tune restores them), so its trials log into their MLflow runs."""
    from ray import tune

    fn = trainable(s, trial_setup(s, store.storage_path, store.storage_fs))
    spec_text = json.dumps(s.spec(), indent=1, sort_keys=True)
    if tune.Tuner.can_restore(store.exp_path, storage_filesystem=store.storage_fs):
        check_spec(store.fs, store.exp_on_fs, store.exp_path, spec_text)
        tuner = tune.Tuner.restore(store.exp_path, fn, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=store.storage_fs)
        _restore_console(s, tuner)
        _say_resuming(s, store, tuner)
        return tuner, True
    write_text(store.fs, f"{store.exp_on_fs}/{SPEC_FILE}", spec_text)
    return _new_tuner(s, store, fn, mlflow), False


def _restore_console(s: TuneSettings, tuner: Any) -> None:
    """A restored Tuner runs with the run config it was started with (``Tuner.restore`` takes
    none): this run's console replaces the recorded one, so that ``-q`` on a rerun is quiet
    and an experiment started before the compact table gets it. The run config is reached
    through the Tuner's internal one, the only handle Ray 2.60 offers; under Ray Client there
    is none and the recorded console stays."""
    internal = getattr(tuner, "_local_tuner", None)
    if internal is None or not hasattr(internal, "get_run_config"):
        logger.debug("restored search: keeping its recorded console settings")
        return
    run_config = internal.get_run_config()
    for key, value in _console(s).items():
        setattr(run_config, key, value)


def _say_resuming(s: TuneSettings, store: _Store, tuner: Any) -> None:
    """Always shown: a rerun that trains nothing must not look like a new search."""
    try:
        done = tuner.get_results().num_terminated
    except Exception:  # noqa: BLE001 - the count is a courtesy; the restore itself worked
        done = None
    count = "?" if done is None else done
    print(f"resuming the search: experiment {s.name} ({count} of {s.samples} trials done)\n"
          f"  in {store.exp_path}\n"
          "  finished trials are not rerun; a new --name starts a new search",
          file=sys.stderr, flush=True)


def run_search(s: TuneSettings) -> dict[str, Any]:
    """Runs (or resumes) the search on the connected Ray cluster and writes the outputs."""
    # Tune snapshots its state whenever a trial has checkpointed num_to_keep times; with
    # epoch-sized trials that is often, on purpose (a resume loses little), so no warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # see _callbacks
    # here, not at the top: the command line imports this module and must not load Ray
    from cluster.tune.tracking import MlflowSearchCallback, finish_search_run, start_search_run

    store = _store(s)
    parent = start_search_run(s)
    try:
        callback = (MlflowSearchCallback(parent, base=s.base.to_dict(),
                                         experiment=s.tracking.experiment,
                                         storage_fs=store.storage_fs)
                    if parent.active else None)
        tuner, resumed = _tuner(s, store, callback)
        started = time.perf_counter()
        with _legacy_output():
            grid = tuner.fit()
        elapsed = time.perf_counter() - started
        if s.workers_per_trial > 1:
            final_sweep()
        trials, ea = records(store.exp_path, store.storage_fs, grid, list(s.space.params))
        extra = {"name": s.name, "resumed": resumed, "wall_s": round(elapsed, 1),
                 "samples": s.samples, "workers_per_trial": s.workers_per_trial,
                 "space": str(Path(s.space.source).resolve()),
                 "unfinished": sum(t.status not in ("TERMINATED", "ERROR") for t in trials)}
        summary = _export(s, trials, ea, store, extra)
    except BaseException:
        parent.end("FAILED")
        raise
    finish_search_run(parent, s, summary)
    return summary


def _export(s: TuneSettings, trials: list[TrialRecord], ea: Any, store: _Store,
            extra: Mapping[str, Any]) -> dict[str, Any]:
    """Writes the report; the best checkpoint is fetched and loaded once, here, and that one
    loaded checkpoint becomes ``best/`` and fills the summary."""
    from mve.checkpoint import load_checkpoint

    best = select_best(trials, s.metric, s.mode)
    best_cfg = trial_config(s.base.to_dict(), best[0].params) if best else None
    with tempfile.TemporaryDirectory(prefix="mve-tune-best-") as tmp:
        path = fetch_best(s, best[0], ea, store.fs, Path(tmp) / "best") if best else None
        if best is not None and path is None:
            logger.warning("no checkpoint of the best trial %s is left in storage",
                           best[0].trial_id)
        best_ckpt = load_checkpoint(path) if path is not None else None
        return write_outputs(
            s.out, trials, model=s.model, metric=s.metric, mode=s.mode,
            max_epochs=s.max_epochs, param_keys=list(s.space.params),
            distributions={k: p.to_optuna() for k, p in s.space.params.items()},
            best_cfg=best_cfg, best_ckpt=best_ckpt, command=s.command,
            experiment_path=store.exp_path,
            val_images=_val_images(s) if best_ckpt is not None else None, extra_summary=extra)


def _val_images(s: TuneSettings) -> Any:
    """Validation images for a generative model's report grids (None otherwise, or on failure)."""
    from mve.models import get_spec

    if get_spec(s.model).task != "generation":
        return None
    from mve.data import load_data

    cfg = s.base
    try:
        data = load_data(cfg.data.path, val_size=cfg.data.val_size, seed=cfg.data.split_seed,
                         limit=cfg.data.limit, image_size=cfg.data.image_size)
    except Exception as exc:  # noqa: BLE001 - only the report's image grids need it
        logger.warning("no reconstruction grids: cannot load %s here: %s", cfg.data.path, exc)
        return None
    return data.val.images if data.val is not None else None
