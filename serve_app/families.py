"""The served model families: one row each, and the only place in ``serve_app`` that names them.

A family is first a model of the registry (:func:`mve.models.get_spec`: its task, its config,
its metric); serving it adds a Serve deployment, the module that holds that deployment and its
FastAPI ``app`` and the route prefix of its ``/v1`` application (the shipped checkpoint that
``mve serve`` falls back to is found by name, :func:`mve.pretrained.default_checkpoint`).
Everything else (the ``--classifier``/``--vae`` flags of
``mve serve``, ``app_config``'s checkpoints, the front's 404s for a family that is not deployed,
its OpenAPI document, the OIP routes) is derived from this table. Serving a third family is
its own ``serve_app/<family>_app.py``, one row here and its applications in ``config.yaml``.

Pure data: importing this module imports neither Ray nor torch (the front and the CLI use it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = ["ServedFamily", "SERVED", "MODELS", "served"]


@dataclass(frozen=True)
class ServedFamily:
    """How one registered model family is served."""

    name: str  # the registry name (mve.models.get_spec), the app arg `model`, /v2/models/<name>
    title: str  # how messages and --help name it
    deployment: str  # the Serve deployment name of its model server
    module: str  # the module holding its FastAPI `app` and its deployment class
    server: str  # the deployment class in `module`
    api_prefix: str  # route prefix of its /v1 application

    def app_module(self) -> ModuleType:
        """Its module (imports torch and Ray: only model replicas and the OpenAPI merge)."""
        return importlib.import_module(self.module)

    def server_class(self) -> Any:
        """Its Serve deployment (the decorated server class)."""
        return getattr(self.app_module(), self.server)


SERVED: dict[str, ServedFamily] = {f.name: f for f in (
    ServedFamily("classifier", "classifier", "Classifier", "serve_app.classifier_app",
                 "ClassifierServer", "/v1/classify"),
    ServedFamily("vae", "VAE", "VAE", "serve_app.vae_app", "VAEServer", "/v1/vae"),
)}
MODELS: tuple[str, ...] = tuple(SERVED)


def served(name: str) -> ServedFamily:
    """The row of family ``name``.

    Raises:
        KeyError: ``name`` is not a served family (the message lists those that are).
    """
    try:
        return SERVED[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a served model family; served: {list(MODELS)}") from None
