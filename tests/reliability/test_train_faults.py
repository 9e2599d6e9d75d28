"""Ray Train under faults: a worker SIGKILLed mid-epoch, the driver SIGKILLed mid-run.

Both runs are the real CLI (``python -m cluster.train``) with its own embedded Ray, in a
session of its own; see _train_helpers.py. Figures go to RELIABILITY.md
through conftest.py's record_figures fixture.

    .venv/bin/pytest tests/reliability/test_train_faults.py -m "" -s
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from _train_helpers import (
    SMALL_CLASSIFIER,
    Run,
    cmdline,
    colour_archive,
    epoch_log_lines,
    session_pids,
    snapshot_epochs,
    train_worker_pids,
    wait_for,
)

from mve.checkpoint import load_checkpoint, load_training_state, verify_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EPOCHS = 4


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """3 classes x 700 PNGs: about 1 s per epoch on an idle 2-core machine (5-10 s loaded),
    long enough to kill a worker inside one, and to outlast the second or two that Ray's
    workers train on after their driver is SIGKILLed."""
    return colour_archive(tmp_path_factory.mktemp("faults-data"), classes=3, per_class=700,
                          seed=1)


def _cmd(archive: Path, tmp: Path, *, workers: int, epochs: int = EPOCHS) -> list[str]:
    sets = ["--preset", "baseline", *(a for s in SMALL_CLASSIFIER for a in ("--set", s))]
    return [sys.executable, "-m", "cluster.train", "classifier", "--data", str(archive),
            "--workers", str(workers), "--epochs", str(epochs), "--max-failures", "2",
            "--storage", str(tmp / "storage"), "--out", str(tmp / "out"), *sets]


def _run_dir(storage: Path) -> Path | None:
    """The one run directory under ``storage`` (its name derives from config, data, workers)."""
    runs = [p for p in storage.glob("mve-classifier-*") if p.is_dir()] if storage.exists() else []
    return runs[0] if len(runs) == 1 else None


def _trains(pid: int) -> bool:
    """A process that could still train or write checkpoints: Ray's GCS, raylet, Train
    controller or a Train worker."""
    cmd = cmdline(pid)
    return any(k in cmd for k in ("gcs_server", "raylet", "TrainController", "RayTrainWorker"))


def _final_history(out: Path) -> list[int]:
    return [h["epoch"] for h in json.loads((out / "history.json").read_text())]


def test_worker_sigkilled_mid_epoch_resumes_from_last_checkpoint(archive, tmp_path,
                                                                  record_figures):
    """2 data-parallel workers; one is SIGKILLed while epoch k+1 trains (epoch k's checkpoint
    registered, epoch k+1's not started uploading; k is 1 unless the machine is so fast that
    epoch 2 ends before the test sees epoch 1 registered). Train restarts the worker group from
    epoch k's checkpoint and the run ends with epochs 1..N each exactly once."""
    storage = tmp_path / "storage"
    with Run(_cmd(archive, tmp_path, workers=2), tmp_path / "run.log") as run:
        # The moment: epoch k registered in the run's snapshot and no epoch_k+1 directory yet
        # (its upload creates it), so both workers are inside epoch k+1's training loop.
        def mid_epoch() -> int | None:
            d = _run_dir(storage)
            k = snapshot_epochs(d).get("latest") if d else None
            if k and k < EPOCHS and not (d / f"epoch_{k + 1:04d}").exists():
                return k
            return None

        k = wait_for(mid_epoch, timeout=420, what="a registered checkpoint", interval=0.02,
                     alive=run.proc, log=run.log)
        workers = wait_for(lambda: train_worker_pids(run.pid), timeout=30,
                           what="the Train worker processes", alive=run.proc, log=run.log)
        run_dir = _run_dir(storage)
        assert run_dir is not None
        # Into the epoch: about a third of the last epoch's training time (the next one takes
        # about as long), so the kill lands inside the batch loop rather than at its start.
        into = 0.3 * float(snapshot_epochs(run_dir).get("latest_train_time_s") or 0)
        time.sleep(min(into, 10.0))
        victim = workers[-1]
        t_kill = run.elapsed()
        os.kill(victim, signal.SIGKILL)
        mid = not (run_dir / f"epoch_{k + 1:04d}").exists()  # still before epoch k+1's upload
        assert snapshot_epochs(run_dir)["latest"] == k
        wait_for(lambda: victim not in session_pids(run.pid), timeout=30,
                 what=f"worker {victim} to die")
        assert run.wait(timeout=600) == 0, run.output()[-4000:]
        total = run.elapsed()
    assert mid, f"epoch {k + 1} reached its checkpoint upload before the kill landed"

    out = tmp_path / "out"
    summary = json.loads((out / "ray_run.json").read_text())
    metrics = summary["metrics"]
    assert metrics["epoch"] == EPOCHS
    assert metrics["resumed_from_epoch"] == k  # the last worker group started after epoch k
    assert _final_history(out) == list(range(1, EPOCHS + 1))  # continuous, nothing twice
    last = verify_checkpoint(run_dir / f"epoch_{EPOCHS:04d}")
    assert last["metrics"]["epoch"] == EPOCHS
    state = load_training_state(run_dir / f"epoch_{EPOCHS:04d}")
    assert [h["epoch"] for h in state["history"]] == list(range(1, EPOCHS + 1))
    assert load_checkpoint(out).meta["metrics"]["epoch"] == EPOCHS

    # The logs agree: epoch k+1 was finished (logged) only by the new worker group, once.
    lines = epoch_log_lines(run.output())
    assert victim not in {pid for pid, ep in lines if ep > k}
    finished = sorted(ep for _, ep in lines)
    assert finished == list(range(1, EPOCHS + 1)), finished
    record_figures("worker_kill", {
        "workers": 2, "epochs": EPOCHS, "killed_pid": victim, "killed_in_epoch": k + 1,
        "killed_mid_epoch": mid, "kill_at_s": round(t_kill, 1),
        "kill_into_epoch_s": round(into, 2),
        "resumed_from_epoch": metrics["resumed_from_epoch"],
        "final_history_epochs": _final_history(out), "epochs_completed": metrics["epoch"],
        "epochs_logged": finished, "run_s": round(total, 1)})


