"""``mve k8s``: mve on KubeRay. One module per job:

- :mod:`~cluster.k8s.serve_config`: the RayService's serveConfigV2, rendered from
  ``serve_app/config.yaml`` (read as data) and promoted to a new checkpoint;
- :mod:`~cluster.k8s.rayjob`: the RayJob of ``submit`` (entrypoint, shipped files, name);
- :mod:`~cluster.k8s.client`: the Kubernetes API client and the few calls made with it;
- :mod:`~cluster.k8s.ops`: the actions ``submit``, ``promote`` and ``status``;
- :mod:`~cluster.k8s.summary`: what ``status`` shows;
- :mod:`~cluster.k8s.cli`: the parent parser :func:`k8s_parent` and the handler :func:`run`
  (``python -m cluster.k8s`` is :func:`main`).
"""

from cluster.k8s.cli import k8s_parent, main, run
from cluster.k8s.client import make_api_client
from cluster.k8s.common import STORAGE_ROOT, K8sError
from cluster.k8s.ops import promote, status, submit
from cluster.k8s.rayjob import (
    JOB_FILES_DIR,
    build_files_configmap,
    build_rayjob,
    check_job_name,
    default_job_name,
    entrypoint_args,
    parse_entrypoint,
    template_entrypoint,
)
from cluster.k8s.serve_config import (
    MODELS_ROOT,
    promote_patch,
    promote_serve_config,
    render_serve_config,
    validate_serve_config,
    write_serve_config,
)
from cluster.k8s.summary import format_summary, summarize

__all__ = ["K8sError", "STORAGE_ROOT", "MODELS_ROOT", "JOB_FILES_DIR", "k8s_parent", "run",
           "main", "render_serve_config", "validate_serve_config", "write_serve_config",
           "promote_serve_config", "promote_patch", "build_rayjob", "build_files_configmap",
           "parse_entrypoint", "entrypoint_args", "default_job_name", "check_job_name",
           "template_entrypoint", "submit", "promote", "status", "summarize", "format_summary",
           "make_api_client"]
