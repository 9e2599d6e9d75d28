"""RayJobs of ``mve k8s submit``: the entrypoint, its shipped files, the job name, the object.

The entrypoint is ``python -m cluster.tune|cluster.train ARGS``, checked with that module's own
argument parser (composed from the same parent parsers) before anything is sent.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from cluster.k8s.common import GROUP, STORAGE_ROOT, VERSION, K8sError

__all__ = ["JOB_FILES_DIR", "MAX_RAYJOB_NAME", "parse_entrypoint", "entrypoint_args",
           "default_job_name", "check_job_name", "build_rayjob", "build_files_configmap",
           "load_template_file", "template_entrypoint"]

JOB_FILES_DIR = "/etc/mve/job"  # where submit mounts the shipped --space/--config files
MAX_RAYJOB_NAME = 47  # KubeRay: 53 (RayCluster) - 6 (the random suffix of the job's cluster)
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_FILE_FLAGS = {"tune": ("--space", "--config"), "train": ("--config",)}


# -- the entrypoint -----------------------------------------------------------------------

def _entry_parser(command: str) -> argparse.ArgumentParser:
    """``python -m cluster.<command>``'s parser, from the parents that module is built from."""
    if command == "tune":
        from cluster.tune.cli import tune_parent

        return argparse.ArgumentParser(prog="python -m cluster.tune", parents=[tune_parent()])
    from cluster.options import ray_train_parent  # not cluster.train: that imports Ray
    from mve.options import train_parent

    # No -h here (as before): `submit train --help` is an unrecognized argument, not a help page.
    return argparse.ArgumentParser(prog="python -m cluster.train", add_help=False,
                                   parents=[train_parent(), ray_train_parent()])


def parse_entrypoint(command: str, args: Sequence[str]) -> argparse.Namespace:
    """Parses ``args`` with the entrypoint's own parser; a bad argument is a ``K8sError``."""
    if command not in _FILE_FLAGS:
        raise K8sError(f"unknown entrypoint {command!r}: use tune or train")
    parser = _entry_parser(command)

    def fail(message: str) -> None:
        raise K8sError(f"cluster.{command}: {message}")

    parser.error = fail  # type: ignore[method-assign]  # raise instead of printing and exiting
    try:
        ns = parser.parse_args(list(args))
    except SystemExit:  # --help / --version printed and exited
        raise K8sError(f"cluster.{command}: nothing to submit") from None
    if command == "train" and getattr(ns, "local", False):
        raise K8sError("cluster.train --local does not run on Ray; drop --local")
    return ns


def _option_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _file_option(args: list[str], i: int, flags: Sequence[str]) -> tuple[str, str, bool] | None:
    """``(flag, value, inline)`` when ``args[i]`` is a file flag whose value is a local file."""
    a = args[i]
    if a in flags and i + 1 < len(args):
        flag, value, inline = a, args[i + 1], False
    elif "=" in a and a.split("=", 1)[0] in flags:
        flag, value = a.split("=", 1)
        inline = True
    else:
        return None
    return (flag, value, inline) if Path(value).is_file() else None


