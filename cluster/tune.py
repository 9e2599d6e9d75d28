"""Hyperparameter search on Ray Tune: ASHA early stopping + seeded Optuna (TPE) sampling.

    python -m cluster.tune classifier --data PATH --samples 16 --max-epochs 10
    mve tune vae --data PATH --samples 8 --max-epochs 5 --limit 10000
    ray job submit --working-dir . -- python -m cluster.tune classifier --data /mnt/cifar \\
        --address auto --storage s3://bucket/mve --samples 32 --max-epochs 20 --gpus-per-trial 1

Each trial trains one config drawn from a search-space YAML (default: ``cluster/spaces/
<model>.yaml``, see ``python -m cluster.search -h``) for up to ``--max-epochs`` epochs and
reports the validation metric after every epoch: ``val_accuracy`` (max) for the classifier,
the validation ELBO ``val_elbo_bpd`` in bits/dim (min) for the VAE. ASHA stops the weaker half
(``--reduction-factor 2``) at epochs ``grace, grace*2, grace*4, ...``; Optuna proposes the next
configs from the finished ones.

How a trial trains:

* Default (``--workers-per-trial 1``): the trial *is* the training process. A function
  trainable runs ``mve.train.fit`` in-process and calls ``ray.tune.report(metrics,
  checkpoint=...)`` after every epoch. The models here are small (the classifier has ~0.9M
  parameters, the VAE ~2.7M) and a trial fits one CPU worker or one GPU easily, so this is the
  lightest composition: no extra controller or worker group per trial, Tune itself keeps each
  trial's checkpoints (best 2 by the metric, plus the latest) and a restarted trial resumes from
  ``ray.tune.get_checkpoint()``.
* ``--workers-per-trial N`` (N > 1): every trial is a data-parallel Ray Train (V2) run. The trial
  function is a thin driver that builds ``cluster.train.build_trainer(...)`` with the
  deterministic name ``train-trial_id=<trial id>`` and a ``TuneReportCallback`` that forwards
  rank 0's metrics (plus ``checkpoint_path``) to Tune. Train keeps the checkpoints and resumes a
  restarted trial by its name; the driver reserves no CPU, the N workers reserve
  ``--cpus-per-trial``/``--gpus-per-trial`` each. Use it when one trial needs several GPUs.

ASHA's clock is mve's own ``epoch`` metric rather than Tune's ``training_iteration``: the two
agree for single-worker trials, but a Train-run trial that Tune restarts resumes its Train run at
epoch k while Tune's iteration counter starts again at 1.

Concurrency follows the cluster: ``floor(cluster CPUs / (workers x cpus-per-trial))`` trials at
once (and the same for GPUs when ``--gpus-per-trial`` > 0), at least one.

Resume: the experiment lives at ``<storage>/<name>`` (default ``runs/ray/tune-<model>``).
Rerunning the same command after an interruption restores it with ``Tuner.restore``: finished
trials are kept, unfinished and errored trials continue from their latest checkpoints, and the
searcher and ASHA continue from their saved state. A different search (space, samples, epochs,
data, ...) under the same name is refused; pass a new ``--name``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.search import (
    SearchSpace,
    base_config,
    load_space,
    trial_config,
    validate_space,
)
from cluster.tune_report import TIME_ATTR, TrialRecord, format_summary, write_outputs
from mve.config import ConfigError, TrainConfig

__all__ = ["TuneSettings", "build_parser", "prepare", "run_search", "train_trial",
           "train_driver_fn", "max_concurrent_trials", "main"]

logger = logging.getLogger("cluster.tune")

LOG_FORMAT = "%(asctime)s - %(levelname)s - [%(module)s:%(funcName)s] %(message)s"
DRIVER_MEMORY = 64 * 1024 * 1024  # logical bytes reserved by a Train-run trial's driver (no CPU)
SPEC_FILE = "mve_tune_spec.json"  # what the experiment searches; a rerun must match it


class TuneUserError(ConfigError):
    """A command-line mistake (shown as one line, exit code 2)."""


# -- settings ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TuneSettings:
    """Everything a search needs, resolved and validated before Ray starts."""

    model: str
    metric: str
    mode: str
    space: SearchSpace
    base: TrainConfig
    data_path: str
    samples: int
    max_epochs: int
    grace_period: int = 1
    reduction_factor: float = 2
    seed: int = 0
    workers_per_trial: int = 1
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 1
    max_concurrent: int | None = None
    storage: str | None = None
    s3_endpoint: str | None = None
    address: str | None = None
    name: str = "tune"
    out: Path = field(default_factory=lambda: Path("runs/tune"))
    verbose: int = 1
    command: str = ""

    def spec(self) -> dict[str, Any]:
        """What defines the search; a resumed experiment must have the same spec."""
        return json.loads(json.dumps({
            "model": self.model, "metric": self.metric, "mode": self.mode,
            "space": self.space.to_dict(), "base": self.base.to_dict(),
            "data_path": self.data_path, "samples": self.samples, "max_epochs": self.max_epochs,
            "grace_period": self.grace_period, "reduction_factor": self.reduction_factor,
            "seed": self.seed, "workers_per_trial": self.workers_per_trial,
        }, default=str))


def prepare(args: argparse.Namespace) -> TuneSettings:
    """Resolves and validates the whole search without starting Ray.

    Raises:
        ConfigError: a bad space, config, data path or option (a user error).
    """
    from cluster.common import target_metric
    from mve.data import resolve_data_path

    model = args.model
    if args.samples < 1:
        raise TuneUserError(f"--samples must be >= 1, got {args.samples}")
    if args.max_epochs < 1:
        raise TuneUserError(f"--max-epochs must be >= 1, got {args.max_epochs}")
    if not 1 <= args.grace_period <= args.max_epochs:
        raise TuneUserError(f"--grace-period must be in [1, --max-epochs={args.max_epochs}], "
                            f"got {args.grace_period}")
    if args.reduction_factor <= 1:
        raise TuneUserError(f"--reduction-factor must be > 1, got {args.reduction_factor}")
    if args.workers_per_trial < 1:
        raise TuneUserError(f"--workers-per-trial must be >= 1, got {args.workers_per_trial}")
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        raise TuneUserError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    space = load_space(args.space, model)
    pinned = [o.partition("=")[0].strip() for o in args.overrides]
    if any(k in space.params for k in pinned):
        logger.info("--set pins %s: not searched", [k for k in pinned if k in space.params])
    space = space.pin(pinned)
    extra: dict[str, Any] = {"epochs": args.max_epochs}
    data: dict[str, Any] = {}
    if args.limit is not None:
        data["limit"] = args.limit
    if args.val_size is not None:
        data["val_size"] = args.val_size
    if args.seed is not None:
        extra["seed"] = args.seed
    base = base_config(model, space, preset=args.preset, files=args.config,
                       overrides=args.overrides, extra={**extra, "data": data} if data else extra)
    if base.data.val_size < 1:
        raise TuneUserError("a search needs a validation split: --val-size must be >= 1")
    if args.gpus_per_trial > 0 and base.precision == "fp32" and "precision" not in pinned:
        base = TrainConfig.from_dict({**base.to_dict(), "precision": "bf16"})
        logger.info("GPU trials: precision bf16 (pin with --set precision=fp32)")
    data_path = str(resolve_data_path(args.data or base.data.path, download=True))
    base = TrainConfig.from_dict({**base.to_dict(),
                                  "data": {**base.to_dict()["data"], "path": data_path}})
    validate_space(space, base)
    metric, mode = target_metric(model)
    return TuneSettings(
        model=model, metric=metric, mode=mode, space=space, base=base, data_path=data_path,
        samples=args.samples, max_epochs=args.max_epochs, grace_period=args.grace_period,
        reduction_factor=args.reduction_factor, seed=args.seed if args.seed is not None else 0,
        workers_per_trial=args.workers_per_trial, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, max_failures=args.max_failures,
        max_concurrent=args.max_concurrent, storage=args.storage, s3_endpoint=args.s3_endpoint,
        address=args.address, name=args.name or f"tune-{model}",
        out=Path(args.out or f"runs/tune-{model}"), verbose=0 if args.quiet else args.verbose,
        command=shlex.join(["mve", "tune", *(args.argv or [])]))


# -- trainables (run inside Ray) ---------------------------------------------------------

def _trial_logging(level: int) -> None:
    """mve's epoch lines only with -v 2; Ray's per-checkpoint INFO lines likewise."""
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(min(max(level, logging.INFO), logging.WARNING))
    log = logging.getLogger("mve")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)


def train_trial(config: dict[str, Any], setup: Mapping[str, Any]) -> None:
    """Single-worker trial: ``mve.train.fit`` in this process, one report per epoch.

    Resumes from ``ray.tune.get_checkpoint()`` (copied to a local temp dir) when Tune restarts
    the trial. Reports mve's scalar metrics plus ``node_id``.
    """
    import ray
    import ray.tune

    from cluster.common import fetch_checkpoint, scalar_metrics
    from mve.data import load_data
    from mve.train import fit

    _trial_logging(setup.get("log_level", logging.INFO))
    cfg = trial_config(setup["train"], config)
    device = "cuda" if setup.get("use_gpu") else "cpu"
    data = load_data(setup["data_path"], val_size=cfg.data.val_size, seed=cfg.data.split_seed,
                     limit=cfg.data.limit, image_size=cfg.data.image_size,
                     cache_dir=setup.get("cache_dir"))
    node_id = ray.get_runtime_context().get_node_id()

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        flat = scalar_metrics(metrics)
        # Tune's progress table shows the first four metrics: put the informative ones first.
        first = [k for k in setup.get("show_first", ()) if k in flat]
        flat = {**{k: flat[k] for k in first}, **flat, "node_id": node_id}
        ckpt = ray.tune.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None
        ray.tune.report(flat, checkpoint=ckpt)

    with tempfile.TemporaryDirectory(prefix="mve-tune-resume-") as tmp:
        resume = None
        latest = ray.tune.get_checkpoint()
        if latest is not None:
            resume = fetch_checkpoint(latest, Path(tmp) / "ckpt")
        fit(cfg, data, device=device, report=report, resume_from=resume, progress=False)


def train_driver_fn(config: dict[str, Any], setup: Mapping[str, Any]) -> None:
    """Data-parallel trial: drives a Ray Train V2 run named after the trial.

    ``TuneReportCallback`` forwards rank 0's metrics and the Train checkpoint's path
    (``checkpoint_path``); Tune itself holds no checkpoint for these trials. The deterministic
    name makes a restarted trial resume its Train run from the run's latest checkpoint.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cluster.train import ClusterConfig, build_trainer

    _trial_logging(setup.get("log_level", logging.INFO))
    cfg = trial_config(setup["train"], config)
    cluster = ClusterConfig(**setup["cluster"])
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = build_trainer(cfg, cluster, setup["data_path"], name=f"train-trial_id={trial_id}",
                            callbacks=[TuneReportCallback()], cache_dir=setup.get("cache_dir"))
    trainer.fit()


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _remove_orphaned_placement_groups() -> tuple[int, int]:
    """Removes this job's placement groups whose creating actor is dead.

    When ASHA stops a Train-run trial, Tune ends the trial actor and with it the Train V2
    controller it owns, before the controller can remove its worker group's placement group.
    Ray keeps such a group until the whole job ends, and Train's own ``PlacementGroupCleaner``
    only removes it when the Ray state API (the dashboard) is reachable, which an embedded
    instance started without a dashboard, or a machine running several Ray instances, does
    not give. Left alone, the leaked CPUs starve every later trial. This reads the GCS table
    (Ray-internal, hence the broad ``except`` at the call sites) and removes only groups created
    by an actor of this job that has died.

    Returns:
        ``(removed, alive)``: groups removed, and actor-created groups whose creator lives.
    """
    import ray
    from ray._private.state import state as global_state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job_id = ray.get_runtime_context().get_job_id()
    removed = alive = 0
    accessor = global_state._connect_and_get_accessor()
    for raw in accessor.get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        creator = pg.creator_actor_id
        # A driver-created group (Tune's own trial groups) has a nil creator id: 0xff...
        by_actor = bool(creator) and creator[:-len(pg.creator_job_id)].strip(b"\xff") != b""
        if (pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached
                or not by_actor or pg.creator_job_id.hex() != job_id):
            continue
        if not pg.creator_actor_dead:
            alive += 1
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
        removed += 1
    return removed, alive


