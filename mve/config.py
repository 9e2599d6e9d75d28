"""Typed training configuration: recipe (``--preset``, else the best known) < YAML files <
``--set`` overrides.

A config file mirrors :meth:`TrainConfig.to_dict`::

    model:
      name: classifier
      preset: seed          # optional architecture preset of the family
      final_channels: 256   # any field of the family's config dataclass
    optim: {name: sgd, lr: 0.05}
    data: {val_size: 5000, augment: {crop_padding: 4, flip: true}}
    epochs: 20

Overrides use dotted keys with YAML values: ``--set optim.lr=3e-4 --set model.dropout=0.1``.
The resolved config is saved in every run directory and checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mve._validate import ConfigError, validate_dataclass
from mve.data.transforms import AugmentConfig
from mve.distill import DistillConfig
from mve.models import config_to_dict, get_spec, make_config
from mve.recipes import DEFAULT_RECIPE, RECIPE_NOTES, RECIPES, deep_merge

__all__ = [
    "ConfigError", "DataConfig", "OptimConfig", "DistillConfig", "TrainConfig", "RECIPES",
    "DEFAULT_RECIPE", "load_train_config", "read_yaml", "parse_overrides", "deep_merge",
    "RECIPE_NOTES", "FEW_STEPS_PER_EPOCH",
]


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is split and augmented."""

    path: str | None = None  # None: --data, $MVE_DATA, then the official CIFAR-10 in the user cache
    val_size: int = 5000  # images held out for validation, stratified
    split_seed: int = 0
    limit: int | None = None  # at most this many training images, stratified (smoke runs)
    image_size: int | None = None  # resize images to this square size when set
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {self.val_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and learning-rate schedule (stepped every batch)."""

    name: Literal["sgd", "adam", "adamw", "muon"] = "sgd"  # muon: Muon conv filters, SGD rest
    lr: float = 0.05  # peak learning rate
    weight_decay: float = 5e-4
    momentum: float = 0.9  # sgd momentum, or beta1 for adam/adamw
    nesterov: bool = True
    beta2: float = 0.999
    schedule: Literal["constant", "onecycle", "cosine", "linear"] = "onecycle"
    warmup: float = 0.2  # fraction of all steps spent warming up (onecycle/cosine/linear)
    warmup_start: float | None = None  # lr at step 0 as a fraction of the peak (None: 0.1
    # for onecycle, else 0)
    final_lr_fraction: float = 0.02  # lr at the last step, as a fraction of the peak
    bias_lr_scale: float = 1.0  # lr multiplier for normalisation parameters (Page: 64)
    decay_biases: bool = False  # decay biases/norm parameters too (same absolute step size)
    grad_clip: float | None = None  # max global grad norm
    muon_lr: float = 0.24  # name muon: peak lr of the conv filters (airbench94_muon)
    muon_momentum: float = 0.6  # name muon: Nesterov momentum of the conv filters

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.bias_lr_scale <= 0:
            raise ValueError(f"bias_lr_scale must be > 0, got {self.bias_lr_scale}")
        if self.warmup_start is not None and not 0 <= self.warmup_start <= 1:
            raise ValueError(f"warmup_start must be in [0, 1], got {self.warmup_start}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


# Fewer optimizer steps per epoch than this (a large batch on a small subset) and a short run
# barely moves from its initialisation: a classifier stays near chance accuracy.
FEW_STEPS_PER_EPOCH = 4


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, besides where it runs (cluster settings live in cluster/)."""

    model: str = "classifier"
    model_config: Any = None  # the family's config dataclass; filled by load_train_config
    preset: str | None = None  # the recipe preset this config started from
    model_preset: str | None = None  # the family's architecture preset
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 10
    batch_size: int = 128  # per worker
    eval_batch_size: int = 500
    seed: int = 0
    label_smoothing: float = 0.0  # classifier only
    # Epochs the whitening layer's bias trains before its lr drops to 0 (airbench: 3); None:
    # it trains throughout. Models without a whitening layer ignore it.
    whiten_bias_epochs: int | None = None
    distill: DistillConfig = field(default_factory=DistillConfig)  # classifier only
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast (GPU)
    channels_last: bool = False
    # Weight averaging: "ema" evaluates and saves an exponential moving average of the weights;
    # "lookahead" (airbench) pulls the weights to their average every few steps, with a decay
    # that grows as (step/total)^3, and ends on the average.
    averaging: Literal["none", "ema", "lookahead"] = "none"
    averaging_decay: float = 0.95  # per-step decay (raised to averaging_every per update)
    averaging_every: int = 5  # steps between updates
    compile: bool = False  # torch.compile the model
    # A recipe tuned at a large batch (fast: 1024) takes few steps on a small subset (--limit
    # 3000: 2 per epoch) and learns nothing. With N > 0 the batch shrinks until an epoch has at
    # least N steps (per worker, never below 32 images) and the lr scales with it (linear
    # scaling of SGD's lr for the mean loss); 0 keeps the batch as configured.
    min_steps_per_epoch: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.averaging_decay < 1:
            raise ValueError(f"averaging_decay must be in (0, 1), got {self.averaging_decay}")
        if self.min_steps_per_epoch < 0:
            raise ValueError(f"min_steps_per_epoch must be >= 0, got {self.min_steps_per_epoch}")
        if self.averaging_every < 1:
            raise ValueError(f"averaging_every must be >= 1, got {self.averaging_every}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if self.whiten_bias_epochs is not None and self.whiten_bias_epochs < 0:
            raise ValueError(f"whiten_bias_epochs must be >= 0, got {self.whiten_bias_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def to_dict(self) -> dict[str, Any]:
        """The nested, YAML/JSON-friendly form that :meth:`from_dict` reads back."""
        out = _asdict(self)
        out.pop("model_config")
        out.pop("model_preset")
        out["model"] = {"name": self.model, "preset": self.model_preset,
                        **config_to_dict(self.model_config)}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return _validate(copy.deepcopy(dict(data)))

    def fitted_to(self, train_size: int, world_size: int = 1) -> TrainConfig:
        """This config with the batch (and lr) that :attr:`min_steps_per_epoch` asks for on a
        training split of ``train_size`` images over ``world_size`` workers."""
        if self.min_steps_per_epoch <= 0:
            return self
        per_worker = train_size // max(1, world_size)
        batch = min(self.batch_size, max(32, per_worker // self.min_steps_per_epoch))
        if batch == self.batch_size:
            return self
        optim = dataclasses.replace(self.optim, lr=self.optim.lr * batch / self.batch_size)
        return dataclasses.replace(self, batch_size=batch, optim=optim)

    def steps_per_epoch(self, train_size: int, world_size: int = 1) -> int:
        """Optimizer steps in an epoch of ``train_size`` images over ``world_size`` workers: the
        last partial batch is dropped when there is a full one (``mve.train.make_loader``)."""
        global_batch = self.batch_size * max(1, world_size)
        return max(1, train_size // global_batch)

    def few_steps_note(self, train_size: int, world_size: int = 1) -> str | None:
        """Why a run may end at chance, when an epoch has fewer than
        :data:`FEW_STEPS_PER_EPOCH` steps (a large batch on a small subset; a preset's
        ``min_steps_per_epoch`` shrinks the batch, but never below 32); else None."""
        steps = self.steps_per_epoch(train_size, world_size)
        if steps >= FEW_STEPS_PER_EPOCH:
            return None
        batch = max(1, train_size // max(1, world_size) // (2 * FEW_STEPS_PER_EPOCH))
        lr = self.optim.lr * batch / self.batch_size  # as fitted_to scales it
        return (f"batch_size {self.batch_size} on {train_size} training images "
                f"({world_size} worker(s)) gives {steps} optimizer step(s) per epoch, too few "
                f"to learn much: a classifier may end at chance accuracy. Use a smaller batch "
                f"with the lr scaled to it (e.g. --set batch_size={batch} --set optim.lr={lr:.2g})"
                f" or more data (a larger --limit).")

    def with_data_path(self, path: str | os.PathLike[str]) -> TrainConfig:
        """This config with ``data.path`` set to the resolved source, so that a saved config
        records the data a run used."""
        return dataclasses.replace(self, data=dataclasses.replace(self.data, path=str(path)))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _asdict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _asdict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_asdict(v) for v in obj]
    return obj


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["optim.lr=3e-4", "model.residual=true"]`` -> nested dict with YAML-typed values."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads "3e-4" as a string
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def read_yaml(path: str | Path, what: str, error: type[Exception] = ConfigError) -> Any:
    """The YAML document of ``path`` (None when empty); a missing or malformed file raises
    ``error`` naming ``what`` it was meant to be (e.g. "config file", "search-space file")."""
    p = Path(path)
    try:
        return yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise error(f"{what} {p} does not exist") from None
    except yaml.YAMLError as exc:
        raise error(f"{what} {p} is not valid YAML: {exc}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    data = read_yaml(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {Path(path)} must hold a mapping at the top level")
    return data


def load_train_config(model: str = "classifier", *, preset: str | None = None,
                      files: Iterable[str | Path] = (), overrides: Iterable[str] = (),
                      extra: Mapping[str, Any] | None = None) -> TrainConfig:
    """Resolves a :class:`TrainConfig` in order: recipe (``preset``, else the family's
    :data:`DEFAULT_RECIPE`) < files < extra < overrides."""
    get_spec(model)
    recipes = RECIPES.get(model, {})
    name = preset or DEFAULT_RECIPE.get(model)
    data: dict[str, Any] = {"model": {"name": model}}
    if name is not None:
        if name not in recipes:
            raise ConfigError(f"unknown {model} preset {name!r}; known: {', '.join(sorted(recipes))}")
        data = deep_merge(data, recipes[name])
        data["preset"] = name
    for f in files:
        data = deep_merge(data, read_config_file(f))
    if extra:
        data = deep_merge(data, extra)
    data = deep_merge(data, parse_overrides(overrides))
    return _validate(data)


def _validate(data: dict[str, Any]) -> TrainConfig:
    model_section = data.pop("model", {})
    if isinstance(model_section, str):
        model_section = {"name": model_section}
    if not isinstance(model_section, dict):
        raise ConfigError("model must be a mapping with a 'name' key")
    name = model_section.pop("name", "classifier")
    arch_preset = model_section.pop("preset", None)
    try:
        model_config = make_config(name, model_section, preset=arch_preset)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid model config: {exc}") from None
    data_section = data.pop("data", {}) or {}
    if not isinstance(data_section, Mapping):
        raise ConfigError("data must be a mapping")
    augment = validate_dataclass(AugmentConfig, data_section.get("augment") or {}, "data.augment")
    data_cfg = validate_dataclass(DataConfig, {**data_section, "augment": augment}, "data")
    optim = validate_dataclass(OptimConfig, data.pop("optim", {}) or {}, "optim")
    distill = validate_dataclass(DistillConfig, data.pop("distill", {}) or {}, "distill")
    return validate_dataclass(TrainConfig, {**data, "model": name, "model_config": model_config,
                                            "model_preset": arch_preset, "data": data_cfg,
                                            "optim": optim, "distill": distill}, "train")
