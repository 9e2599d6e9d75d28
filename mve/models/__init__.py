"""Model registry: one ``build_model(name, config)`` used by training, tuning and serving.

Each family lives in its own module with its typed config dataclass beside it and is
registered here explicitly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from mve._validate import ConfigError, validate_dataclass
from mve.models.classifier import PRESETS as CLASSIFIER_PRESETS
from mve.models.classifier import Classifier, ClassifierConfig
from mve.models.latent_prior import PRESETS as PRIOR_PRESETS
from mve.models.latent_prior import LatentPrior, LatentPriorConfig
from mve.models.vae import PRESETS as VAE_PRESETS
from mve.models.vae import VAE, VAEConfig

__all__ = [
    "Classifier", "ClassifierConfig", "VAE", "VAEConfig", "LatentPrior", "LatentPriorConfig",
    "ModelSpec", "build_model", "list_models", "get_spec", "target_metric", "make_config", "config_to_dict",
]


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a family: everything outside the family's own module
    (command-line choices, the target metric, per-task behaviour) reads it from here."""

    name: str
    task: str  # "classification" | "generation" | "latent-prior"
    config_cls: type
    builder: Callable[[Any], nn.Module]
    presets: Mapping[str, Mapping[str, Any]]
    metric: str  # the validation metric a run, a trial or a promotion is judged by
    mode: str  # "max" or "min": which way `metric` is better
    on_images: bool = True  # trained on images by mve.train.fit; False: on a VAE's latents


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


register_model(ModelSpec("classifier", "classification", ClassifierConfig, Classifier,
                         CLASSIFIER_PRESETS, metric="val_accuracy", mode="max"))
register_model(ModelSpec("vae", "generation", VAEConfig, VAE, VAE_PRESETS,
                         metric="val_elbo_bpd", mode="min"))
# The diffusion prior over a VAE's latent: its own trainer (mve.prior_train), not fit().
register_model(ModelSpec("prior", "latent-prior", LatentPriorConfig, LatentPrior, PRIOR_PRESETS,
                         metric="val_loss", mode="min", on_images=False))


def list_models(task: str | None = None, *, latent: bool = False) -> list[str]:
    """Registered family names trained on images (of one ``task`` if given), sorted; with
    ``latent``, also the families trained on a VAE's latents (the prior)."""
    return sorted(n for n, spec in _REGISTRY.items()
                  if (task is None or spec.task == task) and (spec.on_images or latent))


def target_metric(name: str) -> tuple[str, str]:
    """The metric family ``name`` is judged by, and ``"max"``/``"min"``."""
    spec = get_spec(name)
    return spec.metric, spec.mode


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def make_config(name: str, values: Mapping[str, Any] | None = None, *,
                preset: str | None = None) -> Any:
    """Builds a validated family config: defaults < preset < values.

    Unknown keys raise ``ValueError`` listing the valid ones.
    """
    spec = get_spec(name)
    merged: dict[str, Any] = {}
    if preset is not None:
        if preset not in spec.presets:
            raise ValueError(f"unknown {name} preset {preset!r}; known: {', '.join(sorted(spec.presets))}")
        merged.update(spec.presets[preset])
    merged.update(values or {})
    return validate_dataclass(spec.config_cls, merged, f"model ({name})")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a family config (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def build_model(name: str, config: Any = None) -> nn.Module:
    """Builds a registered model from a config dataclass, a mapping, or None (defaults)."""
    spec = get_spec(name)
    if config is None or isinstance(config, Mapping):
        config = make_config(name, config)
    elif not isinstance(config, spec.config_cls):
        raise TypeError(f"{name} expects a {spec.config_cls.__name__}, got {type(config).__name__}")
    return spec.builder(config)