def _final_placement_group_sweep(timeout_s: float = 30.0) -> None:
    """After the search: waits for the last Train controllers to go, removing what they leave."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, alive = _remove_orphaned_placement_groups()
        except Exception as exc:  # noqa: BLE001 - Ray internals; degrade to a warning
            logger.warning("cannot sweep orphaned placement groups: %s", exc)
            return
        if not alive or time.monotonic() > deadline:
            return
        time.sleep(0.5)


def _placement_group_reaper(interval_s: float = 5.0) -> Any:
    """A Tune callback that calls :func:`_remove_orphaned_placement_groups` every few seconds."""
    from ray.tune import Callback

    class PlacementGroupReaper(Callback):
        def __init__(self) -> None:
            self._last = 0.0
            self._failed = False

        def _sweep(self) -> None:
            if self._failed:
                return
            try:
                n, _ = _remove_orphaned_placement_groups()
            except Exception as exc:  # noqa: BLE001 - Ray internals; degrade to a warning
                self._failed = True
                logger.warning("cannot sweep orphaned placement groups (%s); stopped Train-run "
                               "trials may hold their CPUs until the search ends", exc)
                return
            if n:
                logger.info("removed %d placement group(s) of stopped Train-run trials", n)

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            now = time.monotonic()
            if now - self._last >= interval_s:
                self._last = now
                self._sweep()

    return PlacementGroupReaper()


# -- storage helpers ---------------------------------------------------------------------

def _filesystem(path: str, fs: Any | None) -> tuple[Any, str]:
    """A concrete pyarrow filesystem and the path on it."""
    import pyarrow.fs

    if fs is not None:
        return fs, path
    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), path


def _read_text(fs: Any, path: str) -> str | None:
    import pyarrow.fs

    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def _write_text(fs: Any, path: str, text: str) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def _exists(fs: Any, path: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


# -- the search --------------------------------------------------------------------------

def max_concurrent_trials(resources: Mapping[str, float], *, workers: int, cpus: float,
                          gpus: float) -> int:
    """How many trials fit the cluster at once: each needs ``workers`` x (cpus, gpus)."""
    n = math.floor(resources.get("CPU", 0.0) / (workers * cpus) + 1e-9)
    if gpus > 0:
        n = min(n, math.floor(resources.get("GPU", 0.0) / (workers * gpus) + 1e-9))
    return max(1, n)


def _setup(s: TuneSettings, storage_path: str) -> dict[str, Any]:
    """What every trial gets besides its sampled params (via ``tune.with_parameters``)."""
    if s.storage and "://" in s.storage:
        train_storage = f"{s.storage.rstrip('/')}/{s.name}"
    else:
        train_storage = f"{storage_path.rstrip('/')}/{s.name}"
    return {
        "train": s.base.to_dict(), "data_path": s.data_path,
        "cache_dir": os.environ.get("MVE_CACHE_DIR"), "use_gpu": s.gpus_per_trial > 0,
        "log_level": logging.INFO if s.verbose >= 2 else logging.WARNING,
        "show_first": [s.metric, *(("val_loss",) if s.model == "classifier" else ("val_psnr",)),
                       "train_loss", "train_images_per_s"],
        "cluster": {"num_workers": s.workers_per_trial, "use_gpu": s.gpus_per_trial > 0,
                    "cpus_per_worker": s.cpus_per_trial,
                    "gpus_per_worker": s.gpus_per_trial or 1.0,
                    "storage": train_storage, "s3_endpoint": s.s3_endpoint},
    }


def _trainable(s: TuneSettings, setup: dict[str, Any]) -> Any:
    from ray import tune

    if s.workers_per_trial == 1:
        res: dict[str, float] = {"CPU": s.cpus_per_trial}
        if s.gpus_per_trial > 0:
            res["GPU"] = s.gpus_per_trial
        return tune.with_resources(tune.with_parameters(train_trial, setup=setup), res)
    return tune.with_resources(tune.with_parameters(train_driver_fn, setup=setup),
                               {"CPU": 0, "memory": DRIVER_MEMORY})


def _plain(v: Any) -> Any:
    """numpy scalars -> Python; NaN -> None."""
    if hasattr(v, "item") and not isinstance(v, list | dict | str):
        try:
            v = v.item()
        except (ValueError, AttributeError):
            return v
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _records(exp_path: str, fs: Any, grid: Any, param_keys: Sequence[str]
             ) -> tuple[list[TrialRecord], Any]:
    from ray.tune import ExperimentAnalysis

    errors = {r.path: str(r.error) for r in grid if r.error is not None}
    ea = ExperimentAnalysis(exp_path, storage_filesystem=fs)
    frames = ea.trial_dataframes
    out = []
    for trial in ea.trials:
        df = frames.get(trial.trial_id)
        history = []
        if df is not None and len(df):
            for row in df.to_dict("records"):
                history.append({k: p for k, v in row.items()
                                if not k.startswith("config/") and (p := _plain(v)) is not None})
        history.sort(key=lambda r: (r.get(TIME_ATTR, 0), r.get("training_iteration", 0)))
        params = {k: _plain(trial.config.get(k)) for k in param_keys}
        out.append(TrialRecord(trial.trial_id, str(trial.status), params, history,
                               errors.get(trial.path), trial.path))
    return out, ea


def _fetch_best(s: TuneSettings, best: TrialRecord, ea: Any, fs: Any, dest: Path) -> Path | None:
    """A local copy of the best trial's best checkpoint that still exists in storage."""
    from cluster.common import fetch_checkpoint

    if s.workers_per_trial == 1:
        trial = next(t for t in ea.trials if t.trial_id == best.trial_id)
        ckpt = ea.get_best_checkpoint(trial, metric=s.metric, mode=s.mode)
        return fetch_checkpoint(ckpt, dest) if ckpt is not None else None
    # Train-run trials: the checkpoint_path of the best reported epoch that Train still keeps.
    rows = [r for r in best.history if isinstance(r.get(s.metric), int | float)
            and r.get("checkpoint_path")]
    rows.sort(key=lambda r: r[s.metric], reverse=s.mode == "max")
    for row in rows:
        path = str(row["checkpoint_path"])
        if _exists(fs, path):
            return fetch_checkpoint(path, dest, filesystem=fs)
        logger.info("checkpoint %s of trial %s was pruned; trying the next best", path,
                    best.trial_id)
    return None


