"""Deploying ``serve_app/config.yaml`` from Python, exactly as ``serve run config.yaml`` does.

``mve serve``, the integration tests and the benchmark all start from the same config file:
:func:`app_config` fills in checkpoints and arguments, :func:`deploy` submits it to the Serve
controller (``deploy_apps``, the call behind ``serve run``/``serve deploy``) and waits for every
application. A second :func:`deploy` with only ``user_config`` changed is an in-place update
(``reconfigure``), which is how checkpoints are hot-swapped (:func:`set_user_config` changes
every application of a model at once).

Only :func:`deploy` and :func:`wait_for_app` import Ray (lazily).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULT_CONFIG", "APP_NAME", "USER_CONFIG_KEYS", "load_config",
           "app_config", "model_apps", "set_user_config", "fixed_replicas", "deploy", "wait_for_app"]

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
APP_NAME = "mve"  # the front application; the model apps are named after their model
# What `app_config(...)` keyword arguments set in each model deployment's user_config.
USER_CONFIG_KEYS = ("max_batch_size", "batch_wait_timeout_s", "tta", "torch_threads",
                    "precision")


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """Reads a Serve config file (default ``serve_app/config.yaml``).

    YAML anchors are resolved into independent copies (one app's ``user_config`` is never the
    same object as its twin's) and the ``x-*`` keys that only hold anchors are dropped.
    """
    with open(path or DEFAULT_CONFIG) as f:
        raw = yaml.safe_load(f)
    return {k: v for k, v in json.loads(json.dumps(raw)).items() if not k.startswith("x-")}


def model_apps(config: dict[str, Any]) -> dict[str, list[str]]:
    """``{model: [application names]}`` of the model applications in ``config``."""
    out: dict[str, list[str]] = {}
    for app in config["applications"]:
        model = (app.get("args") or {}).get("model")
        if model is not None:
            out.setdefault(model, []).append(app["name"])
    return out


def _app(config: dict[str, Any], name: str) -> dict[str, Any]:
    for app in config["applications"]:
        if app["name"] == name:
            return app
    raise KeyError(f"no application {name!r} in the config")


def app_config(config: dict[str, Any], checkpoints: Mapping[str, str | None], *,
               host: str | None = None, port: int | None = None, name: str = APP_NAME,
               mount: str = "", **args: Any) -> dict[str, Any]:
    """A copy of ``config`` serving ``checkpoints`` (``{family: checkpoint or None}``).

    Drops the applications of a model without a checkpoint, points each present model's
    deployments at its checkpoint, applies ``args``: :data:`USER_CONFIG_KEYS` go to every model
    deployment's ``user_config``, the rest (limits, ``api_key_file``, ...) to every application's ``args``
    (None values are ignored). With ``mount`` (e.g. ``/secure``) every route prefix moves under
    it and the applications are renamed ``<name>-<app>`` (the front becomes ``name``), so the
    result can be deployed next to the unmounted one.
    """
    out = copy.deepcopy(config)
    paths = dict(checkpoints)
    apps_of = model_apps(out)
    unknown = sorted(m for m, path in paths.items() if path is not None and m not in apps_of)
    if unknown:
        raise ValueError(f"the config has no applications for {unknown}; it serves "
                         f"{sorted(apps_of)}")
    present = {m: apps for m, apps in apps_of.items() if paths.get(m) is not None}
    keep = [a for a in out["applications"]
            if a["name"] == APP_NAME or (a.get("args") or {}).get("model") in present]
    renamed = {a["name"]: (name if a["name"] == APP_NAME else
                           f"{name}-{a['name']}" if mount else a["name"]) for a in keep}
    for app in keep:
        _configure_app(app, paths, args, mount)
        if app["name"] == APP_NAME:
            app["args"]["models"] = {m: [renamed[a] for a in apps] for m, apps in present.items()}
        app["name"] = renamed[app["name"]]
    out["applications"] = keep
    http = out.setdefault("http_options", {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    return out


def _configure_app(app: dict[str, Any], paths: dict[str, str | None], args: dict[str, Any],
                   mount: str) -> None:
    app_args = app.setdefault("args", {})
    app_args.update({k: v for k, v in args.items()
                     if v is not None and k not in USER_CONFIG_KEYS})
    if mount:
        app_args["mount"] = mount
        app["route_prefix"] = mount + ("" if app["route_prefix"] == "/" else app["route_prefix"])
    model = app_args.get("model")
    if model is None:
        return
    for dep in app.get("deployments", []):
        uc = dep.setdefault("user_config", {})
        uc["checkpoint"] = paths[model]
        uc.update({k: args[k] for k in USER_CONFIG_KEYS if args.get(k) is not None})


def set_user_config(config: dict[str, Any], model: str, **values: Any) -> dict[str, Any]:
    """A copy of ``config`` with ``values`` merged into the ``user_config`` of every
    deployment of ``model`` (all its applications change together)."""
    out = copy.deepcopy(config)
    apps = model_apps(out).get(model)
    if not apps:
        raise KeyError(f"{model} is not deployed in this config")
    for name in apps:
        for dep in _app(out, name)["deployments"]:
            dep.setdefault("user_config", {}).update(values)
    return out


def fixed_replicas(config: dict[str, Any], n: int, *, model: str | None = None
                   ) -> dict[str, Any]:
    """A copy of ``config`` with exactly ``n`` replicas per deployment (autoscaling pinned):
    of ``model``'s applications only when given, else of every application."""
    out = copy.deepcopy(config)
    for app in out["applications"]:
        if model is not None and (app.get("args") or {}).get("model") != model:
            continue
        for dep in app.get("deployments", []):
            dep.setdefault("autoscaling_config", {}).update(
                min_replicas=n, max_replicas=n, initial_replicas=n)
    return out


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
