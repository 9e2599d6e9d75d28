"""Helpers of the training and search fault tests (test_train_faults, test_tune_faults, test_s3).

Every run is a ``python -m cluster.train`` / ``python -m cluster.tune`` subprocess started in a
session of its own, with its own embedded Ray (``ray.init(address="local")``; ``RAY_ADDRESS``
is removed from its environment so it never joins another cluster on this machine). The
session id finds that run's Ray processes (workers included) among everyone else's, and
:class:`Run` SIGKILLs whatever of the session is left when a test ends, pass or fail.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))
from _archives import TINY_SPACE, colour_archive  # noqa: E402  tests/integration/_archives.py

__all__ = ["REPO", "TINY_SPACE", "colour_archive", "SMALL_CLASSIFIER", "run_env", "Run",
           "session_pids", "cmdline", "kill_session", "wait_for", "train_worker_pids",
           "snapshot_epochs", "epoch_log_lines"]

# A tiny classifier on the 3-class colour archive: a few seconds per epoch on a loaded 2-core
# machine, which leaves room to kill a process in the middle of one.
SMALL_CLASSIFIER = ["model.num_classes=3", "model.cnn_layers=3", "model.starting_channels=8",
                    "model.final_channels=16", "model.fcn_layers=2", "data.val_size=60",
                    "batch_size=20", "eval_batch_size=60", "optim.lr=0.05"]

def run_env(**extra: str) -> dict[str, str]:
    """The environment of a training/search subprocess: this one's (MVE_CACHE_DIR included),
    unbuffered, no usage stats, and never an inherited ``RAY_ADDRESS``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # The Train controller collects reports (and writes the run's snapshot) every 2 s by
    # default; 0.25 s makes "epoch k is registered" visible before epoch k+1 is over even when
    # an epoch takes under a second, and a dead worker noticed sooner.
    env.update(PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25", **extra)
    return env


def wait_for(cond: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1,
             alive: subprocess.Popen | None = None, log: Path | None = None) -> Any:
    """Polls ``cond`` until it returns something truthy (returned); fails after ``timeout`` s or
    as soon as ``alive`` exits, with the tail of ``log``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"process exited ({alive.returncode}) while waiting for "
                                 f"{what}:\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{tail}")
        time.sleep(interval)


# -- processes of a session ---------------------------------------------------------------

def _stat(pid_dir: Path) -> list[str] | None:
    try:
        return (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of the session ``sid``."""
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        fields = _stat(d)
        if fields and int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"


def kill_session(proc: subprocess.Popen, *, settle_s: float = 5.0) -> list[str]:
    """SIGKILLs the process group of ``proc``, then any process of its session that survived
    ``settle_s`` seconds (Ray workers leave by themselves once their raylet is gone); waits
    until none is left. Returns the processes that had to be killed one by one."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + settle_s
    while session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.25)
    survivors = session_pids(proc.pid)
    described = [f"{pid}: {cmdline(pid)}" for pid in survivors]
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30  # SIGKILL is asynchronous; a loaded machine needs a moment
    while session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.25)
    return described


def train_worker_pids(sid: int) -> list[int]:
    """Ray Train worker processes (``ray::RayTrainWorker...``) of the session ``sid``."""
    return sorted(p for p in session_pids(sid) if cmdline(p).startswith("ray::RayTrainWorker"))


class Run:
    """A CLI run in a session of its own, logging to ``log``; ``with`` guarantees that nothing
    of the session outlives the block."""

    def __init__(self, cmd: Sequence[str], log: Path, *, env: dict[str, str] | None = None):
        self.cmd, self.log = list(cmd), log
        self.started = time.monotonic()
        with open(log, "w") as f:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env or run_env(), stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stragglers = kill_session(self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.cmd[:4]} did not finish within {timeout:.0f} s:\n"
                                 f"{self.output()[-4000:]}") from None

    def elapsed(self) -> float:
        return time.monotonic() - self.started


# -- what a run left in storage -------------------------------------------------------------

def snapshot_epochs(run_dir: Path) -> dict[str, Any]:
    """Ray Train's record of a run: the epochs of the registered checkpoints and the latest.

    ``{}`` while there is no snapshot (or it is being rewritten)."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return {}
    latest = snap.get("latest_checkpoint_result") or {}
    return {"epochs": sorted(c["metrics"]["epoch"] for c in snap.get("checkpoint_results", [])),
            "latest": (latest.get("metrics") or {}).get("epoch"),
            "latest_train_time_s": (latest.get("metrics") or {}).get("train_time_s"),
            "latest_dir": latest.get("checkpoint_dir_name")}


_EPOCH_LINE = re.compile(r"RayTrainWorker pid=(\d+)\)\S*\s+epoch (\d+): ")


def epoch_log_lines(text: str) -> list[tuple[int, int]]:
    """``(worker pid, epoch)`` of every "epoch N: ..." line rank 0 logged, in order."""
    return [(int(pid), int(ep)) for pid, ep in _EPOCH_LINE.findall(text)]