def run_search(s: TuneSettings) -> dict[str, Any]:
    """Runs (or resumes) the search on the connected Ray cluster and writes the outputs."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from cluster.common import resolve_storage
    from cluster.tune_report import select_best

    # Tune snapshots its state whenever a trial has checkpointed num_to_keep times; with
    # epoch-sized trials that is often, on purpose (a resume loses little), so no warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    storage_path, storage_fs = resolve_storage(s.storage, s3_endpoint=s.s3_endpoint)
    fs, root = _filesystem(storage_path, storage_fs)
    exp_path = f"{storage_path.rstrip('/')}/{s.name}"
    exp_on_fs = f"{root.rstrip('/')}/{s.name}"
    setup = _setup(s, storage_path)
    trainable = _trainable(s, setup)
    spec_text = json.dumps(s.spec(), indent=1, sort_keys=True)
    param_keys = list(s.space.params)

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and storage_fs is None and "://" not in storage_path:
        logger.warning("%d nodes share this search: %s must be a filesystem every node mounts "
                       "at the same path (or pass --storage s3://...)", len(nodes), storage_path)
    if tune.Tuner.can_restore(exp_path, storage_filesystem=storage_fs):
        old = _read_text(fs, f"{exp_on_fs}/{SPEC_FILE}")
        if old is not None and json.loads(old) != json.loads(spec_text):
            was, now = json.loads(old), json.loads(spec_text)
            diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
            raise TuneUserError(
                f"experiment {exp_path} was started with a different search (differs in: "
                f"{', '.join(diff)}); rerun the original command to resume it, or pass a new "
                f"--name to start another search")
        logger.info("resuming the search in %s (finished trials are kept)", exp_path)
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=storage_fs)
        resumed = True
    else:
        _write_text(fs, f"{exp_on_fs}/{SPEC_FILE}", spec_text)
        concurrent = s.max_concurrent or max_concurrent_trials(
            ray.cluster_resources(), workers=s.workers_per_trial, cpus=s.cpus_per_trial,
            gpus=s.gpus_per_trial)
        logger.info(
            "new search %s: %d samples x <= %d epochs of %s, %s %s; ASHA(grace %d, reduction "
            "%g) + Optuna(seed %d); %d concurrent trial(s) of %d worker(s) x %g CPU%s; %d "
            "searched params from %s", exp_path, s.samples, s.max_epochs, s.model, s.mode,
            s.metric, s.grace_period, s.reduction_factor, s.seed, concurrent,
            s.workers_per_trial, s.cpus_per_trial,
            f" + {s.gpus_per_trial:g} GPU" if s.gpus_per_trial else "", len(param_keys),
            s.space.source)
        tuner = tune.Tuner(
            trainable,
            param_space=s.space.param_space(),
            tune_config=tune.TuneConfig(
                metric=s.metric, mode=s.mode,  # the one place metric/mode are set
                search_alg=OptunaSearch(seed=s.seed),
                scheduler=ASHAScheduler(time_attr=TIME_ATTR, max_t=s.max_epochs,
                                        grace_period=s.grace_period,
                                        reduction_factor=s.reduction_factor,
                                        # a trial at max_t ends by itself (Train-run trials
                                        # then shut their worker group down cleanly)
                                        stop_last_trials=False),
                num_samples=s.samples, max_concurrent_trials=concurrent,
                trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=s.name, storage_path=storage_path, storage_filesystem=storage_fs,
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=2, checkpoint_score_attribute=s.metric,
                    checkpoint_score_order=s.mode),
                failure_config=tune.FailureConfig(max_failures=s.max_failures),
                callbacks=[_placement_group_reaper()] if s.workers_per_trial > 1 else None,
                verbose=s.verbose))
        resumed = False
    started = time.perf_counter()
    grid = tuner.fit()
    elapsed = time.perf_counter() - started
    if s.workers_per_trial > 1:
        _final_placement_group_sweep()

    trials, ea = _records(exp_path, storage_fs, grid, param_keys)
    best = select_best(trials, s.metric, s.mode)
    best_cfg = trial_config(s.base.to_dict(), best[0].params) if best else None
    with tempfile.TemporaryDirectory(prefix="mve-tune-best-") as tmp:
        best_ckpt = _fetch_best(s, best[0], ea, fs, Path(tmp) / "best") if best else None
        if best is not None and best_ckpt is None:
            logger.warning("no checkpoint of the best trial %s is left in storage",
                           best[0].trial_id)
        summary = write_outputs(
            s.out, trials, model=s.model, metric=s.metric, mode=s.mode,
            max_epochs=s.max_epochs, param_keys=param_keys,
            distributions={k: p.to_optuna() for k, p in s.space.params.items()},
            best_cfg=best_cfg, best_ckpt=best_ckpt, command=s.command,
            experiment_path=exp_path, val_images=_val_images(s) if best_ckpt else None,
            extra_summary={"name": s.name, "resumed": resumed, "wall_s": round(elapsed, 1),
                           "samples": s.samples, "workers_per_trial": s.workers_per_trial,
                           "space": str(Path(s.space.source).resolve()),
                           "unfinished": sum(t.status not in ("TERMINATED", "ERROR")
                                             for t in trials)})
    return summary


def _val_images(s: TuneSettings) -> Any:
    """Validation images for the VAE's report grids (None for the classifier or on failure)."""
    if s.model != "vae":
        return None
    from mve.data import load_data

    cfg = s.base
    try:
        data = load_data(s.data_path, val_size=cfg.data.val_size, seed=cfg.data.split_seed,
                         limit=cfg.data.limit, image_size=cfg.data.image_size)
    except Exception as exc:  # noqa: BLE001 - only the report's image grids need it
        logger.warning("no reconstruction grids: cannot load %s here: %s", s.data_path, exc)
        return None
    return data.val.images if data.val is not None else None


