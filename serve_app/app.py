"""The typed application builders, and why mve is several Serve applications.

Every model request crosses one Python process: the replica that receives the HTTP request
runs the model (no proxy -> ingress -> model chain). On Ray 2.60 that needs each model to be
the ingress of its own Serve application, reached directly by HAProxy
(``RAY_SERVE_ENABLE_HA_PROXY=1``, :mod:`serve_app.dataplane`). A Serve application has one
route prefix, and each model has two route families (``/v1/...`` and ``/v2/models/<name>``),
so each model is deployed as two applications from the same code:

==============  =========================  ==============================================
application     route prefix               serves
==============  =========================  ==============================================
mve             ``/``                      page, ``/docs``, ``/v1/models``, ``/v2``, health
classifier      ``/v1/classify``           classifier, HTTP/JSON API
classifier-oip  ``/v2/models/classifier``  classifier, Open Inference Protocol
vae             ``/v1/vae``                VAE, HTTP/JSON API
vae-oip         ``/v2/models/vae``         VAE, Open Inference Protocol
==============  =========================  ==============================================

Each model application autoscales on its own and is hot-swapped through its deployment's
``user_config`` (:func:`serve_app.deploy.set_user_config` changes every app of a model).
``serve_app/config.yaml`` lists them; ``serve deploy serve_app/config.yaml`` and ``mve serve``
start them all; one of them alone::

    serve run serve_app.app:build_model model=classifier checkpoint=runs/clf
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ray.serve import Application

from serve_app.families import served
from serve_app.schemas import FrontArgs, ModelArgs

__all__ = ["build_front", "build_model"]


def _absolute(source: str | None) -> str | None:
    """Relative local paths resolved here (where ``serve run`` is typed); replicas run elsewhere."""
    if source is None or urlparse(source).scheme or Path(source).is_absolute():
        return source
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def build_model(args: ModelArgs | dict[str, Any]) -> Application:
    """A model application: one served family (``model=``) as its own HTTP ingress.

    Its checkpoint comes from the deployment's ``user_config`` (``serve_app/config.yaml``);
    ``checkpoint=`` gives the initial one when there is no config file.
    """
    args = args if isinstance(args, ModelArgs) else ModelArgs.model_validate(args)
    server = served(args.model).server_class()
    deployment = server
    if args.checkpoint is not None:
        deployment = server.options(user_config={"checkpoint": _absolute(args.checkpoint)})
    return deployment.bind(args.model_dump(exclude={"checkpoint"}))


def build_front(args: FrontArgs | dict[str, Any]) -> Application:
    """The front application (page, docs, ``/v1/models``, server-wide OIP routes)."""
    from serve_app.front import Front

    args = args if isinstance(args, FrontArgs) else FrontArgs.model_validate(args)
    return Front.bind(args.model_dump())
