"""Deploying ``serve_app/config.yaml`` from Python, exactly as ``serve run config.yaml`` does.

``mve serve``, the integration tests and the benchmark all start from the same config file:
:func:`app_config` fills in checkpoints and arguments, :func:`deploy` submits it to the Serve
controller (``deploy_apps``, the call behind ``serve run``/``serve deploy``) and waits. A second
:func:`deploy` of the same app with only ``user_config`` changed is an in-place update
(``reconfigure``), which is how checkpoints are hot-swapped.

Only :func:`deploy` and :func:`wait_for_app` import Ray (lazily).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULT_CONFIG", "APP_NAME", "DEPLOYMENT_NAMES", "load_config", "app_config",
           "set_user_config", "deploy", "wait_for_app"]

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
APP_NAME = "mve"
DEPLOYMENT_NAMES = {"classifier": "Classifier", "vae": "VAE"}


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """Reads a Serve config file (default ``serve_app/config.yaml``)."""
    with open(path or DEFAULT_CONFIG) as f:
        return yaml.safe_load(f)


def _app(config: dict[str, Any], name: str) -> dict[str, Any]:
    for app in config["applications"]:
        if app["name"] == name:
            return app
    raise KeyError(f"no application {name!r} in the config")


def app_config(config: dict[str, Any], *, classifier: str | None, vae: str | None,
               host: str | None = None, port: int | None = None, name: str = APP_NAME,
               route_prefix: str | None = None, **args: Any) -> dict[str, Any]:
    """A copy of ``config`` serving the given checkpoints, with extra app ``args``.

    Drops the deployment entry of an absent model, sets each present model's
    ``user_config.checkpoint`` (and batching args, when given) and the HTTP host/port.
    """
    out = copy.deepcopy(config)
    app = _app(out, APP_NAME)
    app["name"] = name
    if route_prefix is not None:
        app["route_prefix"] = route_prefix
    app_args = app.setdefault("args", {})
    app_args.update({k: v for k, v in args.items() if v is not None})
    paths = {"classifier": classifier, "vae": vae}
    keep = []
    for dep in app.get("deployments", []):
        model = next((m for m, d in DEPLOYMENT_NAMES.items() if d == dep["name"]), None)
        if model is not None and paths[model] is None:
            continue
        if model is not None:
            uc = dep.setdefault("user_config", {})
            uc["checkpoint"] = paths[model]
            for key in ("max_batch_size", "batch_wait_timeout_s"):
                if args.get(key) is not None:
                    uc[key] = args[key]
        keep.append(dep)
    app["deployments"] = keep
    for model, path in paths.items():
        if path is None:
            app_args.pop(model, None)
        else:
            app_args[model] = path
    http = out.setdefault("http_options", {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    return out


def set_user_config(config: dict[str, Any], model: str, name: str = APP_NAME,
                    **values: Any) -> dict[str, Any]:
    """A copy of ``config`` with ``values`` merged into ``model``'s ``user_config``."""
    out = copy.deepcopy(config)
    for dep in _app(out, name)["deployments"]:
        if dep["name"] == DEPLOYMENT_NAMES[model]:
            dep.setdefault("user_config", {}).update(values)
            return out
    raise KeyError(f"{model} is not deployed in application {name!r}")


def _last_line(message: str) -> str:
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def wait_for_app(name: str = APP_NAME, *, after: float = 0.0, timeout_s: float = 180.0) -> None:
    """Waits until application ``name`` (deployed after ``after``) is RUNNING.

    Raises:
        RuntimeError: it failed to deploy (with Serve's messages) or did not start in time.
    """
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = "not submitted"
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        if app is not None and app.last_deployed_time_s >= after:
            last = f"{app.status.value}: {app.message}"
            if app.status.value == "RUNNING":
                return
            if app.status.value in ("DEPLOY_FAILED", "UNHEALTHY"):
                # Serve's messages end with the replica's traceback: keep its last line.
                details = "; ".join(f"{d}: {_last_line(s.message)}"
                                    for d, s in app.deployments.items() if s.message)
                raise RuntimeError(f"application {name!r} failed to deploy: "
                                   f"{details or _last_line(app.message)}")
        time.sleep(0.5)
    raise RuntimeError(f"application {name!r} was not RUNNING after {timeout_s:.0f}s ({last})")


def deploy(config: dict[str, Any], *, wait: bool = True, timeout_s: float = 180.0) -> None:
    """Submits a Serve config (starting Serve with its ``http_options`` if needed) and waits.

    Ray must already be initialised (``ray.init``).
    """
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    serve.start(proxy_location=schema.proxy_location,
                http_options=schema.http_options.model_dump())
    submitted = time.time() - 1.0
    _get_global_client().deploy_apps(schema)
    if wait:
        for app in schema.applications:
            wait_for_app(app.name, after=submitted, timeout_s=timeout_s)
