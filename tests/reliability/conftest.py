"""Shared fixtures of the reliability tests: where figures go, the load generator, and a
private Ray + Serve instance per test module.

Figures: every scenario writes ``<name>.json`` (and merges it into ``figures.json``) under
``$MVE_RELIABILITY_OUT`` when set, else under the session's pytest temp dir, and prints it, so
RELIABILITY.md can be regenerated from a run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def load_tools() -> ModuleType:
    """``bench/load.py`` (bench/ is not a package, so it is imported by path)."""
    name = "mve_bench_load"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "load.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while being created
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def figures_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = os.environ.get("MVE_RELIABILITY_OUT")
    path = Path(out) if out else tmp_path_factory.mktemp("reliability-figures")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def record_figures(figures_dir: Path) -> Callable[[str, dict[str, Any]], Path]:
    """``record(name, figures)``: writes ``<name>.json``, merges it into ``figures.json`` and
    prints it (``pytest -s`` shows it; the path is printed either way on failure)."""

    def record(name: str, figures: dict[str, Any]) -> Path:
        path = figures_dir / f"{name}.json"
        path.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        merged_path = figures_dir / "figures.json"
        merged = json.loads(merged_path.read_text()) if merged_path.exists() else {}
        merged[name] = figures
        merged_path.write_text(json.dumps(merged, indent=2, default=str) + "\n")
        print(f"\n[reliability figures: {path}]\n{json.dumps(figures, default=str)}")
        return path

    return record


@pytest.fixture(scope="module")
def serve_instance() -> Iterator[Callable[[dict[str, Any]], str]]:
    """``deploy(config) -> base URL`` on a private, freshly started local Ray.

    Ray starts on the first call (``ray.init(address="local")``: never an existing cluster);
    Serve and Ray are shut down when the module's tests are done, whatever happened.
    """
    import ray
    from ray import serve

    from serve_app.dataplane import applied, embedded_env
    from serve_app.deploy import deploy

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = False
    dataplane = embedded_env()  # mve serve's data plane: HAProxy, one hop per request

    def start(config: dict[str, Any]) -> str:
        nonlocal started
        if not started:
            with applied(dataplane):
                ray.init(address="local", num_cpus=2, include_dashboard=False,
                         logging_level=logging.WARNING, log_to_driver=False)
            started = True
        deploy(config, timeout_s=300)
        http = config["http_options"]
        return f"http://{http['host']}:{http['port']}"

    start.env = dataplane  # type: ignore[attr-defined]  (e.g. HAProxy's stats port)
    try:
        yield start
    finally:
        if started:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
