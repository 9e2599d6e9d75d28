"""Ray Tune under faults: the search driver SIGKILLed mid-search, then the same command again.

Moved here from tests/integration/test_tune.py (it takes over a minute); the default suite
keeps the restore of a finished search (test_asha_optuna_search_exports_a_servable_best_checkpoint
reruns its command and checks nothing runs again).

    .venv/bin/pytest tests/reliability/test_tune_faults.py -m "" -s
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import pytest
from _train_helpers import TINY_SPACE, Run, colour_archive, session_pids, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SAMPLES, MAX_EPOCHS = 6, 3


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return colour_archive(tmp_path_factory.mktemp("tune-faults-data"), classes=3, per_class=60)


def _trial_states(exp: Path) -> dict[str, str]:
    """trial id -> status from Tune's latest experiment state file."""
    files = sorted(exp.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except (OSError, ValueError):  # being rewritten
        return {}
    out = {}
    for entry in data.get("trial_data", []):
        state = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
        out[state["trial_id"]] = state.get("status")
    return out


def _reported_epochs(exp: Path) -> dict[str, list[int]]:
    """trial id -> the ``epoch`` of every result it reported (its result.json lines)."""
    out = {}
    for p in exp.glob("trial_*/result.json"):
        lines = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        out[p.parent.name.removeprefix("trial_")] = [int(r["epoch"]) for r in lines]
    return out


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return {r["trial_id"]: r for r in csv.DictReader(f)}


def test_search_driver_sigkilled_resumes_without_rerunning_finished_trials(archive, tmp_path,
                                                                          record_figures):
    space = tmp_path / "space.yaml"
    space.write_text(TINY_SPACE)
    cmd = [sys.executable, "-m", "cluster.tune", "classifier", "--data", str(archive),
           "--space", str(space), "--val-size", "30", "--samples", str(SAMPLES),
           "--max-epochs", str(MAX_EPOCHS), "--storage", str(tmp_path / "storage"),
           "--out", str(tmp_path / "out"), "--name", "resume-test", "-v", "0"]
    exp = tmp_path / "storage" / "resume-test"
    with Run(cmd, tmp_path / "first.log") as first:
        wait_for(lambda: "TERMINATED" in _trial_states(exp).values(), timeout=420,
                 what="a finished trial", interval=0.1, alive=first.proc, log=first.log)
        finished = {t for t, s in _trial_states(exp).items() if s == "TERMINATED"}
        before = _reported_epochs(exp)
        t_kill = first.elapsed()
        # SIGKILL the driver's process group: the driver, its embedded Ray's GCS, raylet and
        # agents. Ray's workers (the trials) run in process groups of their own and exit once
        # the raylet is gone; Run's exit kills any still there after 5 s, by pid.
    assert finished, "no trial finished in time"
    assert not session_pids(first.pid)
    assert not any("gcs_server" in p or "raylet" in p for p in first.stragglers)
    states_at_kill = _trial_states(exp)

    started = time.monotonic()
    with Run(cmd, tmp_path / "second.log") as second:
        assert second.wait(timeout=420) == 0, second.output()[-4000:]
    rerun_s = time.monotonic() - started
    assert "resuming the search" in second.output()
    rows = _rows(tmp_path / "out")
    assert len(rows) == SAMPLES and {r["status"] for r in rows.values()} == {"TERMINATED"}
    after = _reported_epochs(exp)
    rerun = [t for t in finished if after[t] != before[t]]
    assert not rerun, (rerun, before, after)  # finished trials kept as they were
    for trial in finished:
        assert int(rows[trial]["epochs"]) == len(before[trial])
    assert finished < set(rows)  # and the rest were run after the restore
    for trial, epochs in after.items():  # every trial's epochs are 1..k
        assert not epochs or sorted(set(epochs)) == list(range(1, max(epochs) + 1)), (trial, epochs)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["resumed"] is True
    unfinished = sorted(set(rows) - finished)
    record_figures("tune_driver_kill", {
        "samples": SAMPLES, "max_epochs": MAX_EPOCHS, "kill_at_s": round(t_kill, 1),
        "finished_before_kill": len(finished),
        "running_or_pending_at_kill": sum(s != "TERMINATED" for s in states_at_kill.values()),
        "trials_created_before_kill": len(states_at_kill),
        "finished_after_rerun": sum(r["status"] == "TERMINATED" for r in rows.values()),
        "finished_trials_rerun": len(rerun),
        "epochs_reported_twice": {t: len(e) - len(set(e)) for t, e in after.items()
                                  if len(e) != len(set(e))},
        "unfinished_trials_epochs_before_kill": {t: before.get(t, []) for t in unfinished},
        "stragglers_killed_by_pid": len(first.stragglers),
        "rerun_s": round(rerun_s, 1), "rerun_wall_s": summary.get("wall_s")})
