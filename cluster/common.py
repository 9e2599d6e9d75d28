"""Small Ray-side helpers shared by the Train and Tune entrypoints."""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from mve.errors import UserError

__all__ = ["init_ray", "plain_prefixes", "explicit_token_auth", "check_gpus", "scalar_metrics",
           "fetch_checkpoint"]

logger = logging.getLogger(__name__)

# Ray's switch for a node that is not part of a cluster (its default on macOS and Windows):
# the node's address is 127.0.0.1, so GCS, raylets, workers' gRPC servers and the agents bind
# loopback instead of every interface. Verified with the socket table (tests/integration/
# test_listening_sockets.py); serve_app/embedded.py does the same for `mve serve`.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE_ENV = "RAY_AUTH_MODE"


def plain_prefixes() -> None:
    """Ray's prefix of each forwarded worker line (``(RayTrainWorker pid=...)``) without ANSI
    colour codes when the output goes to a file or a pipe, where they are noise.

    Ray colours the prefix unless ``RAY_COLOR_PREFIX=0``, which the driver reads as it prints
    (``ray._private.worker.print_to_stdstream``), so setting it here, at any time before
    workers print, is enough. A value the user set is kept.
    """
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def explicit_token_auth() -> None:
    """Token authentication for an embedded Ray, asked for explicitly.

    Ray (2.52 and later) turns token auth on for every new local instance when
    ``RAY_AUTH_MODE`` is unset, and then warns on every start ("Token authentication is
    enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out"). The embedded Ray
    binds loopback only, but other users of the machine can reach loopback ports, so the token
    stays on; saying so ourselves is what silences the warning. Ray then creates
    ``~/.ray/auth_token`` if it is missing, as before. A mode the user set, ``disabled``
    included, is left alone, as Ray itself leaves it. Not for ``--address``: a cluster's mode
    is its own.
    """
    if os.environ.get(AUTH_MODE_ENV) is not None:
        return
    from ray._raylet import Config

    os.environ[AUTH_MODE_ENV] = "token"  # for the processes ray.init starts, as Ray would set
    Config.initialize("")  # this process read the mode when ray was imported (as Ray does)


@contextmanager
def _loopback_node() -> Iterator[None]:
    """While Ray starts inside the block, its node address is loopback.

    The processes ``ray.init`` starts inherit the variable (and the workers they start, from
    them); this process read it when ``ray`` was imported, so its copy is set too. Both are
    restored afterwards: a later ``ray start`` from this process must still be able to form
    a cluster.
    """
    from ray._private import ray_constants

    env = {LOOPBACK_ENV: "0"}
    # Gloo's listeners (Ray Train's CPU process group) bind the interface of the host name
    # unless told; rank 0's rendezvous store is cluster.torch_backend's concern.
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if loopback and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = loopback[0]
    saved_env = {k: os.environ.get(k) for k in env}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(env)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def init_ray(address: str | None = None, *, num_cpus: int | None = None,
             num_gpus: int | None = None) -> bool:
    """Connects to ``address`` (or ``$RAY_ADDRESS``, as set for a submitted job) or starts an
    embedded instance; True when this call started one. An embedded instance binds every
    socket to loopback (:func:`_loopback_node`).

    Never calls a bare ``ray.init()``, which would join whatever cluster a previous
    ``ray start`` left behind (even a dead one whose address file remains).
    """
    if ray.is_initialized():
        return False
    plain_prefixes()
    # Inside `ray job submit` the job supervisor sets RAY_ADDRESS: join that cluster.
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return False
    explicit_token_auth()
    # With the dashboard: Ray Train's PlacementGroupCleaner asks the State API (served by the
    # dashboard) about its controller every second, and without one it logs a warning each
    # time (300 lines in a 7-minute `make run`). It listens on loopback only.
    with _loopback_node():
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                 include_dashboard=True, dashboard_host="127.0.0.1",
                 logging_level=logging.WARNING)
    if not ray.util.get_node_ip_address().startswith("127."):
        logger.warning("this Ray's node address is %s: its control plane may listen beyond "
                       "loopback", ray.util.get_node_ip_address())
    return True


def check_gpus(needed: float, *, embedded: bool, what: str) -> None:
    """Fails at once when ``what`` needs ``needed`` GPUs (per worker or trial) that this Ray
    instance does not have and never will: an embedded Ray has the machine's devices and no
    autoscaler, so Ray would wait forever. A cluster may add GPU nodes (KubeRay's GPU worker
    group scales up from zero), so there it only says what it is waiting for.

    Raises:
        UserError: ``embedded`` and fewer than ``needed`` GPUs.
    """
    if needed <= 0:
        return
    have = float(ray.cluster_resources().get("GPU", 0.0))
    if have >= needed:
        return
    if embedded:
        raise UserError(f"{what} asks for {needed:g} GPU but this machine has {have:g} that Ray "
                        "can use (no CUDA device found); drop --gpu, or join a cluster with "
                        "GPU nodes (--address)")
    logger.warning("%s asks for %g GPU and the cluster has %g now: waiting for its autoscaler "
                   "to add a GPU node (Ctrl-C to stop)", what, needed, have)


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Keeps reportable scalars: drops ``_``-prefixed keys, nested values and NaN/inf."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if k.startswith("_") or isinstance(v, bool) or not isinstance(v, int | float | str):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out[k] = v
    return out


def fetch_checkpoint(checkpoint: Any, dest: str | Path, filesystem: Any | None = None) -> Path:
    """Copies a Ray ``Checkpoint``, or a checkpoint path/URI, into the local directory ``dest``."""
    import ray.train  # `import ray` alone does not load the ray.train submodule

    if isinstance(checkpoint, str | Path):
        checkpoint = ray.train.Checkpoint(str(checkpoint), filesystem=filesystem)
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.to_directory(str(dest))
    return dest
