"""``mve serve``: the mve applications on an embedded Ray (or a running cluster).

    mve serve                                    # the shipped models, http://127.0.0.1:8000/
    mve serve --classifier runs/clf --tta none --max-batch-size 64 --port 8080

An embedded Ray gets the data-plane environment of :mod:`serve_app.dataplane` (HAProxy on the
HTTP port, one Python process per request); ``--address`` uses the cluster's own.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mve.errors import UserError
from serve_app.dataplane import applied, embedded_env, free_port
from serve_app.families import SERVED
from serve_app.metrics_relay import MetricsRelay

__all__ = ["serve_parent", "apply_default_models", "serve_command"]


def serve_parent() -> argparse.ArgumentParser:
    """Options of ``mve serve``."""
    p = argparse.ArgumentParser(add_help=False)
    for family in SERVED.values():
        p.add_argument(f"--{family.name}", metavar="DIR",
                       help=f"{family.title} checkpoint directory or URI")
    p.add_argument("--no-defaults", action="store_true",
                   help="do not fall back to the shipped checkpoints under models/ for a model "
                        "that is not given")
    p.add_argument("--host", default="127.0.0.1",
                   help="HTTP bind address (default 127.0.0.1; 0.0.0.0 to listen on all); "
                        "the embedded Ray itself always listens on loopback only")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--metrics-port", type=int, metavar="P",
                   help="Prometheus export port of the embedded Ray (/metrics)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="H",
                   help="where --metrics-port listens (default 127.0.0.1; e.g. 0.0.0.0 for a "
                        "Prometheus in a container): only GET /metrics is served there")
    p.add_argument("--address", help="join this Ray cluster instead of starting one (e.g. auto); "
                                      "checkpoint paths must then exist on its nodes, or be URIs")
    p.add_argument("--api-key-file", metavar="F", help="require this API key on inference "
                   "routes (else $MVE_API_KEY when set; else the routes are open)")
    p.add_argument("--config", metavar="YAML", help="Serve config to start from "
                   "(default serve_app/config.yaml)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray (default: all)")
    tuning = p.add_argument_group("model serving options (each model's user_config; the "
                                  "defaults are serve_app/config.yaml's)")
    tuning.add_argument("--tta", choices=["none", "flip", "flip_translate"],
                        help="classifier test-time augmentation: flip (the default) costs 2x "
                             "the compute of none, flip_translate 6x (see BENCHMARKS.md)")
    tuning.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                        help="classifier arithmetic: auto (the default) is bf16 on a CPU with "
                             "native bfloat16 (about 1.7x faster, same accuracy within 0.06 "
                             "points; BENCHMARKS.md), else fp32")
    tuning.add_argument("--replicas", action="append", metavar="N|MODEL=N",
                        help="a fixed number of replicas per model instead of autoscaling "
                             "(1-2): N for every model, or e.g. classifier=3 (repeatable)")
    tuning.add_argument("--max-batch-size", type=int, help="images per forward pass (32)")
    tuning.add_argument("--batch-wait-timeout-s", type=float,
                        help="how long a batch that is not full may wait for more requests "
                             "while none is queued (0: greedy, the default)")
    tuning.add_argument("--torch-threads", type=int,
                        help="torch threads per model replica (default: the embedded Ray's "
                             "CPUs minus one, at least 1, leaving a core to request handling; "
                             "with --address, Ray's: 1 per CPU the replica reserves)")
    return p


def _local_path(value: str | None, check: bool) -> str | None:
    """Absolute path for a local checkpoint (replicas run elsewhere); URIs unchanged.

    With ``check`` (embedded Ray) the checkpoint is validated here, before Ray starts.
    """
    if value is None or urlparse(value).scheme not in ("", "file"):
        return value
    path = Path(urlparse(value).path if value.startswith("file:") else value).expanduser()
    if check:
        from mve.checkpoint import read_meta

        read_meta(path)  # a clear CheckpointError before anything starts
    return str(path.resolve())


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _save_config(config: dict[str, Any], port: int) -> Path:
    """Writes the effective Serve config (what ``serve deploy`` needs for an in-place update);
    removed again when ``mve serve`` stops."""
    import tempfile

    import yaml

    path = Path(tempfile.gettempdir()) / f"mve-serve-{port}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def apply_default_models(args: argparse.Namespace) -> argparse.Namespace:
    """Fills a missing ``--<family>`` with the shipped default checkpoint
    (``models/cifar10-*``, see :mod:`mve.pretrained`) unless ``--no-defaults``."""
    if getattr(args, "no_defaults", False):
        return args
    from mve.pretrained import default_checkpoint

    for kind in SERVED:
        if not getattr(args, kind, None):
            found = default_checkpoint(kind)
            if found is not None:
                setattr(args, kind, str(found))
                print(f"mve serve: {kind}: the shipped default {found}", file=sys.stderr)
    return args


def serve_command(args: argparse.Namespace) -> int:
    """Runs the app on an embedded local Ray (or ``--address``) until SIGINT/SIGTERM."""
    config = _app_config(args)
    local = args.address is None
    if local:  # a cluster (--address) brings its own data-plane environment
        os.environ.update(embedded_env(http_host=args.host))
    import ray

    _console_env(local)
    init, relay = _ray_init_options(args)
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signals}
    saved: Path | None = None
    try:
        with _loopback_node() if local else nullcontext():
            context = ray.init(**init)
        for s in signals:
            signal.signal(s, _raise_interrupt)
        if relay is not None:
            relay.start()
        saved = _deploy_and_announce(config, args, context)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("mve serve: stopping", file=sys.stderr, flush=True)
    finally:
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        if saved is not None:
            saved.unlink(missing_ok=True)
        if relay is not None:
            relay.close()
        try:
            _stop(config, local)
        finally:
            ray.shutdown()
            for s, handler in previous.items():
                signal.signal(s, handler)
    return 0


@contextmanager
def _loopback_node() -> Iterator[None]:
    """While the embedded Ray starts inside the block, its node address is loopback.

    Ray's switch for a node that is not part of a cluster (its default on macOS and Windows)
    makes the node's address 127.0.0.1: GCS, raylets, workers and agents bind that, and the
    replicas' gRPC servers follow (``dataplane.bind_replica_grpc_to_loopback``). Set for the
    processes Ray starts and, since this one read it when ``ray`` was imported, here; both
    restored afterwards. ``cluster.common`` does the same for ``mve train`` and ``mve tune``.
    """
    from ray._private import ray_constants

    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with applied({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag


def _console_env(embedded: bool) -> None:
    """What ``cluster.common`` does for ``mve train`` and ``mve tune`` (this package does not
    import that one): the replicas' forwarded lines without ANSI colour codes when the output
    is not a terminal (Ray colours their prefix unless ``RAY_COLOR_PREFIX=0``), and, for the
    embedded Ray, token auth asked for explicitly. Ray 2.60 turns it on by default for a new
    local instance and then warns "Token authentication is enabled ... Set
    RAY_AUTH_MODE=disabled to opt out"; it stays on (loopback ports are open to every local
    user) and the warning goes. Values the user set are kept.
    """
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if embedded and os.environ.get("RAY_AUTH_MODE") is None:
        from ray._raylet import Config

        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # this process read the mode when ray was imported (as Ray does)


def _ray_init_options(args: argparse.Namespace) -> tuple[dict[str, Any], MetricsRelay | None]:
    """``ray.init``'s arguments, and the relay that widens ``--metrics-port`` if asked."""
    init: dict[str, Any] = {"address": args.address or "local", "namespace": "serve",
                            "logging_level": logging.WARNING}
    if args.address is not None:
        if args.metrics_port is not None:
            print("mve serve: --metrics-port only applies to the embedded Ray; the cluster's "
                  "nodes export metrics on their own port", file=sys.stderr)
        return init, None
    init["num_cpus"] = args.num_cpus
    if args.metrics_port is None or _is_loopback(args.metrics_host):
        init["_metrics_export_port"] = args.metrics_port
        return init, None
    # Ray's export port stays on loopback; the relay takes the user's port on their host.
    init["_metrics_export_port"] = free_port()
    try:
        relay = MetricsRelay(args.metrics_host, args.metrics_port, init["_metrics_export_port"])
    except OSError as exc:
        raise UserError(f"--metrics-host {args.metrics_host} --metrics-port "
                        f"{args.metrics_port}: {exc.strerror or exc}") from None
    return init, relay


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _app_config(args: argparse.Namespace) -> dict[str, Any]:
    """The Serve config of ``mve serve``'s flags (checked before Ray starts)."""
    apply_default_models(args)
    if not any(getattr(args, kind) for kind in SERVED):
        flags = " and/or ".join(f"--{kind} DIR" for kind in SERVED)
        raise UserError(f"give {flags} (no shipped default checkpoints under models/)")
    from serve_app.deploy import app_config, fixed_replicas, load_config

    key_file = str(Path(args.api_key_file).expanduser().resolve()) if args.api_key_file else None
    local = args.address is None
    if key_file and local and not Path(key_file).is_file():
        raise UserError(f"API key file {key_file} does not exist")
    threads = args.torch_threads
    if threads is None and local:  # a replica reserves a fraction of a CPU: Ray would give 1
        # One core fewer than the machine's: the replica's event loop (HTTP, decoding), HAProxy
        # and Ray need one, and torch threads that share it spin-wait in OpenMP (on 2 cores, 1
        # thread served more requests at 16-51% less CPU per request: BENCHMARKS.md).
        threads = max(1, (args.num_cpus or os.cpu_count() or 1) - 1)
    checkpoints = {kind: _local_path(getattr(args, kind), check=local) for kind in SERVED}
    # Embedded: Serve (and so every replica) binds loopback; HAProxy takes --host (dataplane).
    host = "127.0.0.1" if local else args.host
    config = app_config(load_config(args.config), checkpoints, host=host, port=args.port,
                        api_key_file=key_file, max_batch_size=args.max_batch_size,
                        batch_wait_timeout_s=args.batch_wait_timeout_s, tta=args.tta,
                        torch_threads=threads, precision=args.precision)
    for model, n in replica_counts(args.replicas).items():
        config = fixed_replicas(config, n, model=model)
    return config


