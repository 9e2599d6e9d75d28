"""A Tune experiment in its storage: the spec file, the trials' records, the best checkpoint.

The storage is a local or shared folder or an object store; everything goes through pyarrow
filesystems, as Ray's own storage does.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.tune.report import TIME_ATTR, TrialRecord
from cluster.tune.settings import SearchError, TuneSettings

__all__ = ["SPEC_FILE", "filesystem", "read_text", "write_text", "exists", "check_spec",
           "records", "fetch_best"]

logger = logging.getLogger("cluster.tune")

SPEC_FILE = "mve_tune_spec.json"  # what the experiment searches; a rerun must match it


# -- pyarrow filesystems -----------------------------------------------------------------

def filesystem(path: str, fs: Any | None) -> tuple[Any, str]:
    """A concrete pyarrow filesystem and the path on it."""
    import pyarrow.fs

    if fs is not None:
        return fs, path
    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), path


def read_text(fs: Any, path: str) -> str | None:
    """The file's text, or None when there is no such file."""
    import pyarrow.fs

    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(fs: Any, path: str, text: str) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def exists(fs: Any, path: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


# -- the experiment ----------------------------------------------------------------------

def check_spec(fs: Any, exp_on_fs: str, exp_path: str, spec_text: str) -> None:
    """Refuses to resume an experiment that was started with a different search.

    Raises:
        SearchError: the stored spec differs from ``spec_text`` (names the differing keys).
    """
    old = read_text(fs, f"{exp_on_fs}/{SPEC_FILE}")
    if old is None:
        return
    was, now = json.loads(old), json.loads(spec_text)
    if was == now:
        return
    diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    raise SearchError(
        f"experiment {exp_path} was started with a different search (differs in: "
        f"{', '.join(diff)}); rerun the original command to resume it, or pass a new "
        f"--name to start another search")


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


def records(exp_path: str, fs: Any, grid: Any, param_keys: Sequence[str]
            ) -> tuple[list[TrialRecord], Any]:
    """Every trial of the experiment as a :class:`TrialRecord`, and the ``ExperimentAnalysis``."""
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


def fetch_best(s: TuneSettings, best: TrialRecord, ea: Any, fs: Any, dest: Path) -> Path | None:
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
        if exists(fs, path):
            return fetch_checkpoint(path, dest, filesystem=fs)
        logger.info("checkpoint %s of trial %s was pruned; trying the next best", path,
                    best.trial_id)
    return None
