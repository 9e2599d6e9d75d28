"""``mve k8s status`` as data and as text: the interesting parts of the KubeRay objects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cluster.k8s.serve_config import serve_checkpoints

__all__ = ["summarize", "format_summary"]


def _conditions(obj: Mapping[str, Any]) -> dict[str, str]:
    return {c.get("type", "?"): c.get("status", "?")
            for c in (obj.get("status") or {}).get("conditions") or []}


def _cluster(c: Mapping[str, Any]) -> dict[str, Any]:
    st = c.get("status") or {}
    return {"name": c["metadata"]["name"], "state": st.get("state", "-"),
            "ready": _conditions(c).get("RayClusterProvisioned", "-"),
            "workers": f"{st.get('availableWorkerReplicas', 0)}/"
                       f"{st.get('desiredWorkerReplicas', 0)}",
            "head": (st.get("head") or {}).get("podName", "-")}


def _job(j: Mapping[str, Any]) -> dict[str, Any]:
    st, spec = j.get("status") or {}, j.get("spec") or {}
    return {"name": j["metadata"]["name"],
            "deployment": st.get("jobDeploymentStatus") or
            ("Suspended" if spec.get("suspend") else "-"),
            "job": st.get("jobStatus", "-"), "cluster": st.get("rayClusterName", "-"),
            "start": st.get("startTime", "-"), "end": st.get("endTime", "-"),
            "message": st.get("message", ""), "entrypoint": spec.get("entrypoint", "")}


def _service(s: Mapping[str, Any]) -> dict[str, Any]:
    st = s.get("status") or {}
    active = st.get("activeServiceStatus") or {}
    pending = st.get("pendingServiceStatus") or {}
    apps = {}
    for app, a in (active.get("applicationStatuses") or {}).items():
        apps[app] = {"status": a.get("status", "-"), "message": a.get("message", ""),
                     "deployments": {d: v.get("status", "-") for d, v in
                                     (a.get("serveDeploymentStatuses") or {}).items()}}
    return {"name": s["metadata"]["name"], "conditions": _conditions(s),
            "serve_endpoints": st.get("numServeEndpoints", 0),
            "active_cluster": active.get("rayClusterName", "-"),
            "pending_cluster": pending.get("rayClusterName") or None,
            "applications": apps,
            "checkpoints": serve_checkpoints((s.get("spec") or {}).get("serveConfigV2") or "")}


def summarize(clusters: Sequence[Mapping[str, Any]], jobs: Sequence[Mapping[str, Any]],
              services: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The interesting parts of the three kinds' statuses, as plain data."""
    return {"rayclusters": [_cluster(c) for c in clusters], "rayjobs": [_job(j) for j in jobs],
            "rayservices": [_service(s) for s in services]}


def _job_lines(j: Mapping[str, Any]) -> list[str]:
    if "job" not in j:
        return [f"  {j['name']}"]
    lines = [f"  {j['name']:<34} {j['deployment']:<10} job {j['job']:<10} "
             f"cluster {j['cluster']}"]
    return lines + ([f"    {j['message']}"] if j["message"] else [])


def _service_lines(s: Mapping[str, Any]) -> list[str]:
    if "conditions" not in s:
        return [f"  {s['name']}"]
    conds = " ".join(f"{k}={v}" for k, v in sorted(s["conditions"].items())) or "-"
    lines = [f"  {s['name']:<34} {conds}  endpoints {s['serve_endpoints']}  "
             f"active {s['active_cluster']}"
             + (f"  pending {s['pending_cluster']}" if s["pending_cluster"] else "")]
    for app, a in s["applications"].items():
        lines.append(f"    app {app}: {a['status']}" + (f" ({a['message']})"
                                                        if a["message"] else ""))
        lines += [f"      {d}: {st}" for d, st in a["deployments"].items()]
    lines += [f"    checkpoint {where}: {ck}" for where, ck in s["checkpoints"].items()]
    return lines


def format_summary(summary: Mapping[str, Any]) -> str:
    lines = ["RayClusters:"]
    for c in summary["rayclusters"] or [{"name": "(none)"}]:
        lines.append(f"  {c['name']:<34} {c.get('state', ''):<10} workers "
                     f"{c.get('workers', '')}" if "state" in c else f"  {c['name']}")
    lines.append("RayJobs:")
    for j in summary["rayjobs"] or [{"name": "(none)"}]:
        lines += _job_lines(j)
    lines.append("RayServices:")
    for s in summary["rayservices"] or [{"name": "(none)"}]:
        lines += _service_lines(s)
    return "\n".join(lines)
