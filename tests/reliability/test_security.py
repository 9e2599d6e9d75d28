"""Security baseline: Ray token authentication on a real `ray start --head`, API keys on the
inference routes, token auth in the Kubernetes manifests and the README, and dependency
versions clear of the CVEs the reference lists.

- The head is tests/integration/test_jobs.py's (its helpers: ``RAY_AUTH_MODE=token`` and a
  token of its own, free ports, its own temp dir, only its own processes stopped at the end),
  with every port private.
- The Ray dashboard and Jobs API (the ShadowRay / CVE-2023-48022 attack surface) must refuse
  requests without the token (401) or with a wrong one (403); ``ray job submit`` works with it.
- The inference routes refuse requests without the API key or with a wrong one (401) and
  answer with it; health checks stay open.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import requests

from serve_app.deploy import app_config, fixed_replicas, load_config
from serve_app.testing import free_port, make_classifier, png_bytes, random_images

REPO = Path(__file__).resolve().parents[2]
KEY = "reliability-key-5b9e1c"
IMG = png_bytes(random_images(1, seed=2)[0])


def _import(path: Path, name: str) -> ModuleType:
    """A test helper module by path, shared with pytest's own import when it made one."""
    if name not in sys.modules:
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))  # for the helper's own sibling imports
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


jobs = _import(REPO / "tests" / "integration" / "test_jobs.py", "test_jobs")


@pytest.fixture(scope="module")
def head() -> Iterator[str]:
    """test_jobs.py's token-auth head (its environment, token, ports and stop helpers), with
    every port private: a default one (the dashboard agent's 52365, the client server's
    10001...) held by another Ray on the same host would leave this head without a job agent.
    """
    ports = {flag: jobs._free_port() for flag in (
        "port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port",
        "node-manager-port", "object-manager-port")}
    root = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths are limited
    try:
        subprocess.run([str(jobs.BIN / "ray"), "start", "--head", "--num-cpus=1",
                        "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                        "--disable-usage-stats", f"--temp-dir={root}",
                        *(f"--{flag}={port}" for flag, port in ports.items())],
                       check=True, env=jobs._env(), capture_output=True, timeout=300)
        yield f"http://127.0.0.1:{ports['dashboard-port']}"
    finally:
        jobs._stop_head(root)
        leftover = jobs._pids_of(root)
        shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"Ray processes of the test head survived: {leftover}"


# -- (a) Ray token authentication -----------------------------------------------------------

def _get(url: str, token: str | None, **kw) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(kw.pop("method", "GET"), url, headers=headers, timeout=60, **kw)


@pytest.mark.ray
def test_dashboard_and_jobs_api_refuse_requests_without_the_token(head: str,
                                                                  record_figures) -> None:
    token = jobs._env()["RAY_AUTH_TOKEN"]
    figures = {}
    for path in ("/api/jobs/", "/api/version", "/nodes?view=summary", "/api/serve/applications/",
                 "/logical/actors", "/api/v0/tasks"):
        none, wrong, right = (_get(head + path, t) for t in (None, "0" * 64, token))
        figures[path] = {"no token": none.status_code, "wrong token": wrong.status_code,
                         "token": right.status_code}
        assert none.status_code == 401, (path, none.status_code, none.text[:200])
        assert wrong.status_code == 403, (path, wrong.status_code, wrong.text[:200])
        assert right.status_code == 200, (path, right.status_code, right.text[:200])
    # The ShadowRay request itself: a job submission with no token runs nothing.
    attack = _get(head + "/api/jobs/", None, method="POST",
                  json={"entrypoint": "touch /tmp/mve-shadowray-should-not-exist"})
    figures["POST /api/jobs/ (no token)"] = attack.status_code
    assert attack.status_code == 401
    listed = _get(head + "/api/jobs/", token).json()
    assert not any("shadowray" in j.get("entrypoint", "") for j in listed), listed
    # The dashboard's auth cookie name, documented as an alternative to the header.
    assert _get(head + "/api/jobs/", None, cookies={"ray-authentication-token": token}
                ).status_code == 200
    record_figures("security_token_auth", figures)


@pytest.mark.ray
def test_ray_job_submit_needs_the_token(head: str, tmp_path: Path) -> None:
    cmd = [str(jobs.BIN / "ray"), "job", "submit", "--address", head, "--",
           "python", "-c", "print('mve-token-ok')"]
    deadline = time.monotonic() + 420  # a loaded machine can take minutes to start the agent
    while True:
        proc = jobs._submit(cmd)  # RAY_AUTH_MODE=token and the head's token
        if "No available agent" not in proc.stdout + proc.stderr or \
                time.monotonic() > deadline:
            break
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "mve-token-ok" in proc.stdout and "succeeded" in proc.stdout + proc.stderr
    # Without the token (and no ~/.ray/auth_token to fall back on) or with a wrong one: refused.
    base = {k: v for k, v in jobs._env().items() if not k.startswith("RAY_AUTH")}
    base["HOME"] = str(tmp_path)
    wrong = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 64}
    for env, why in ((base, r"401|Unauthorized|[Aa]uthentication"),
                     (wrong, r"403|Forbidden|Invalid authentication token")):
        bad = subprocess.run(cmd[:-3] + ["--no-wait", "--", "true"], env=env,
                             capture_output=True, text=True, timeout=300)
        out = bad.stdout + bad.stderr
        assert bad.returncode != 0, out[-2000:]
        assert re.search(why, out), out[-3000:]


# -- (b) API keys on the inference routes ---------------------------------------------------

