"""GCS fault tolerance in the production overlay: every Ray cluster keeps its GCS state in the
overlay's Redis, whose password comes from a Secret, whose data survives a restart, and which
only KubeRay's pods can reach. The laptop overlay stays without it."""

from __future__ import annotations

import pytest
from k8s_testlib import cluster_specs, k8s_errors, of_kind, one, render

PASSWORD_REF = {"valueFrom": {"secretKeyRef": {"name": "mve-redis", "key": "password"}}}


@pytest.fixture(scope="module")
def gpu():
    return render("gpu")


def _ray_objects(docs):
    return [d for d in docs if d["kind"] in ("RayCluster", "RayService", "RayJob")]


def test_every_production_cluster_keeps_its_gcs_in_the_overlays_redis(gpu):
    svc = one(gpu, "Service", "mve-redis")
    port = svc["spec"]["ports"][0]["port"]
    for d in _ray_objects(gpu):
        ft = cluster_specs(d)["gcsFaultToleranceOptions"]
        assert ft["redisAddress"] == f"{svc['metadata']['name']}:{port}", d["kind"]
        assert ft["redisPassword"] == PASSWORD_REF, d["kind"]
        # the RayCluster's UID (KubeRay's default): upgrades and jobs never share keys
        assert "externalStorageNamespace" not in ft and ft.get("backend", "redis") == "redis"


def test_the_laptop_overlay_has_no_redis():
    docs = render("cpu")
    assert of_kind(docs, "StatefulSet") == []
    assert all("gcsFaultToleranceOptions" not in cluster_specs(d) for d in _ray_objects(docs))


def test_redis_is_durable_hardened_and_takes_its_password_from_the_secret(gpu):
    sts = one(gpu, "StatefulSet", "mve-redis")
    assert k8s_errors(sts) == [] and k8s_errors(one(gpu, "Service", "mve-redis")) == []
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    script = " ".join(c["command"] + c["args"])
    assert "--appendonly yes" in script and "--dir /data" in script
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/data"}
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["data"]
    env = {e["name"]: e for e in c["env"]}
    assert {"name": "REDIS_PASSWORD", **PASSWORD_REF} == env["REDIS_PASSWORD"]
    assert "value" not in env["REDIS_PASSWORD"] and "$REDIS_PASSWORD" in script
    assert of_kind(gpu, "Secret") == []  # created by the user, never shipped
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["requests"] == c["resources"]["limits"]
    assert pod["automountServiceAccountToken"] is False


def test_only_kuberays_pods_reach_redis(gpu):
    pol = one(gpu, "NetworkPolicy", "mve-redis-ingress")
    assert k8s_errors(pol) == []
    sts = one(gpu, "StatefulSet", "mve-redis")
    assert pol["spec"]["podSelector"]["matchLabels"].items() <= \
        sts["spec"]["template"]["metadata"]["labels"].items()
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = pol["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # this namespace only
    assert peer["podSelector"] == {"matchExpressions": [
        {"key": "ray.io/cluster", "operator": "Exists"}]}
