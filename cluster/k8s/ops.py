"""The ``mve k8s`` actions on a cluster: submit a RayJob, promote a checkpoint, show status."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cluster.k8s.client import Cluster
from cluster.k8s.common import DEFAULT_SERVICE, DEFAULT_TEMPLATE, K8sError
from cluster.k8s.offline import OfflineCluster
from cluster.k8s.rayjob import (
    build_files_configmap,
    build_rayjob,
    check_job_name,
    default_job_name,
    entrypoint_args,
    load_template_file,
    parse_entrypoint,
    template_entrypoint,
)
from cluster.k8s.serve_config import promote_patch, promote_serve_config
from cluster.k8s.summary import format_summary, summarize

__all__ = ["submit", "promote", "status"]


def _cluster(api_client: Any, namespace: str) -> Cluster | OfflineCluster:
    """The calls on ``api_client``'s cluster; an offline preview is its own."""
    return api_client if isinstance(api_client, OfflineCluster) else Cluster(api_client, namespace)


def _template(api: Cluster | OfflineCluster | None, template: str) -> dict[str, Any]:
    """The RayJob to clone: a YAML file, else the object of that name in the namespace."""
    if Path(template).is_file():
        return load_template_file(template)
    if api is None:
        raise K8sError(f"template {template!r} is not a file, and there is no cluster to read "
                       "it from")
    return api.get("RayJob", template)


def submit(api_client: Any, *, namespace: str, command: str | None, args: Sequence[str],
           template: str = DEFAULT_TEMPLATE, name: str | None = None, dry_run: bool = False,
           out: Any = None) -> dict[str, Any]:
    """Creates a RayJob running ``python -m cluster.<command> ARGS`` from ``template``.

    Without ``command`` the template's own entrypoint runs (under a new name). The arguments
    are checked with the entrypoint's parser before any request is sent.
    """
    out = out or sys.stdout
    if command is not None:
        parse_entrypoint(command, args)
    if name is not None:
        check_job_name(name)
    api = _cluster(api_client, namespace) if api_client is not None else None
    tmpl = _template(api, template)
    if command is None:
        if args:
            raise K8sError("arguments without a command: give tune or train first")
        command, args = template_entrypoint(tmpl)
    ns = parse_entrypoint(command, args)
    name = check_job_name(name or default_job_name(command, ns.model))
    cluster_args, files = entrypoint_args(command, args, job_name=name)
    cm_name = f"{name}-files" if files else None
    job = build_rayjob(tmpl, name=name, namespace=namespace, command=command,
                       args=cluster_args, files_configmap=cm_name)
    if dry_run:
        docs = [job] + ([build_files_configmap(cm_name, namespace, files)] if cm_name else [])
        out.write(yaml.safe_dump_all(docs, sort_keys=False))
        return job
    if api is None:
        raise K8sError("no cluster to submit to")
    created = api.create(job)
    if cm_name:
        api.create_configmap(build_files_configmap(cm_name, namespace, files, owner=created))
    out.write(f"RayJob {namespace}/{name} created: {job['spec']['entrypoint']}\n"
              f"  follow it: kubectl -n {namespace} get rayjob {name} -w   |   mve k8s status\n")
    return created


def promote(api_client: Any, *, namespace: str, checkpoint: str, service: str = DEFAULT_SERVICE,
            model: str | None = None, app: str | None = None, dry_run: bool = False,
            out: Any = None) -> list[dict[str, Any]]:
    """Points the model deployment(s) of RayService ``service`` at ``checkpoint``."""
    out = out or sys.stdout
    if not checkpoint or checkpoint != checkpoint.strip():
        raise K8sError(f"invalid checkpoint URI {checkpoint!r}")
    api = _cluster(api_client, namespace)
    svc = api.get("RayService", service)
    old = (svc.get("spec") or {}).get("serveConfigV2") or ""
    new, changed = promote_serve_config(old, checkpoint, model=model, app=app)
    patch = promote_patch(old, new)
    if dry_run:
        out.write(json.dumps(patch, indent=1) + "\n")
        return patch
    api.json_patch("RayService", service, patch)
    out.write(f"RayService {namespace}/{service}: {', '.join(changed)} -> {checkpoint}\n"
              "  (an in-place reconfigure; `mve k8s status` shows the application RUNNING "
              "again once the replicas loaded it)\n")
    return patch


def status(api_client: Any, *, namespace: str, as_json: bool = False,
           out: Any = None) -> dict[str, Any]:
    """Prints the RayClusters, RayJobs and RayServices of ``namespace``."""
    out = out or sys.stdout
    api = Cluster(api_client, namespace)
    summary = summarize(api.list("RayCluster"), api.list("RayJob"), api.list("RayService"))
    out.write((json.dumps(summary, indent=1) if as_json else format_summary(summary)) + "\n")
    return summary
