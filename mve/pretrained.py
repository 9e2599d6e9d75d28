"""The repo-shipped default checkpoints: ``models/cifar10-classifier`` and ``models/cifar10-vae``.

Each is found, in order, at ``$MVE_DEFAULT_CLASSIFIER`` / ``$MVE_DEFAULT_VAE`` (an empty value
disables the default), then under ``models/`` of the source checkout that holds this package,
then under ``models/`` of the current directory. A function returns None (and logs why) when the
checkpoint is absent, so callers can ask for an explicit path instead.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mve.errors import UserError

__all__ = ["CLASSIFIER_DIR", "VAE_DIR", "SHIPPED", "ModelInfo", "default_checkpoint",
           "default_classifier", "default_vae", "list_models", "missing_message", "repo_root",
           "shipped_checkpoint"]

logger = logging.getLogger(__name__)

CLASSIFIER_DIR = "models/cifar10-classifier"
VAE_DIR = "models/cifar10-vae"
_ENV = {"classifier": "MVE_DEFAULT_CLASSIFIER", "vae": "MVE_DEFAULT_VAE"}
_REL = {"classifier": CLASSIFIER_DIR, "vae": VAE_DIR}
#: The shipped models by name (the name is the directory under ``models/``) -> their kind.
SHIPPED = {"cifar10-classifier": "classifier", "cifar10-vae": "vae"}


def repo_root() -> Path:
    """The directory above the ``mve`` package (the checkout root for an editable install)."""
    return Path(__file__).resolve().parent.parent


def _is_checkpoint(p: Path) -> bool:
    return (p / "mve.json").is_file() and (p / "model.safetensors").is_file()


def default_checkpoint(kind: str) -> Path | None:
    """The default checkpoint directory of ``kind`` ("classifier" or "vae"), or None."""
    if kind not in _ENV:
        raise ValueError(f"kind must be 'classifier' or 'vae', got {kind!r}")
    env = os.environ.get(_ENV[kind])
    if env is not None:
        if not env.strip():
            return None
        p = Path(env).expanduser()
        if _is_checkpoint(p):
            return p.resolve()
        logger.warning("$%s=%s is not a checkpoint directory (model.safetensors + mve.json)",
                       _ENV[kind], env)
        return None
    for base in (repo_root(), Path.cwd()):
        p = base / _REL[kind]
        if _is_checkpoint(p):
            return p.resolve()
    logger.info(missing_message(kind))
    return None


def missing_message(kind: str) -> str:
    """Why there is no default ``kind`` checkpoint, and how to provide one."""
    return (f"no default {kind} checkpoint: {_REL[kind]} does not exist in {repo_root()} (or the "
            f"current directory) and ${_ENV[kind]} is not set; pass a checkpoint directory "
            "explicitly")


def default_classifier() -> Path | None:
    """``models/cifar10-classifier`` (or ``$MVE_DEFAULT_CLASSIFIER``), or None."""
    return default_checkpoint("classifier")


def default_vae() -> Path | None:
    """``models/cifar10-vae`` (or ``$MVE_DEFAULT_VAE``), or None."""
    return default_checkpoint("vae")


def shipped_checkpoint(name: str) -> Path:
    """The directory of the shipped model ``name`` (a key of :data:`SHIPPED`)."""
    if name not in SHIPPED:
        raise UserError(f"no shipped model named {name!r}; shipped: {', '.join(SHIPPED)}")
    found = default_checkpoint(SHIPPED[name])
    if found is None:
        raise UserError(missing_message(SHIPPED[name]))
    return found


@dataclass(frozen=True)
class ModelInfo:
    """A shipped model as :func:`list_models` finds it, without loading its weights."""

    name: str
    kind: str  # the model family: "classifier" or "vae"
    path: Path | None  # None: not present in this installation
    metrics: dict[str, Any]
    num_params: int | None

    @property
    def card(self) -> str:
        """The model's card (its REPORT.md), or "" when absent."""
        report = self.path / "REPORT.md" if self.path else None
        return report.read_text() if report and report.is_file() else ""


def _count_params(meta: dict[str, Any]) -> int | None:
    """The family's parameter count, from a model built on the meta device (no memory, no
    weights read): the safetensors file also holds buffers such as BatchNorm statistics."""
    import torch

    from mve.models import build_model, make_config

    try:
        with torch.device("meta"):
            model = build_model(meta["model_name"], make_config(meta["model_name"],
                                                                meta["model_config"]))
    except (KeyError, TypeError, ValueError):
        return None
    return sum(p.numel() for p in model.parameters())


def list_models() -> list[ModelInfo]:
    """The shipped models (:data:`SHIPPED`), each with its path, headline metrics and size."""
    out = []
    for name, kind in SHIPPED.items():
        path = default_checkpoint(kind)
        meta = json.loads((path / "mve.json").read_text()) if path is not None else {}
        metrics = {k: v for k, v in meta.get("metrics", {}).items()
                   if isinstance(v, int | float | str)}
        out.append(ModelInfo(name, kind, path, metrics, _count_params(meta) if meta else None))
    return out
