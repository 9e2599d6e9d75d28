"""A search space fitted to ``TrainConfig``: the base config every trial starts from, the
check of every key and distribution against it, and one trial's typed config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cluster.search.space import SearchSpace, SearchSpaceError, flatten, unflatten
from mve.config import (
    RECIPES,
    ConfigError,
    TrainConfig,
    deep_merge,
    load_train_config,
    parse_overrides,
)

__all__ = ["FORBIDDEN_KEYS", "SEARCH_RECIPE", "base_config", "search_recipe", "valid_keys",
           "validate_space", "trial_config"]

# A search without --preset starts from this recipe where the family has one: the default
# spaces search the research note's network and the generic recipe's knobs, which a family's
# best recipe may not use (the classifier's `fast` is another network; its own space is
# spaces/classifier-fast.yaml, searched with --preset fast).
SEARCH_RECIPE = "baseline"


# Keys a search must not touch, and why.
FORBIDDEN_KEYS: dict[str, str] = {
    "epochs": "the epoch budget is --max-epochs (ASHA's max_t)",
    "model.name": "the model family is the command's first argument",
    "model.preset": "an architecture preset is applied before the other fields; search the "
                    "fields themselves",
    "preset": "a recipe preset is applied before the space; pass --preset instead",
    "data.path": "the data is --data",
}



def valid_keys(cfg: TrainConfig) -> list[str]:
    """Every dotted leaf key of ``cfg`` that a space may set (forbidden keys excluded)."""
    return sorted(k for k in flatten(cfg.to_dict()) if k not in FORBIDDEN_KEYS)


# -- validation --------------------------------------------------------------------------

def base_config(model: str, space: SearchSpace, *, preset: str | None = None,
                files: Sequence[str | Path] = (), overrides: Sequence[str] = (),
                extra: Mapping[str, Any] | None = None) -> TrainConfig:
    """The config every trial starts from: the recipe (``preset``, else :func:`search_recipe`)
    < files < the space's ``fixed`` < ``overrides`` (``--set``) < ``extra`` (the command
    line's --max-epochs, --limit, ...).

    Raises:
        SearchSpaceError: a ``fixed`` key is unknown or forbidden, or its value is rejected.
    """
    preset = search_recipe(model, preset)
    tail = deep_merge(parse_overrides(overrides), extra or {})
    plain = load_train_config(model, preset=preset, files=files, extra=tail)
    valid = valid_keys(plain)
    for key in space.fixed:
        _check_key(key, valid, space.source, "fixed key")
    try:
        return load_train_config(model, preset=preset, files=files,
                                 extra=deep_merge(unflatten(space.fixed), tail))
    except ConfigError as exc:
        raise SearchSpaceError(f"{space.source}: the fixed overrides do not fit the config:\n"
                               f"{exc}") from None


def search_recipe(model: str, preset: str | None = None) -> str | None:
    """The recipe a search of ``model`` starts from: ``preset`` if given, else
    :data:`SEARCH_RECIPE` where ``model`` has it, else None (the family's default recipe)."""
    if preset is not None:
        return preset
    return SEARCH_RECIPE if SEARCH_RECIPE in RECIPES.get(model, {}) else None


def _check_key(key: str, valid: Sequence[str], where: str, what: str) -> None:
    if key in FORBIDDEN_KEYS:
        raise SearchSpaceError(f"{where}: {what} {key!r} cannot be set here: "
                               f"{FORBIDDEN_KEYS[key]}")
    if key not in valid:
        import difflib

        close = difflib.get_close_matches(key, valid, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise SearchSpaceError(f"{where}: {what} {key!r} is not a TrainConfig key{hint}; valid "
                               f"keys:\n  " + "\n  ".join(valid))


def validate_space(space: SearchSpace, base: TrainConfig) -> None:
    """Checks every key and the extreme values of every distribution against ``base``.

    Raises:
        SearchSpaceError: an unknown or forbidden key, or a value ``TrainConfig`` rejects.
    """
    where = space.source
    base_dict = base.to_dict()
    flat_base = flatten(base_dict)
    valid = valid_keys(base)
    for key in space.fixed:
        _check_key(key, valid, where, "fixed key")
    for key, param in space.params.items():
        _check_key(key, valid, where, "searched key")
        current = flat_base.get(key)
        integral = isinstance(current, int) and not isinstance(current, bool)
        if integral and param.dist in ("uniform", "loguniform") or (
                integral and param.dist == "quniform" and not float(param.args[2]).is_integer()):
            raise SearchSpaceError(f"{where}: {key} is an integer (now {current}); "
                                   f"{param.describe()} samples floats: use randint, qrandint, "
                                   f"lograndint or choice")
        for value in param.probe_values():
            try:
                TrainConfig.from_dict(deep_merge(base_dict, unflatten({key: value})))
            except (ConfigError, ValueError, TypeError) as exc:
                raise SearchSpaceError(f"{where}: {key}: {param.describe()} can sample "
                                       f"{value!r}, which the config rejects:\n{exc}") from None


def trial_config(base: Mapping[str, Any], params: Mapping[str, Any]) -> TrainConfig:
    """The typed config of one trial: ``base`` (a ``TrainConfig.to_dict()``) + sampled params."""
    return TrainConfig.from_dict(deep_merge(dict(base), unflatten(params)))