def _ship_files(args: list[str], flags: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``args`` with every local ``flags`` file moved under :data:`JOB_FILES_DIR`, and the
    ``{key: text}`` of those files (one ConfigMap key each, unique)."""
    out: list[str] = []
    files: dict[str, str] = {}
    i = 0
    while i < len(args):
        found = _file_option(args, i, flags)
        if found is None:
            out.append(args[i])
            i += 1
            continue
        flag, value, inline = found
        key = re.sub(r"[^-._a-zA-Z0-9]", "_", Path(value).name)
        base, n = key, 1
        while key in files:
            n += 1
            key = f"{n}-{base}"
        files[key] = Path(value).read_text()
        target = f"{JOB_FILES_DIR}/{key}"
        out += [f"{flag}={target}"] if inline else [flag, target]
        i += 1 if inline else 2
    return out, files


def entrypoint_args(command: str, args: Sequence[str], *, job_name: str
                    ) -> tuple[list[str], dict[str, str]]:
    """The cluster-side arguments and the local files to ship.

    Fills in the cluster defaults the user did not give (``--address auto``, ``--storage`` and
    ``--out`` on the shared volume, and for a search ``--name JOB``: one Tune experiment per
    RayJob, which a RayJob retry resumes) and rewrites every ``--space``/``--config`` value
    that is a local file to its path under :data:`JOB_FILES_DIR`. Returns
    ``(args, {key: file text})``.
    """
    args = list(args)
    parse_entrypoint(command, args)
    out, files = _ship_files(args, _FILE_FLAGS[command])
    if _option_value(out, "--address") is None:
        out += ["--address", "auto"]
    if _option_value(out, "--storage") is None:
        out += ["--storage", f"{STORAGE_ROOT}/ray"]
    if command == "tune" and _option_value(out, "--name") is None:
        out += ["--name", job_name]  # one experiment per job; a retry resumes it
    if _option_value(out, "--out") is None:
        out += ["--out", f"{STORAGE_ROOT}/{command}/{job_name}"]
    return out, files


# -- names --------------------------------------------------------------------------------

def default_job_name(command: str, model: str, now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    return f"mve-{command}-{model}-{now:%m%d-%H%M%S}"


def check_job_name(name: str) -> str:
    if len(name) > MAX_RAYJOB_NAME or not _DNS1035.match(name):
        raise K8sError(f"invalid RayJob name {name!r}: a DNS-1035 label (lowercase letters, "
                       f"digits, '-'; starts with a letter) of at most {MAX_RAYJOB_NAME} "
                       "characters")
    return name


# -- the objects --------------------------------------------------------------------------

def _pod_templates(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    out = [cluster_spec["headGroupSpec"]["template"]]
    out += [g["template"] for g in cluster_spec.get("workerGroupSpecs") or []]
    return out


def _mount_files(cluster_spec: dict[str, Any], configmap: str) -> None:
    """Mounts ``configmap`` read-only at :data:`JOB_FILES_DIR` in every Ray pod."""
    for pod in _pod_templates(cluster_spec):
        pod_spec = pod.setdefault("spec", {})
        pod_spec.setdefault("volumes", []).append(
            {"name": "mve-job-files", "configMap": {"name": configmap}})
        pod_spec["containers"][0].setdefault("volumeMounts", []).append(
            {"name": "mve-job-files", "mountPath": JOB_FILES_DIR, "readOnly": True})


def build_rayjob(template: Mapping[str, Any], *, name: str, namespace: str, command: str,
                 args: Sequence[str], files_configmap: str | None = None,
                 extra_labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A new, unsuspended RayJob from a RayJob ``template`` (a live object or a manifest).

    Keeps the template's spec (cluster, submitter, shutdown/TTL/backoff policy), sets the
    entrypoint and drops everything the API server owns (status, uid, resourceVersion, ...).
    """
    if template.get("kind") != "RayJob":
        raise K8sError(f"the template is a {template.get('kind')}, not a RayJob")
    spec = copy.deepcopy(dict(template.get("spec") or {}))
    if not spec.get("rayClusterSpec"):
        raise K8sError("the RayJob template has no rayClusterSpec (render the overlay with "
                       "kubectl kustomize, or use the template installed in the cluster)")
    spec["suspend"] = False
    spec["entrypoint"] = shlex.join(["python", "-m", f"cluster.{command}", *args])
    spec.pop("jobId", None)
    tmeta = template.get("metadata") or {}
    labels = dict(tmeta.get("labels") or {})
    labels.update({"app.kubernetes.io/managed-by": "mve-k8s-submit",
                   "mve.dev/template": str(tmeta.get("name", "file"))[:63]})
    labels.update(extra_labels or {})
    if files_configmap:
        _mount_files(spec["rayClusterSpec"], files_configmap)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": spec}


def build_files_configmap(name: str, namespace: str, files: Mapping[str, str],
                          owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace,
                            "labels": {"app.kubernetes.io/name": "mve",
                                       "app.kubernetes.io/managed-by": "mve-k8s-submit"}}
    if owner is not None:
        meta["ownerReferences"] = [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob",
                                    "name": owner["metadata"]["name"],
                                    "uid": owner["metadata"]["uid"]}]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": dict(files)}


# -- templates ----------------------------------------------------------------------------

def load_template_file(path: str | Path) -> dict[str, Any]:
    """The first RayJob of a YAML file (e.g. ``kubectl kustomize k8s/overlays/gpu > out``)."""
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                return doc
    raise K8sError(f"{path}: no RayJob in the file")


def template_entrypoint(template: Mapping[str, Any]) -> tuple[str, list[str]]:
    """``(command, args)`` of a template whose entrypoint is ``python -m cluster.X ARGS``."""
    entry = shlex.split(str((template.get("spec") or {}).get("entrypoint") or ""))
    if len(entry) < 3 or entry[:2] != ["python", "-m"] or \
            entry[2] not in ("cluster.tune", "cluster.train"):
        raise K8sError("the template's entrypoint is not `python -m cluster.tune|train ...`; "
                       "give the command and its arguments")
    return entry[2].split(".", 1)[1], entry[3:]
