"""Where a Ray run's TensorBoard files go, and how Ray workers find the driver's MLflow run.

Event files belong under the run's storage, beside Ray's own files, so that
``tensorboard --logdir STORAGE`` shows every Train run and every trial of a search. On a local
or shared filesystem the writer writes there directly. An object store (``s3://``) has no
append, so the writer writes into a local staging directory and every flush mirrors it (a few
kilobytes an epoch) with pyarrow, which Ray already uses for the same storage.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mve.mlflow_runs import MlflowRun
from mve.tracking import EpochTracker, TrackingOptions

__all__ = ["StorageLogdir", "tracking_setup", "worker_tracker"]

logger = logging.getLogger(__name__)


class StorageLogdir:
    """The event-file directory ``rel`` under ``storage_path`` (a path or a URI that pyarrow
    resolves; ``fs`` a pyarrow filesystem, or None to infer it from the path)."""

    def __init__(self, storage_path: str, fs: Any | None, rel: str) -> None:
        import pyarrow.fs as pafs

        if fs is None:
            fs, root = pafs.FileSystem.from_uri(storage_path)
        else:
            root = storage_path
        self.fs = fs
        self.remote = f"{root.rstrip('/')}/{rel}"
        self._staging: Path | None = None
        if isinstance(fs, pafs.LocalFileSystem):
            self.path = Path(self.remote)
        else:
            self._staging = Path(tempfile.mkdtemp(prefix="mve-tensorboard-"))
            self.path = self._staging

    def sync(self) -> None:
        """Mirrors the staging directory to storage (a no-op on a local filesystem); a failed
        upload is a warning, never the end of the run."""
        if self._staging is None:
            return
        import pyarrow.fs as pafs

        try:
            self.fs.create_dir(self.remote, recursive=True)
            pafs.copy_files(str(self._staging), self.remote,
                            source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        except Exception as exc:  # noqa: BLE001 - tracking must not cost the run
            logger.warning("TensorBoard files not copied to %s: %s", self.remote, exc)

    def cleanup(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


def tracking_setup(tracking: TrackingOptions, mlflow: MlflowRun) -> dict[str, Any]:
    """What a Ray worker needs to track a run (plain values: it travels in a Ray config)."""
    return {"tensorboard": tracking.tensorboard, "mlflow_uri": mlflow.uri,
            "mlflow_run_id": mlflow.run_id if mlflow.active else None}


def worker_tracker(setup: Mapping[str, Any] | None, *, storage_path: str, fs: Any | None,
                   rel: str, hparams: Mapping[str, Any] | None, cfg: Any, data: Any
                   ) -> tuple[EpochTracker | None, StorageLogdir | None]:
    """Rank 0's tracker: event files in ``storage_path/rel`` (unless switched off) and the
    driver's MLflow run, attached by id. Returns (None, None) when nothing is tracked."""
    from mve.train import tracker_for

    setup = dict(setup or {})
    logdir = StorageLogdir(storage_path, fs, rel) if setup.get("tensorboard", True) else None
    mlflow = MlflowRun.attach(setup.get("mlflow_uri"), setup.get("mlflow_run_id"))
    if logdir is None and not mlflow.active:
        return None, None
    track = tracker_for(cfg, data, logdir=logdir.path if logdir else None, mlflow=mlflow,
                        hparams=hparams)
    if logdir is not None:
        track.after_flush = logdir.sync
    return track, logdir