def replica_counts(specs: list[str] | None) -> dict[str, int]:
    """``--replicas`` values (``N`` or ``MODEL=N``) -> replicas per model; later ones win."""
    out: dict[str, int] = {}
    for spec in specs or []:
        model, _, count = spec.rpartition("=")
        models = [model] if model else list(SERVED)
        if model and model not in SERVED:
            raise UserError(f"--replicas {spec}: unknown model {model!r}; models: "
                            f"{', '.join(SERVED)}")
        if not count.isdigit() or int(count) < 1:
            raise UserError(f"--replicas {spec}: the count must be a whole number >= 1")
        out.update(dict.fromkeys(models, int(count)))
    return out


def _deploy_and_announce(config: dict[str, Any], args: argparse.Namespace,
                         context: Any) -> Path | None:
    """Deploys ``config`` and prints where it answers; returns the hot-swap config it saved."""
    from serve_app.deploy import deploy

    try:
        deploy(config)
    except RuntimeError as exc:  # the app failed to start, e.g. an unloadable checkpoint
        raise UserError(str(exc)) from None
    local = args.address is None
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{host}:{args.port}/"
    print(f"mve serve: {url} (API docs {url}docs, Open Inference Protocol {url}v2)", flush=True)
    if local and args.metrics_port:
        metrics = "127.0.0.1" if args.metrics_host in ("0.0.0.0", "::") else args.metrics_host
        print(f"mve serve: metrics http://{metrics}:{args.metrics_port}/metrics", flush=True)
    saved = None
    if local and getattr(context, "dashboard_url", None):
        saved = _save_config(config, args.port)
        print(f"mve serve: to hot-swap a model, edit user_config.checkpoint in {saved} and "
              f"run `RAY_AUTH_MODE=token serve deploy {saved} -a "
              f"http://{context.dashboard_url}`", flush=True)
    print("mve serve: Ctrl-C to stop", flush=True)
    return saved


def _stop(config: dict[str, Any], local: bool) -> None:
    """Shuts the embedded Serve down, or deletes this run's apps from a cluster's Serve."""
    import ray
    from ray import serve

    if ray.is_initialized() and local:
        serve.shutdown()
    elif ray.is_initialized():
        for app in config["applications"]:
            serve.delete(app["name"])


