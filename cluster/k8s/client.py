"""The Kubernetes API as ``mve k8s`` uses it: a client for the kube context, and the few calls.

``kubernetes`` is imported inside the functions so that rendering and ``--dry-run`` work
without it.
"""

from __future__ import annotations

import json
from typing import Any

from cluster.k8s.common import GROUP, VERSION, K8sError

__all__ = ["PLURALS", "make_api_client", "Cluster"]

PLURALS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}


def make_api_client(context: str | None = None) -> Any:
    """An ``ApiClient`` for the current kube context (``--context``), else in-cluster config."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_kube_config(context=context)
    except (ConfigException, FileNotFoundError, TypeError) as exc:
        try:
            config.load_incluster_config()
        except ConfigException:
            raise K8sError(f"no Kubernetes configuration: {exc}") from None
    return client.ApiClient()


def _api_error(exc: Exception, what: str) -> K8sError:
    """An ``ApiException`` as one line: the server's own ``message`` where it sent one."""
    status = getattr(exc, "status", None)
    message = getattr(exc, "reason", None) or str(exc)
    body = getattr(exc, "body", None)
    if body:
        try:
            message = json.loads(body).get("message", message)
        except (ValueError, AttributeError):
            pass
    return K8sError(f"{what}: HTTP {status}: {message}")


class Cluster:
    """The few API calls ``mve k8s`` makes in one namespace, on one ``ApiClient``."""

    def __init__(self, api_client: Any, namespace: str):
        from kubernetes import client

        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            raise _api_error(exc, what) from None

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return self._call(f"get {kind} {self.namespace}/{name}",
                          self.custom.get_namespaced_custom_object, GROUP, VERSION,
                          self.namespace, PLURALS[kind], name)

    def list(self, kind: str) -> list[dict[str, Any]]:
        out = self._call(f"list {kind}s in {self.namespace}",
                         self.custom.list_namespaced_custom_object, GROUP, VERSION,
                         self.namespace, PLURALS[kind])
        return list(out.get("items") or [])

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self._call(f"create {obj['kind']} {self.namespace}/{obj['metadata']['name']}",
                          self.custom.create_namespaced_custom_object, GROUP, VERSION,
                          self.namespace, PLURALS[obj["kind"]], obj)

    def json_patch(self, kind: str, name: str, patch: list[dict[str, Any]]) -> dict[str, Any]:
        return self._call(f"patch {kind} {self.namespace}/{name}",
                          self.custom.patch_namespaced_custom_object, GROUP, VERSION,
                          self.namespace, PLURALS[kind], name, patch,
                          _content_type="application/json-patch+json")

    def create_configmap(self, obj: dict[str, Any]) -> Any:
        return self._call(f"create ConfigMap {self.namespace}/{obj['metadata']['name']}",
                          self.core.create_namespaced_config_map, self.namespace, obj)
