"""The servers ``bench/bench_serve.py`` compares, each started as its user would start it.

Every server serves the same checkpoint (a copy of the shipped classifier with the run's TTA
mode written into its config, loaded by each with ``mve.checkpoint.load_checkpoint``), runs in
a session of its own (``setsid``: its CPU is measured by session, and stopping it kills
everything it started) and is ready when its health route answers 200.

- ``bare``, ``bare-batched``, ``litserve``, ``triton``: the peers in ``bench/peers/``, with the
  model as ``load_checkpoint`` returns it (what their users would run);
- ``bare-batched-opt``: a reference, not a peer: the batched bare server given the model
  optimizations ``mve serve`` applies (``mve.inference``: channels-last weights, and bfloat16
  where the CPU has it natively), so that the table also shows what the data plane alone is
  worth;
- ``mve-old``: the data plane before the one-hop change (HTTP proxy -> FastAPI ingress
  replica -> model replica, ``@serve.batch``), the ``serve_app`` of git revision ``--old-rev``
  run by its own ``serve`` command, 1 replica per deployment;
- ``mve``: ``mve serve`` (HAProxy -> the model replica), 1 replica per application;
- ``mve-fp32``: the same with ``--precision fp32`` (the default ``auto`` is bfloat16 on a CPU
  with native bfloat16): mve's data plane with the peers' arithmetic;
- ``mve-allthreads``: the same with ``--torch-threads`` at the machine's CPUs (the default
  before it became the CPUs minus one: torch threads then share a core with the replica's
  event loop, HAProxy and the client).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO / "bench" / "peers"
ALL_FORMATS = ("raw", "json", "oip")
PEER_FORMATS = {"bare": ALL_FORMATS, "bare-batched": ALL_FORMATS, "litserve": ALL_FORMATS,
                "triton": ("oip",), "bare-batched-opt": ALL_FORMATS}
PEER_SCRIPTS = {"bare": "bare.py", "bare-batched": "bare_batched.py",
                "litserve": "litserve_server.py", "triton": "triton_server.py",
                "bare-batched-opt": "bare_batched.py"}
SETUPS = (*PEER_SCRIPTS, "mve-old", "mve", "mve-fp32", "mve-allthreads")

__all__ = ["SETUPS", "ALL_FORMATS", "Context", "Server", "start"]


@dataclass
class Context:
    """What every server of one run gets."""

    checkpoint: Path  # the shipped classifier with the run's TTA mode
    tta: str
    threads: int  # torch threads of the peers (mve keeps its own default)
    work: Path  # scratch directory
    old_tree: Path | None = None  # an extracted old `serve_app`, for mve-old
    python: str = sys.executable


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    base: str
    formats: tuple[str, ...]
    stats: Callable[[], tuple[int, int] | None]  # (forward passes, images) so far
    log: Path
    metrics_lag_s: float = 0.0  # how long its batch statistics take to show up
    meta: dict = field(default_factory=dict)

    def stop(self) -> None:
        """SIGINT (a clean stop, as Ctrl-C), then SIGKILL to whatever of its session is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _kill_session(self.proc.pid)  # e.g. an HAProxy in a process group of its own


def _kill_session(sid: int) -> None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(raw[raw.rindex(")") + 2:].split()[3]) == sid:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _spawn(name: str, cmd: list[str], ctx: Context, env: dict[str, str]) -> tuple[
        subprocess.Popen, Path]:
    log = ctx.work / f"{name}.log"
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **env},
                            cwd=ctx.work)
    return proc, log


def _wait_ready(server: Server, path: str, timeout_s: float = 300.0) -> Server:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited: {server.log.read_text()[-2000:]}")
        try:
            _get(server.base + path)
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"{server.name} not ready after {timeout_s:.0f}s: "
                                   f"{server.log.read_text()[-2000:]}") from None
            time.sleep(0.5)


def _peer(name: str, ctx: Context) -> Server:
    port = _free_port()
    cmd = [ctx.python, str(PEERS / PEER_SCRIPTS[name]), "--port", str(port), "--checkpoint",
           str(ctx.checkpoint), "--tta", ctx.tta, "--threads", str(ctx.threads),
           *(["--optimize"] if name.endswith("-opt") else [])]
    proc, log = _spawn(name, cmd, ctx, {})
    base = f"http://127.0.0.1:{port}"

    def stats() -> tuple[int, int] | None:
        try:
            if name == "triton":  # Triton's own statistics: executions and inferences
                (m,) = json.loads(_get(base + "/v2/models/classifier/stats"))["model_stats"]
                return int(m["execution_count"]), int(m["inference_count"])
            s = json.loads(_get(base + "/stats"))
            return int(s["batches"]), int(s["images"])
        except (OSError, KeyError, ValueError):
            return None
    server = Server(name, proc, base, PEER_FORMATS[name], stats, log)
    # Triton's server readiness answers before PyTriton has loaded the model: ask the model
    return _wait_ready(server, "/v2/models/classifier/ready" if name == "triton" else "/health")