@pytest.mark.ray
def test_inference_routes_need_the_api_key(serve_instance, tmp_path_factory) -> None:
    d = tmp_path_factory.mktemp("api-key")
    (d / "key").write_text(KEY + "\n")
    config = app_config(load_config(), {"classifier": str(make_classifier(d / "clf"))},
                        host="127.0.0.1", port=free_port(), api_key_file=str(d / "key"))
    url = serve_instance(fixed_replicas(config, 1))
    oip = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                       "data": [0.0] * 3072}]}
    calls = [("POST", "/v1/classify", {"data": IMG, "headers": {"Content-Type": "image/png"}}),
             ("POST", "/v2/models/classifier/infer", {"json": oip}),
             ("GET", "/v1/models", {}), ("GET", "/v2/models/classifier", {})]
    for method, path, kw in calls:
        headers = kw.pop("headers", {})
        for creds in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"},
                      {"Authorization": KEY}, {"X-API-Key": ""}):
            r = requests.request(method, url + path, headers={**headers, **creds}, timeout=60,
                                 **kw)
            assert r.status_code == 401, (path, creds, r.status_code, r.text[:200])
            assert r.headers["www-authenticate"] == "Bearer"
        for creds in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
            r = requests.request(method, url + path, headers={**headers, **creds}, timeout=60,
                                 **kw)
            assert r.status_code == 200, (path, creds, r.status_code, r.text[:200])
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/classifier/ready"):
        assert requests.get(url + path, timeout=60).status_code == 200, path


# -- (c) token auth in the manifests and the README -------------------------------------------

k8s = _import(REPO / "tests" / "k8s" / "k8s_testlib.py", "k8s_testlib")
TOKEN_SECRET = {"name": "mve-ray-token", "key": "auth_token"}


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_manifests_run_ray_with_token_auth(overlay: str) -> None:
    docs = [d for d in k8s.render(overlay) if d["kind"] in k8s.RAY_KINDS]
    assert {d["kind"] for d in docs} == set(k8s.RAY_KINDS)
    for doc in docs:
        spec = k8s.cluster_specs(doc)
        assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET["name"]}
        names = []
        for name, template in k8s.pod_templates(doc):
            names.append(name)
            env = {e["name"]: e for e in template["spec"]["containers"][0].get("env", [])}
            where = f"{overlay} {doc['kind']} {name}"
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
            assert env["RAY_AUTH_TOKEN"] == {"name": "RAY_AUTH_TOKEN", "valueFrom": {
                "secretKeyRef": TOKEN_SECRET}}, where
        workers = {g for g, _ in k8s.groups(spec)} - {"head"}
        assert "head" in names and workers and workers <= set(names), (doc["kind"], names)


def test_readme_runs_ray_with_token_auth() -> None:
    readme = (REPO / "README.md").read_text()
    assert "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=" in readme  # job submission
    assert ("create secret generic mve-ray-token --from-literal=auth_token=" in readme)
    assert "MVE_API_KEY" in readme and "Client retries" in readme


# -- (d) dependency versions -------------------------------------------------------------------

def _version(text: str) -> tuple[int, ...]:
    """Major, minor, patch with missing parts as 0 (so "2.10" == "2.10.0")."""
    parts = [int(x) for x in re.findall(r"\d+", text)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


# package: (minimum version, why)
SAFE = {
    "ray": ("2.54.0", "token auth (2.52, the ShadowRay/CVE-2023-48022 mitigation; also "
                      "CVE-2025-62593) and CVE-2026-27482 (unauthenticated DELETE, fixed 2.54)"),
    "torch": ("2.10.0", "CVE-2025-32434 (torch.load weights_only RCE, fixed 2.6) and "
                        "CVE-2026-24747 (weights-only unpickler heap corruption, fixed 2.10)"),
    "pillow": ("12.3.0", "CVE-2026-40192 (FITS bomb, 12.2), CVE-2026-59200 (PDF bomb) and the "
                         "other decoder CVEs fixed in 12.3.0"),
}


@pytest.mark.parametrize("package", sorted(SAFE))
def test_installed_versions_avoid_known_cves(package: str) -> None:
    minimum, why = SAFE[package]
    installed = md.version(package)
    assert _version(installed) >= _version(minimum), \
        f"{package} {installed} < {minimum}: {why}"


@pytest.mark.parametrize("package", sorted(SAFE))
def test_pyproject_pins_exclude_vulnerable_versions(package: str) -> None:
    minimum, why = SAFE[package]
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(rf"{package}\b", d, re.I)]
    lower = re.search(r"(==|>=|~=)\s*([\d.*]+)", spec)
    assert lower, f"pyproject.toml does not bound {package} from below: {spec!r}"
    assert _version(lower.group(2)) >= _version(minimum), \
        f"pyproject.toml allows {package} below {minimum} ({spec!r}): {why}"
    if package == "torch":  # the Makefile and the image install an exact release
        for f in ("Makefile", "Dockerfile"):
            pinned = re.search(r"torch==([\d.]+)", (REPO / f).read_text())
            assert pinned and _version(pinned.group(1)) >= _version(minimum), f


def test_no_code_path_calls_torch_load_or_unpickles() -> None:
    """Checkpoints are safetensors + JSON; the only pickle read is CIFAR-10's, restricted."""
    offenders = []
    for root in ("mve", "cluster", "serve_app"):
        for path in (REPO / root).rglob("*.py"):
            text = path.read_text()
            for pattern in (r"torch\.load\(", r"\bpickle\.loads?\(", r"weights_only\s*=\s*False",
                            r"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
                if re.search(pattern, text):
                    offenders.append(f"{path.relative_to(REPO)}: {pattern}")
    assert not offenders, offenders
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") is None
