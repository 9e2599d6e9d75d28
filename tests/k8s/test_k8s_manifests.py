"""The kustomize overlays render, validate against the KubeRay CRDs and Kubernetes' own schemas,
and keep the platform's promises: autoscaling, matching resources, shared storage, token auth
without secrets in the manifests, hardening, a generated serveConfigV2 and a runnable RayJob."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from k8s_testlib import (
    CORE_KINDS,
    K8S,
    MONITORING_KINDS,
    OVERLAYS,
    RAY_KINDS,
    cluster_specs,
    crd_errors,
    deepcopy,
    groups,
    k8s_errors,
    kuberay_semantic_errors,
    monitoring_errors,
    of_kind,
    one,
    pod_template_errors,
    pod_templates,
    render,
    tune_parser,
)

from cluster import k8s as k8s_cli

STORAGE = "/mnt/cluster_storage"
EXPECTED_KINDS = {"Namespace", "PersistentVolumeClaim", "RayCluster", "RayJob", "RayService",
                  "NetworkPolicy", "PodMonitor", "PrometheusRule", "ConfigMap"}


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param


@pytest.fixture(scope="module")
def docs(overlay):
    return render(overlay)


def ray_objects(docs):
    return [d for d in docs if d["kind"] in RAY_KINDS]


def containers(template):
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


# -- rendering and schemas -------------------------------------------------------------------

def test_overlay_renders_every_kind(docs, overlay):
    # the production overlay adds the Redis of GCS fault tolerance
    redis = {"StatefulSet", "Service"} if overlay == "gpu" else set()
    assert {d["kind"] for d in docs} == EXPECTED_KINDS | redis
    assert all(d["metadata"].get("namespace") == "mve" for d in docs if d["kind"] != "Namespace")
    # build-time ConfigMaps (versions, serve config) stay out of the output
    assert [c["metadata"]["name"] for c in of_kind(docs, "ConfigMap")] == ["mve-grafana-dashboard"]
    assert not any("local-config" in json.dumps(d.get("metadata", {})) for d in docs)


def test_kuberay_objects_validate_strictly_against_the_crds(docs):
    for d in ray_objects(docs):
        assert crd_errors(d) == [], f"{d['kind']} {d['metadata']['name']}"
        assert kuberay_semantic_errors(d) == [], f"{d['kind']} {d['metadata']['name']}"


def test_strict_crd_validation_refuses_unknown_fields():
    rc = one(render("cpu"), "RayCluster")
    bad_spots = [
        lambda o: o["spec"].__setitem__("bogus", 1),
        lambda o: o["spec"]["headGroupSpec"].__setitem__("bogus", 1),
        lambda o: o["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        .__setitem__("bogus", 1),
        lambda o: o["spec"]["workerGroupSpecs"][0]["template"]["spec"]["securityContext"]
        .__setitem__("bogus", 1),
        lambda o: o["spec"]["headGroupSpec"]["template"]["metadata"].__setitem__("bogus", 1),
        lambda o: o["metadata"].__setitem__("bogus", 1),
        lambda o: o["spec"]["authOptions"].__setitem__("mode", "password"),
    ]
    for spoil in bad_spots:
        obj = deepcopy(rc)
        spoil(obj)
        assert crd_errors(obj), "an invalid RayCluster passed validation"


def test_pod_templates_validate_against_kubernetes_schemas(docs):
    for d in ray_objects(docs):
        for name, template in pod_templates(d):
            assert pod_template_errors(template) == [], f"{d['kind']} {name}"


def test_core_and_monitoring_objects_validate(docs):
    for d in docs:
        if d["kind"] in CORE_KINDS:
            assert k8s_errors(d) == [], d["metadata"]["name"]
        elif d["kind"] in MONITORING_KINDS:
            assert monitoring_errors(d) == [], d["metadata"]["name"]


# -- one cluster spec, autoscaling, resources -------------------------------------------------

def test_rayservice_and_rayjob_use_the_rayclusters_spec(docs):
    rc = one(docs, "RayCluster", "mve-cluster")
    assert cluster_specs(one(docs, "RayService")) == rc["spec"]
    assert cluster_specs(one(docs, "RayJob")) == rc["spec"]


def test_overlays_share_one_replacements_block():
    blocks = [yaml.safe_load((K8S / "overlays" / o / "kustomization.yaml").read_text())
              ["replacements"] for o in OVERLAYS]
    assert all(b == blocks[0] for b in blocks)


def test_autoscaling_from_zero_with_bounds(docs):
    for d in ray_objects(docs):
        cs = cluster_specs(d)
        assert cs["enableInTreeAutoscaling"] is True
        assert cs["autoscalerOptions"]["version"] == "v2"
        workers = [g for name, g in groups(cs) if name != "head"]
        assert workers
        for g in workers:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
            assert g["maxReplicas"] >= 1


def _quantity(v) -> float:
    v = str(v)
    if v.endswith("m"):
        return float(v[:-1]) / 1000
    return float(v)


def test_resources_requests_equal_limits_and_match_ray_start_params(docs, overlay):
    for d in ray_objects(docs):
        cs = cluster_specs(d)
        for name, g in groups(cs):
            c = g["template"]["spec"]["containers"][0]
            req, lim = c["resources"]["requests"], c["resources"]["limits"]
            assert req == lim, f"{name}: requests != limits"
            params = g["rayStartParams"]
            cpus = _quantity(lim["cpu"])
            if name == "head":
                assert params["num-cpus"] == "0"  # no work on the head
            else:
                assert float(params["num-cpus"]) == cpus, name
            gpus = int(lim.get("nvidia.com/gpu", 0))
            assert int(params.get("num-gpus", 0)) == gpus, name
        auto = cs["autoscalerOptions"]["resources"]
        assert auto["requests"] and auto["limits"]
    gpu_groups = [g for _, g in groups(cluster_specs(one(docs, "RayCluster"))) if
                  "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    if overlay == "gpu":
        assert len(gpu_groups) == 1
        tolerations = gpu_groups[0]["template"]["spec"]["tolerations"]
        gpu_taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        assert gpu_taint in tolerations
    else:
        assert gpu_groups == []


def test_every_container_has_cpu_and_memory_limits(docs):
    for d in ray_objects(docs):
        for name, template in pod_templates(d):
            for c in containers(template):
                for key in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][key]), f"{name}/{c['name']}"


# -- storage, auth, secrets, hardening -------------------------------------------------------------

def test_shared_storage_is_mounted_at_the_same_path_everywhere(docs, overlay):
    pvc = one(docs, "PersistentVolumeClaim", "mve-cluster-storage")
    assert pvc["spec"]["accessModes"] == (["ReadWriteOnce"] if overlay == "cpu"
                                          else ["ReadWriteMany"])
    for d in ray_objects(docs):
        for _, g in groups(cluster_specs(d)):
            spec = g["template"]["spec"]
            vols = {v["name"]: v for v in spec["volumes"]}
            mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
            assert vols["cluster-storage"]["persistentVolumeClaim"]["claimName"] == \
                "mve-cluster-storage"
            assert mounts["cluster-storage"] == STORAGE


def test_token_auth_by_named_secret_and_no_secret_values(docs):
    assert of_kind(docs, "Secret") == []
    for d in ray_objects(docs):
        assert cluster_specs(d)["authOptions"] == {"mode": "token", "secretName": "mve-ray-token"}
    secretish = re.compile(r"TOKEN|PASSWORD|SECRET|API_KEY|ACCESS_KEY", re.I)
    text = yaml.safe_dump_all(list(docs))
    assert "stringData" not in text and "auth_token:" not in text
    for d in ray_objects(docs):
        for name, template in pod_templates(d):
            for c in containers(template):
                for env in c.get("env", []):
                    if secretish.search(env["name"]):
                        assert "value" not in env, f"{name}: {env['name']} has a literal value"
                        assert "secretKeyRef" in env["valueFrom"]


def test_pods_are_hardened(docs):
    for d in ray_objects(docs):
        for name, template in pod_templates(d):
            pod = template["spec"]["securityContext"]
            assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 1000, name
            assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
            for c in containers(template):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, f"{name}/{c['name']}"
                assert sc["capabilities"] == {"drop": ["ALL"]}, f"{name}/{c['name']}"
                assert sc.get("privileged", False) is False
                assert sc.get("runAsUser", 1000) == 1000 and sc.get("runAsNonRoot", True)
            if name not in ("head", "submitter"):  # only the autoscaler (head) uses the API
                assert template["spec"]["automountServiceAccountToken"] is False
        sc = cluster_specs(d)["autoscalerOptions"]["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    ns = one(docs, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def _peer_is_namespace_local(peer) -> bool:
    return set(peer) == {"podSelector"}


def test_network_policy_keeps_the_control_plane_inside_the_namespace(docs):
    pol = one(docs, "NetworkPolicy", "mve-ray-ingress")
    assert pol["spec"]["podSelector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}}
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    operator = {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "kuberay-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
    for port in (6379, 10001, 8265):
        for rule in pol["spec"]["ingress"]:
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue  # this rule does not open the port
            peers = rule.get("from")
            assert peers, f"port {port} is open to every source"
            for peer in peers:
                ok = _peer_is_namespace_local(peer) or (port == 8265 and peer == operator)
                assert ok, f"port {port} reachable from {peer}"
    # inference stays reachable
    assert any(rule.get("ports") == [{"protocol": "TCP", "port": 8000}] and "from" not in rule
               for rule in pol["spec"]["ingress"])


# -- serving ---------------------------------------------------------------------------------------

def test_committed_serve_config_is_generated_from_serve_app_config():
    committed = (K8S / "base" / "serve-config.yaml").read_text()
    assert committed == k8s_cli.render_serve_config(), \
        "k8s/base/serve-config.yaml is stale: python -m cluster.k8s render-serve-config"
    assert k8s_cli.write_serve_config(check=True, validate=False)


def test_every_ray_container_runs_the_serving_data_plane(docs):
    """The RayService's pods carry serve_app/dataplane.py's environment (HAProxy straight to
    the model replicas), with the launcher at its path in the image built by the Dockerfile."""
    from serve_app.dataplane import IMAGE_HAPROXY_LAUNCHER, cluster_env

    svc = one(docs, "RayService", "mve")
    dockerfile = (K8S.parent / "Dockerfile").read_text()
    assert "--editable ." in dockerfile and "WORKDIR /home/ray/mve" in dockerfile
    assert IMAGE_HAPROXY_LAUNCHER == "/home/ray/mve/serve_app/haproxy.sh"
    for _, g in groups(svc["spec"]["rayClusterConfig"]):
        (container,) = g["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {k: env.get(k) for k in cluster_env()} == cluster_env(), container["name"]


def test_rayservice_serve_config_is_the_generated_one(docs):
    svc = one(docs, "RayService", "mve")
    assert svc["spec"]["serveConfigV2"] == k8s_cli.render_serve_config()
    assert len(svc["metadata"]["name"]) <= 47  # -> mve-serve-svc, port 8000
    for _, g in groups(svc["spec"]["rayClusterConfig"]):
        ports = {p["name"]: p["containerPort"] for p in
                 g["template"]["spec"]["containers"][0]["ports"]}
        assert ports["serve"] == 8000 and ports["metrics"] == 8080


def test_serve_config_validates_with_rays_schema_and_imports(docs):
    from ray.serve.schema import ServeDeploySchema

    from serve_app.schemas import FrontArgs, ModelArgs

    text = one(docs, "RayService")["spec"]["serveConfigV2"]
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert schema.http_options.port == 8000
    for app in schema.applications:
        module, _, attr = app.import_path.partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
        (ModelArgs if "model" in app.args else FrontArgs).model_validate(app.args)
        for dep in app.deployments:
            uc = dep.user_config if isinstance(dep.user_config, dict) else {}  # or DEFAULT
            if "checkpoint" in uc:
                assert uc["checkpoint"].startswith(f"{STORAGE}/models/")


# -- the RayJob --------------------------------------------------------------------------------

def test_rayjob_template_is_suspended_and_cleans_up(docs):
    job = one(docs, "RayJob", "mve-tune")["spec"]
    assert job["suspend"] is True  # `kubectl apply -k` never starts a search
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] > 0
    assert job["backoffLimit"] >= 0 and job["activeDeadlineSeconds"] > 0
    assert job["submissionMode"] == "K8sJobMode"


def test_rayjob_entrypoint_parses_with_cluster_tune(docs, overlay):
    entry = shlex.split(one(docs, "RayJob")["spec"]["entrypoint"])
    assert entry[:3] == ["python", "-m", "cluster.tune"]
    args = tune_parser().parse_args(entry[3:])
    assert args.storage.startswith(STORAGE) and args.out.startswith(STORAGE)
    assert args.data.startswith(STORAGE) and args.address == "auto"
    assert (args.gpus_per_trial > 0) == (overlay == "gpu")
    assert Path(k8s_cli.MODELS_ROOT).parent.as_posix() == STORAGE
