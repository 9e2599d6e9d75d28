"""The typed application builder ``serve_app.app:build_app``.

Three deployments: ``Classifier`` and ``VAE`` (each optional, each with its checkpoint in
``user_config``) behind the FastAPI ``Ingress``::

    serve run serve_app.app:build_app classifier=runs/clf vae=runs/vae
    serve deploy serve_app/config.yaml        # the same builder, options from the file
    mve serve --classifier runs/clf --vae runs/vae

Deployment options (autoscaling, resources, batching) set in ``serve_app/config.yaml`` override
the code defaults in :mod:`serve_app.deployments`; that file is the single source of truth for
``serve deploy`` and the KubeRay RayService's ``serveConfigV2``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ray.serve import Application

from serve_app.deployments import ClassifierDeployment, VAEDeployment
from serve_app.ingress import Ingress
from serve_app.schemas import AppArgs

__all__ = ["AppArgs", "build_app"]


def _user_config(args: AppArgs, checkpoint: str) -> dict[str, Any]:
    return {"checkpoint": checkpoint, "max_batch_size": args.max_batch_size,
            "batch_wait_timeout_s": args.batch_wait_timeout_s}


def _absolute(source: str | None) -> str | None:
    """Relative local paths resolved here (where ``serve run`` is typed); replicas run elsewhere."""
    if source is None or urlparse(source).scheme or Path(source).is_absolute():
        return source
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def build_app(args: AppArgs) -> Application:
    """Builds the mve application: the model deployments that have a checkpoint, and the ingress.

    Raises:
        ValueError: neither a classifier nor a VAE checkpoint is given.
    """
    if not isinstance(args, AppArgs):  # called from Python with a dict
        args = AppArgs.model_validate(args)
    if args.classifier is None and args.vae is None:
        raise ValueError("give at least one checkpoint: classifier=DIR and/or vae=DIR")
    args = args.model_copy(update={"classifier": _absolute(args.classifier),
                                   "vae": _absolute(args.vae)})
    threads = {"torch_threads": args.torch_threads}
    classifier = vae = None
    if args.classifier is not None:
        classifier = ClassifierDeployment.options(
            user_config=_user_config(args, args.classifier)).bind(**threads)
    if args.vae is not None:
        vae = VAEDeployment.options(user_config=_user_config(args, args.vae)).bind(**threads)
    return Ingress.bind(classifier, vae, args.model_dump())