def test_driver_sigkilled_then_same_command_resumes(archive, tmp_path, record_figures):
    """The driver (the CLI process) is SIGKILLed once epoch 1's checkpoint is registered; the
    same command again resumes after the latest registered checkpoint instead of starting
    over. (The Train controller and worker outlive the driver by a second or two and may
    register one more epoch meanwhile: the resume point is read once all of them are gone.)"""
    storage = tmp_path / "storage"
    epochs = 6
    cmd = _cmd(archive, tmp_path, workers=1, epochs=epochs)
    with Run(cmd, tmp_path / "first.log") as first:
        at_kill = wait_for(
            lambda: (d := _run_dir(storage)) and snapshot_epochs(d).get("latest"),
            timeout=420, what="epoch 1's checkpoint", interval=0.05, alive=first.proc,
            log=first.log)
        t_kill = first.elapsed()
        os.kill(first.pid, signal.SIGKILL)  # the driver alone; its Ray goes down with it
        first.proc.wait(timeout=60)
        killed = time.monotonic()
        # GCS and raylet share the driver's fate at once, the Train controller and workers
        # within seconds; only the dashboard/runtime-env agents wait out a 60 s raylet timeout
        # (Run's exit SIGKILLs those).
        wait_for(lambda: not [p for p in session_pids(first.pid) if _trains(p)], timeout=120,
                 what="the killed driver's Train processes to exit")
        train_gone_s = time.monotonic() - killed
    assert not session_pids(first.pid)
    run_dir = _run_dir(storage)
    assert run_dir is not None
    killed_after = snapshot_epochs(run_dir)["latest"]  # final: nothing of the first run is left
    assert at_kill <= killed_after < epochs, "the first run got too far before the kill"
    assert not (tmp_path / "out" / "ray_run.json").exists()

    started = time.monotonic()
    with Run(cmd, tmp_path / "second.log") as second:
        assert second.wait(timeout=600) == 0, second.output()[-4000:]
    rerun_s = time.monotonic() - started
    out = tmp_path / "out"
    summary = json.loads((out / "ray_run.json").read_text())
    assert summary["run_name"] == run_dir.name  # the same command found the same run
    assert summary["metrics"]["resumed_from_epoch"] == killed_after
    assert summary["metrics"]["epoch"] == epochs
    assert _final_history(out) == list(range(1, epochs + 1))
    rerun_epochs = sorted(ep for _, ep in epoch_log_lines(second.output()))
    assert rerun_epochs == list(range(killed_after + 1, epochs + 1)), rerun_epochs
    record_figures("driver_kill", {
        "workers": 1, "epochs": epochs, "kill_at_s": round(t_kill, 1),
        "registered_when_killed": at_kill, "registered_after_train_processes_gone": killed_after,
        "train_processes_gone_s": round(train_gone_s, 1),
        "resumed_from_epoch": summary["metrics"]["resumed_from_epoch"],
        "epochs_run_by_rerun": rerun_epochs, "final_history_epochs": _final_history(out),
        "rerun_s": round(rerun_s, 1)})