# -- CLI ---------------------------------------------------------------------------------

_EPILOG = """\
search space (--space FILE, default cluster/spaces/MODEL.yaml):
  dotted TrainConfig keys -> a constant or one of
    {loguniform: [lo, hi]}  {uniform: [lo, hi]}  {quniform: [lo, hi, q]}
    {randint: [lo, hi]} (hi excluded)  {qrandint: [lo, hi, q]} (hi included)
    {lograndint: [lo, hi]}  {choice: [a, b, ...]}
  plus an optional `fixed:` block of overrides for every trial. Config precedence per trial:
  recipe < --preset < --config < fixed < --set < --max-epochs/--limit/--val-size/--seed
  < sampled params; --set on a searched key pins it. Check a file without Ray:
  python -m cluster.search MODEL --space FILE

outputs in --out (default runs/tune-MODEL):
  results.csv, results.md   one row per trial: status, params, epochs, final/best metric,
                            stopped early by ASHA, node
  trial_curves.png          metric per epoch of every trial (x = stopped early by ASHA)
  param_importance.png      Optuna fANOVA importances over the finished trials
  best.yaml                 the best trial's full config: mve train MODEL --config best.yaml
  best/                     the best checkpoint, servable, with REPORT.md: mve evaluate OUT/best
  summary.json              best trial, metric, params and paths
  Ray's own files (trial logs, checkpoints, experiment state) are in STORAGE/NAME.

resume: rerun the same command; finished trials are not rerun.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m cluster.tune`` / ``mve tune`` argument parser."""
    p = argparse.ArgumentParser(
        prog="mve tune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Hyperparameter search with Ray Tune: ASHA early stopping + seeded Optuna\n"
                    "sampling over a YAML search space. Trials are single-worker by default\n"
                    "(--workers-per-trial W makes each a data-parallel Ray Train run). Runs on\n"
                    "an embedded local Ray instance, or joins a cluster with --address.\n\n"
                    "  mve tune classifier --data PATH --samples 16 --max-epochs 10\n"
                    "  mve tune vae --data PATH --samples 8 --max-epochs 5 --limit 10000",
        epilog=_EPILOG)
    p.add_argument("model", choices=["classifier", "vae"],
                   help="model family; the metric is val_accuracy (max) for the classifier and "
                        "val_elbo_bpd (min) for the VAE")
    g = p.add_argument_group("search")
    g.add_argument("--samples", type=int, default=8, metavar="N",
                   help="number of trials (configs) to try (default 8)")
    g.add_argument("--max-epochs", type=int, default=10, metavar="E",
                   help="epochs of a trial that ASHA never stops; also the LR-schedule length "
                        "(default 10)")
    g.add_argument("--space", metavar="FILE",
                   help="search-space YAML (default: the packaged cluster/spaces/MODEL.yaml)")
    g.add_argument("--seed", type=int, metavar="S",
                   help="seed of the Optuna sampler and of every trial's training (default 0)")
    g.add_argument("--grace-period", type=int, default=1, metavar="EPOCHS",
                   help="epochs before ASHA may stop a trial (default 1)")
    g.add_argument("--reduction-factor", type=float, default=2, metavar="RF",
                   help="ASHA keeps the best 1/RF of trials at each rung (default 2)")
    g.add_argument("--max-concurrent", type=int, metavar="N",
                   help="trials at once (default: as many as the cluster's CPUs/GPUs fit)")
    g.add_argument("--max-failures", type=int, default=1, metavar="N",
                   help="restarts of a failed trial from its latest checkpoint (default 1)")
    d = p.add_argument_group("data and config")
    d.add_argument("--data", metavar="PATH",
                   help="data path: cifar-10-batches-py, an image folder or a .tar.gz/.zip of "
                        "one (default: $MVE_DATA, else CIFAR-10 in ~/.cache/mve); must be "
                        "readable at the same path on every node")
    d.add_argument("--limit", type=int, metavar="N",
                   help="at most N training images, stratified (fast searches)")
    d.add_argument("--val-size", type=int, metavar="N",
                   help="validation images held out (default: the config's, 5000)")
    d.add_argument("--preset", help="recipe preset every trial starts from (e.g. 'seed')")
    d.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML config file(s) every trial starts from; repeatable")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="dotted override for every trial, e.g. --set model.num_classes=4; "
                        "pins the key if the space searches it; repeatable")
    r = p.add_argument_group("resources")
    r.add_argument("--cpus-per-trial", type=float, default=1.0, metavar="C",
                   help="CPUs per training worker of a trial (default 1)")
    r.add_argument("--gpus-per-trial", type=float, default=0.0, metavar="G",
                   help="GPUs per training worker of a trial; fractions share a GPU (default 0)")
    r.add_argument("--workers-per-trial", type=int, default=1, metavar="W",
                   help="1 (default): a trial trains in one process; W > 1: each trial is a "
                        "data-parallel Ray Train run of W workers")
    o = p.add_argument_group("cluster, storage and output")
    o.add_argument("--address", metavar="ADDR",
                   help="join this Ray cluster ('auto', ray://host:10001, host:6379); default: "
                        "start an embedded local instance for this command")
    o.add_argument("--storage", metavar="URI",
                   help="where Ray keeps experiment state and checkpoints: a path (shared by "
                        "all nodes on a multi-node cluster) or s3://bucket/prefix (default "
                        "./runs/ray)")
    o.add_argument("--s3-endpoint", metavar="URL",
                   help="S3-compatible endpoint for s3:// storage, e.g. http://minio:9000")
    o.add_argument("--name", help="experiment name; the same name resumes (default tune-MODEL)")
    o.add_argument("--out", metavar="DIR", help="report directory (default runs/tune-MODEL)")
    o.add_argument("-q", "--quiet", action="store_true",
                   help="only warnings, errors and the final summary")
    o.add_argument("-v", "--verbose", type=int, default=1, choices=[0, 1, 2],
                   help="Tune's progress output: 0 silent, 1 status table (default), "
                        "2 every result")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cluster.tune`` / ``mve tune``: returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format=LOG_FORMAT, stream=sys.stderr)
    from mve.commands import is_user_error

    try:
        settings = prepare(args)  # everything that can fail fast, before Ray starts
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print(f"mve tune: error: {exc}", file=sys.stderr)
        return 2
    import ray

    from cluster.common import init_ray

    started = init_ray(settings.address)
    try:
        summary = run_search(settings)
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print(f"mve tune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if started:
            ray.shutdown()
    print(format_summary(summary))
    print(f"report: {settings.out}")
    if summary["unfinished"]:
        print(f"mve tune: the search was interrupted with {summary['unfinished']} trial(s) "
              f"unfinished; rerun the same command to resume it", file=sys.stderr)
        return 130
    if summary["terminated"] == 0:
        print("mve tune: error: no trial finished", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