_COUNTERS = re.compile(r'^ray_mve_forward_(passes|images)_total\{[^}]*\} ([\d.e+-]+)$', re.M)
_BUCKETS = re.compile(r'^ray_mve_batch_size_bucket\{[^}]*le="([^"]+)"[^}]*\} ([\d.e+-]+)$',
                      re.M)


def _ray_stats(metrics_url: str) -> Callable[[], tuple[int, int] | None]:
    """Forward passes and images from mve's exact counters; for the old data plane (which had
    only the ``ray_mve_batch_size`` histogram), the bucket upper bounds (so the mean batch
    size derived from them is an upper bound)."""
    def stats() -> tuple[int, int] | None:
        try:
            text = _get(metrics_url).decode()
        except OSError:
            return None
        found = dict.fromkeys(("passes", "images"), 0.0)
        for kind, value in _COUNTERS.findall(text):
            found[kind] += float(value)
        if found["passes"]:
            return int(found["passes"]), int(found["images"])
        cumulative = sorted(((float("inf") if le == "+Inf" else float(le)), float(n))
                            for le, n in _BUCKETS.findall(text))
        passes, images, below = 0.0, 0.0, 0.0
        for le, n in cumulative:  # one replica: the buckets are cumulative counts
            passes, images, below = n, images + (n - below) * min(le, 1024), n
        return int(passes), int(images)
    return stats


def _pinned(config: dict) -> dict:
    for app in config["applications"]:
        for dep in app.get("deployments", []):
            dep.setdefault("autoscaling_config", {}).update(
                min_replicas=1, max_replicas=1, initial_replicas=1)
    return config


def _ray_server(name: str, ctx: Context, cmd: list[str], config: dict,
                extra: list[str], env: dict[str, str] | None = None) -> Server:
    port, mport = _free_port(), _free_port()
    cfg_path = ctx.work / f"{name}-serve.yaml"
    cfg_path.write_text(yaml.safe_dump(_pinned(config), sort_keys=False))
    cmd = [*cmd, "serve", "--classifier", str(ctx.checkpoint), "--no-defaults", "--config",
           str(cfg_path), "--port", str(port), "--metrics-port", str(mport), "--num-cpus", "2",
           *extra]
    proc, log = _spawn(name, cmd, ctx, {"RAY_metrics_report_interval_ms": "500", **(env or {})})
    server = Server(name, proc, f"http://127.0.0.1:{port}", ALL_FORMATS,
                    _ray_stats(f"http://127.0.0.1:{mport}/metrics"), log, metrics_lag_s=2.0)
    return _wait_ready(server, "/v2/health/ready")


def _mve(ctx: Context, name: str = "mve", extra: tuple[str, ...] = ()) -> Server:
    sys.path.insert(0, str(REPO))
    from serve_app.deploy import load_config

    mve = Path(ctx.python).with_name("mve")
    return _ray_server(name, ctx, [str(mve)], load_config(), ["--tta", ctx.tta, *extra])


def extract_old_tree(rev: str, work: Path) -> Path:
    """``serve_app`` as of git revision ``rev``, extracted under ``work`` (needs git)."""
    out = work / f"serve_app-{rev}"
    if not (out / "serve_app").exists():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "serve_app"],
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
            tar.extractall(out, filter="data")
    return out


def _mve_old(ctx: Context) -> Server:
    assert ctx.old_tree is not None
    # PYTHONPATH, not sys.path: Ray's controller and replicas must import the old code too
    code = "import sys; from serve_app.cli import main; sys.exit(main(sys.argv[1:]))"
    with open(ctx.old_tree / "serve_app" / "config.yaml") as f:
        config = yaml.safe_load(f)
    return _ray_server("mve-old", ctx, [ctx.python, "-c", code], config, [],
                       {"PYTHONPATH": str(ctx.old_tree)})


def start(name: str, ctx: Context) -> Server:
    """Starts setup ``name`` and waits until it is ready."""
    if name == "mve":
        return _mve(ctx)
    if name == "mve-fp32":
        return _mve(ctx, name, ("--precision", "fp32"))
    if name == "mve-allthreads":
        return _mve(ctx, name, ("--torch-threads", str(os.cpu_count() or 1)))
    if name == "mve-old":
        return _mve_old(ctx)
    return _peer(name, ctx)
