"""The head node dies under load and serving goes on (GCS fault tolerance with a real Redis).

A two-node Ray cluster on loopback (tests/reliability/_ha_cluster.py): the head at 127.0.0.3
keeps its GCS state in Redis and runs no replica; the worker at 127.0.0.2 runs every Serve
replica and its own HAProxy, which is where clients connect (the HTTP entry point does not live
on the head). Under steady load at concurrency 8 on ``/v1/classify``:

1. SIGKILL of the head's GCS server. The outage lasts ``OUTAGE_S``; then the rest of the head
   is stopped and ``ray start --head`` is run again with the same port, Redis and namespace,
   as KubeRay restarts a head pod whose GCS died.
2. SIGKILL of the whole head at once (GCS, raylet, the Serve controller, the head's HAProxy and
   fallback proxy, ...), ``OUTAGE_S`` down, then the same restart.

Required in both: zero failed requests before, during and after (the client retry policy of
README's "Retries" section, retries counted), the same Serve replicas after recovery (the
worker's processes survived), every application RUNNING again, and requests succeeding after.
Figures go to RELIABILITY.md.

    .venv/bin/python -m pytest tests/reliability/test_head_failure.py -s
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _ha_cluster import HaCluster

from serve_app.testing import make_classifier, png_bytes, random_images

pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="redis-server is not installed (.ci/system-deps.sh)")]

CONCURRENCY = 8
STEADY_S = 8.0  # load before the fault and after recovery
OUTAGE_S = 15.0  # how long the head stays down
RECOVERY_TIMEOUT_S = 240.0
IMG = png_bytes(random_images(1, seed=3)[0])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Any:
    logs = tmp_path_factory.mktemp("ha-logs")
    c = HaCluster(logs)
    try:
        c.start_redis()
        c.start_head()
        c.start_worker()
        c.url = c.deploy(make_classifier(logs / "clf"), tta="none")
        _warm(c.url)
        yield c
    finally:
        left = c.stop()
        assert not left, f"processes of the test cluster survived: {left}"


def _warm(url: str) -> None:
    """The first request of a fresh replica compiles and allocates (seconds on 2 cores)."""
    import requests

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            r = requests.post(url + "/v1/classify", data=IMG,
                              headers={"Content-Type": "image/png"}, timeout=60)
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError("the app did not answer before the test")


def _replica_pids(c: HaCluster) -> dict[str, int]:
    """Serve replica processes on the worker node, by their process title."""
    from _ha_cluster import pids_with

    out = {}
    for pid in pids_with(c.worker.marker):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if title.startswith("ray::ServeReplica"):
            out[title] = pid
    return out


def _all_running(c: HaCluster) -> bool:
    status = c.serve_status()
    return bool(status) and all(
        app["status"] == "RUNNING" and all(d["replicas"] == {"RUNNING": 1}
                                           for d in app["deployments"].values())
        for app in status.values())


def _wait(ok: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except Exception:  # noqa: BLE001 - the head is still coming back
            pass
        time.sleep(1)
    raise AssertionError(f"{what} within {timeout_s:.0f}s")


def run_head_failure(c: HaCluster, load_tools: Any, fail: Callable[[], dict[str, Any]]
                     ) -> dict[str, Any]:
    """Steady load; ``fail()`` ("during"); ``OUTAGE_S`` down; the head restarted; wait until
    Serve is RUNNING ("after"); more load. Returns the figures."""
    replicas = _replica_pids(c)
    load = load_tools.Load(c.url + "/v1/classify", IMG, {"Content-Type": "image/png"},
                           concurrency=CONCURRENCY, timeout_s=60.0)
    try:
        load.start()
        load.wait_for(20, "before", timeout_s=120)
        time.sleep(STEADY_S)
        t_fault = load.mark("during")
        detail = fail()
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t_fault)))
        served_down = load.count("during")
        c.kill_head()  # what is left of it, as a pod restart would
        restart_s = c.start_head()
        head_back_s = time.monotonic() - t_fault
        _wait(lambda: _all_running(c), RECOVERY_TIMEOUT_S, "Serve RUNNING again")
        recovery_s = time.monotonic() - t_fault
        load.mark("after")
        load.wait_for(20, "after", timeout_s=120)
        time.sleep(STEADY_S)
    finally:
        load.stop()
    summary = load.summary()
    return {**detail, "outage_s": OUTAGE_S, "ray_start_head_s": round(restart_s, 1),
            "head_back_s": round(head_back_s, 1), "serve_running_s": round(recovery_s, 1),
            "served_while_head_down": served_down, "concurrency": CONCURRENCY,
            "replicas_before": replicas, "replicas_after": _replica_pids(c),
            "redis_keys": int(c.redis("DBSIZE") or 0),
            "phases": summary["phases"], "all": summary["all"]}


def _assert_served_through(figures: dict[str, Any]) -> None:
    for phase in ("before", "during", "after"):
        f = figures["phases"][phase]
        assert f["sent"] > 0, f"no request {phase}: {figures}"
        assert f["failed"] == 0, f"{f['failed']} failed requests {phase}: {f}"
    assert figures["served_while_head_down"] > 0
    # the replicas on the worker lived through it: same processes, none restarted
    assert figures["replicas_after"] == figures["replicas_before"]
    assert figures["redis_keys"] > 0


def test_gcs_kill_under_load_fails_no_request(cluster, load_tools, record_figures):
    def fail() -> dict[str, Any]:
        pids = cluster.kill_gcs()
        assert pids, "no gcs_server found on the head"
        return {"scenario": "SIGKILL of the head's gcs_server, then the head restarted",
                "killed": {"gcs_server": pids}}

    figures = run_head_failure(cluster, load_tools, fail)
    record_figures("head_gcs_kill", figures)
    _assert_served_through(figures)


def test_whole_head_kill_under_load_fails_no_request(cluster, load_tools, record_figures):
    def fail() -> dict[str, Any]:
        pids = cluster.kill_head()
        assert len(pids) >= 4, pids  # GCS, raylet, the controller, ... at least
        return {"scenario": "SIGKILL of every process of the head node, then the head "
                            "restarted", "killed_processes": len(pids)}

    figures = run_head_failure(cluster, load_tools, fail)
    record_figures("head_whole_kill", figures)
    _assert_served_through(figures)
