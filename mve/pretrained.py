"""The repo-shipped default checkpoints: ``models/cifar10-classifier`` and ``models/cifar10-vae``.

Each is found, in order, at ``$MVE_DEFAULT_CLASSIFIER`` / ``$MVE_DEFAULT_VAE`` (an empty value
disables the default), then under ``models/`` of the source checkout that holds this package,
then under ``models/`` of the current directory. A function returns None (and logs why) when the
checkpoint is absent, so callers can ask for an explicit path instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["CLASSIFIER_DIR", "VAE_DIR", "default_checkpoint", "default_classifier", "default_vae",
           "missing_message", "repo_root"]

logger = logging.getLogger(__name__)

CLASSIFIER_DIR = "models/cifar10-classifier"
VAE_DIR = "models/cifar10-vae"
_ENV = {"classifier": "MVE_DEFAULT_CLASSIFIER", "vae": "MVE_DEFAULT_VAE"}
_REL = {"classifier": CLASSIFIER_DIR, "vae": VAE_DIR}


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
