"""The names every part of ``mve k8s`` shares: its error type and the cluster's layout."""

from __future__ import annotations

from mve.errors import UserError

__all__ = ["K8sError", "GROUP", "VERSION", "STORAGE_ROOT", "DEFAULT_NAMESPACE",
           "DEFAULT_TEMPLATE", "DEFAULT_SERVICE"]

GROUP, VERSION = "ray.io", "v1"  # the KubeRay API group of RayCluster/RayJob/RayService
STORAGE_ROOT = "/mnt/cluster_storage"  # the shared volume, same path in every pod
DEFAULT_NAMESPACE = "mve"
DEFAULT_TEMPLATE = "mve-tune"  # the suspended RayJob that the overlays install
DEFAULT_SERVICE = "mve"


class K8sError(UserError):
    """A user-facing error of ``mve k8s`` (one line, exit code 2)."""
