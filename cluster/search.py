"""Search-space YAML files -> Ray Tune ``param_space`` (validated against ``TrainConfig``).

    python -m cluster.search classifier                  # print the default space, resolved
    python -m cluster.search vae --space my_space.yaml   # check a space file without Ray

A space file maps dotted :class:`~mve.config.TrainConfig` keys (see ``mve config show MODEL``)
to a constant or to a one-key mapping that names a distribution. The names and the bounds
follow ``ray.tune``'s functions of the same name exactly::

    optim.lr:               {loguniform: [1.0e-4, 1.0e-2]}  # float, log-uniform in [lo, hi)
    model.dropout:          {uniform: [0.0, 0.3]}           # float in [lo, hi)
    label_smoothing:        {quniform: [0.0, 0.2, 0.05]}    # float in [lo, hi], multiple of q
    model.cnn_layers:       {randint: [4, 8]}               # int in [lo, hi)  (hi EXCLUDED: 4..7)
    model.final_channels:   {qrandint: [128, 320, 2]}       # int in [lo, hi], multiple of q
                                                            #   (hi INCLUDED)
    model.starting_channels: {lograndint: [16, 65]}         # int, log-uniform in [lo, hi)
    optim.name:             {choice: [adam, adamw]}         # one of the listed scalars
    optim.schedule:         onecycle                        # a constant: same in every trial
    fixed:                                                  # more constants (dotted or nested)
      model.activation: mish
      data: {augment: {cutout: 0}}

Only distributions that Ray's ``OptunaSearch`` can convert are accepted (no ``grid_search``,
``randn``, ``qloguniform`` or ``sample_from``), and ``choice`` options must be scalars. Every key
and the extreme values of every distribution are checked against ``TrainConfig`` when the file
is loaded, so a typo fails before Ray starts. This module does not import Ray until
:meth:`SearchSpace.param_space` is called.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mve.config import (
    RECIPES,
    ConfigError,
    TrainConfig,
    deep_merge,
    load_train_config,
    parse_overrides,
    read_yaml,
)
from mve.errors import run_command
from mve.models import list_models

__all__ = [
    "DISTRIBUTIONS", "FORBIDDEN_KEYS", "Param", "SearchSpace", "SearchSpaceError",
    "default_space_path", "load_space", "parse_space", "flatten", "unflatten", "valid_keys",
    "validate_space", "trial_config", "search_recipe",
]

SPACES_DIR = Path(__file__).resolve().parent / "spaces"
RESERVED = "fixed"
# A search without --preset starts from this recipe where the family has one: the default
# spaces search the research note's network and the generic recipe's knobs, which a family's
# best recipe may not use (the classifier's `fast` is another network; its own space is
# spaces/classifier-fast.yaml, searched with --preset fast).
SEARCH_RECIPE = "baseline"

# name -> (number of arguments, one-line meaning for error messages and --help)
DISTRIBUTIONS: dict[str, tuple[int | None, str]] = {
    "uniform": (2, "[lo, hi]: float in [lo, hi)"),
    "quniform": (3, "[lo, hi, q]: float in [lo, hi], a multiple of q"),
    "loguniform": (2, "[lo, hi]: float, log-uniform in [lo, hi), lo > 0"),
    "randint": (2, "[lo, hi]: int in [lo, hi), upper bound excluded"),
    "qrandint": (3, "[lo, hi, q]: int in [lo, hi], a multiple of q, upper bound included"),
    "lograndint": (2, "[lo, hi]: int, log-uniform in [lo, hi), upper bound excluded, lo > 0"),
    "choice": (None, "[a, b, ...]: one of the listed scalars (str, int, float, bool, null)"),
}
_UNSUPPORTED = {
    "grid_search": "OptunaSearch cannot convert grid search; list the values under 'choice'",
    "randn": "OptunaSearch has no normal distribution; use uniform or loguniform",
    "qrandn": "OptunaSearch has no normal distribution; use quniform",
    "qloguniform": "Optuna drops the quantisation of log-uniform floats; use loguniform",
    "qlograndint": "Optuna cannot quantise log-uniform ints; use lograndint or qrandint",
    "sample_from": "arbitrary functions cannot be written in YAML or searched by Optuna",
}
# Keys a search must not touch, and why.
FORBIDDEN_KEYS: dict[str, str] = {
    "epochs": "the epoch budget is --max-epochs (ASHA's max_t)",
    "model.name": "the model family is the command's first argument",
    "model.preset": "an architecture preset is applied before the other fields; search the "
                    "fields themselves",
    "preset": "a recipe preset is applied before the space; pass --preset instead",
    "data.path": "the data is --data",
}


class SearchSpaceError(ConfigError):
    """A search-space file that is malformed or does not fit ``TrainConfig``."""


@dataclass(frozen=True)
class Param:
    """One searched key: a distribution name and its arguments (as written in the YAML)."""

    key: str
    dist: str
    args: tuple[Any, ...]

    def to_tune(self) -> Any:
        """The ``ray.tune`` domain (imports Ray)."""
        from ray import tune

        if self.dist == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.dist)(*self.args)

    def to_optuna(self) -> Any:
        """The Optuna distribution Ray's ``OptunaSearch`` converts this param to."""
        from optuna import distributions as od

        a = self.args
        if self.dist == "choice":
            return od.CategoricalDistribution(list(a))
        if self.dist in ("uniform", "loguniform", "quniform"):
            return od.FloatDistribution(a[0], a[1], log=self.dist == "loguniform",
                                        step=a[2] if self.dist == "quniform" else None)
        if self.dist == "qrandint":
            return od.IntDistribution(a[0], a[1], step=a[2])
        return od.IntDistribution(a[0], a[1] - 1, log=self.dist == "lograndint")

    def probe_values(self) -> list[Any]:
        """Values to check against ``TrainConfig``: the extremes and one interior value."""
        a = self.args
        if self.dist == "choice":
            return list(a)
        if self.dist == "uniform":
            return [a[0], a[0] + 0.37 * (a[1] - a[0]), a[1]]
        if self.dist == "loguniform":
            return [a[0], math.exp(math.log(a[0]) + 0.37 * math.log(a[1] / a[0])), a[1]]
        if self.dist == "quniform":
            return [round(a[0] / a[2]) * a[2], round(a[1] / a[2]) * a[2]]
        if self.dist in ("randint", "lograndint"):
            return [a[0], a[1] - 1]
        return [a[0], a[1]]  # qrandint: both bounds included

    def to_dict(self) -> dict[str, list[Any]]:
        return {self.dist: list(self.args)}

    def describe(self) -> str:
        return f"{self.dist}{list(self.args)}"


@dataclass(frozen=True)
class SearchSpace:
    """A parsed space: searched :class:`Param` s plus ``fixed`` overrides (dotted keys)."""

    params: dict[str, Param] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"

    def param_space(self) -> dict[str, Any]:
        """Tune ``param_space``: flat dotted keys -> ``ray.tune`` domains (imports Ray)."""
        return {key: p.to_tune() for key, p in self.params.items()}

    def pin(self, keys: Iterable[str]) -> SearchSpace:
        """A copy without the searched ``keys`` (pinned by ``--set`` on the command line)."""
        drop = set(keys)
        return SearchSpace({k: p for k, p in self.params.items() if k not in drop},
                           dict(self.fixed), self.source)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (dotted keys), which :func:`parse_space` reads back."""
        out: dict[str, Any] = {k: p.to_dict() for k, p in self.params.items()}
        if self.fixed:
            out[RESERVED] = dict(self.fixed)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# -- dotted keys -------------------------------------------------------------------------

def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def unflatten(data: Mapping[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 1}`` -> ``{"optim": {"lr": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = copy.deepcopy(value)
    return out


def valid_keys(cfg: TrainConfig) -> list[str]:
    """Every dotted leaf key of ``cfg`` that a space may set (forbidden keys excluded)."""
    return sorted(k for k in flatten(cfg.to_dict()) if k not in FORBIDDEN_KEYS)


# -- parsing -----------------------------------------------------------------------------

def default_space_path(model: str) -> Path:
    """The packaged default space of ``model`` (``cluster/spaces/<model>.yaml``)."""
    path = SPACES_DIR / f"{model}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
        raise SearchSpaceError(f"no default search space for {model!r}; known: {known}")
    return path


def load_space(path: str | Path | None, model: str) -> SearchSpace:
    """Reads a space file (``None``: the packaged default of ``model``); not yet validated."""
    p = Path(path) if path is not None else default_space_path(model)
    data = read_yaml(p, "search-space file", SearchSpaceError)
    return parse_space(data if data is not None else {}, source=str(p))


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` as a string; numeric strings become floats (as ``--set``)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _parse_param(key: str, spec: Mapping[str, Any], where: str) -> Param:
    if len(spec) != 1:
        raise SearchSpaceError(f"{where}: {key}: a distribution is a mapping with exactly one "
                               f"key (e.g. {{loguniform: [1.0e-4, 1.0e-2]}}), got {dict(spec)}")
    (dist, raw), = spec.items()
    if dist in _UNSUPPORTED:
        raise SearchSpaceError(f"{where}: {key}: '{dist}' is not supported: {_UNSUPPORTED[dist]}")
    if dist not in DISTRIBUTIONS:
        known = "\n".join(f"  {name} {doc}" for name, (_, doc) in DISTRIBUTIONS.items())
        raise SearchSpaceError(f"{where}: {key}: unknown distribution {dist!r}; known:\n{known}")
    nargs, doc = DISTRIBUTIONS[dist]
    if not isinstance(raw, list | tuple):
        raise SearchSpaceError(f"{where}: {key}: {dist} takes a list {doc}, got {raw!r}")
    args = tuple(_number(a) for a in raw)
    if dist == "choice":
        if not args:
            raise SearchSpaceError(f"{where}: {key}: choice needs at least one option")
        bad = [a for a in args if not _scalar(a)]
        if bad:
            raise SearchSpaceError(f"{where}: {key}: choice options must be scalars (Optuna "
                                   f"cannot search lists or mappings), got {bad}")
        return Param(key, dist, args)
    if len(args) != nargs:
        raise SearchSpaceError(f"{where}: {key}: {dist} takes {nargs} numbers {doc}, got {raw!r}")
    if not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
        raise SearchSpaceError(f"{where}: {key}: {dist} bounds must be numbers, got {raw!r}")
    lo, hi = args[0], args[1]
    integer = dist in ("randint", "qrandint", "lograndint")
    if integer:
        if not all(float(a).is_integer() for a in args):
            raise SearchSpaceError(f"{where}: {key}: {dist} bounds must be integers, got {raw!r}")
        args = tuple(int(a) for a in args)
        lo, hi = args[0], args[1]
    if dist in ("randint", "lograndint") and hi - lo < 1:
        raise SearchSpaceError(f"{where}: {key}: {dist} [{lo}, {hi}) is empty (the upper bound "
                               f"is excluded; use [{lo}, {lo + 1}] for the single value {lo})")
    if not lo < hi and dist not in ("randint", "lograndint"):
        raise SearchSpaceError(f"{where}: {key}: {dist} needs lo < hi, got {raw!r}")
    if dist in ("loguniform", "lograndint") and lo <= 0:
        raise SearchSpaceError(f"{where}: {key}: {dist} needs lo > 0, got {raw!r}")
    if len(args) == 3:
        q = args[2]
        steps = (hi - lo) / q if q > 0 else 0.5
        if abs(steps - round(steps)) > 1e-9:
            raise SearchSpaceError(f"{where}: {key}: {dist} needs q > 0 and hi - lo a multiple "
                                   f"of q (Optuna would move hi), got {raw!r}")
    return Param(key, dist, args)


def parse_space(data: Mapping[str, Any], *, source: str = "<memory>") -> SearchSpace:
    """Parses the YAML form (see the module docstring); keys are checked by :func:`validate_space`."""
    if not isinstance(data, Mapping):
        raise SearchSpaceError(f"{source}: a search space is a mapping of dotted keys, "
                               f"got {type(data).__name__}")
    params: dict[str, Param] = {}
    fixed: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not key:
            raise SearchSpaceError(f"{source}: keys must be dotted strings, got {key!r}")
        if key == RESERVED:
            if not isinstance(value, Mapping):
                raise SearchSpaceError(f"{source}: '{RESERVED}' must be a mapping of overrides")
            for k, v in flatten(value).items():
                fixed[k] = _number(v)
        elif isinstance(value, Mapping):
            params[key] = _parse_param(key, value, source)
        else:
            fixed[key] = _number(value)
    both = sorted(set(params) & set(fixed))
    if both:
        raise SearchSpaceError(f"{source}: {both} are both searched and fixed")
    return SearchSpace(params, fixed, source)


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


# -- CLI ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``python -m cluster.search`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m cluster.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=list_models())
    p.add_argument("--space", help="search-space YAML (default: the packaged one)")
    p.add_argument("--preset")
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--set", action="append", default=[], dest="overrides")
    return p


def check_space(args: argparse.Namespace) -> int:
    """Loads, pins and validates the space as a search would, and prints it resolved."""
    space = load_space(args.space, args.model)
    space = space.pin(o.partition("=")[0].strip() for o in args.overrides)
    base = base_config(args.model, space, preset=args.preset, files=args.config,
                       overrides=args.overrides)
    validate_space(space, base)
    print(f"# {space.source}: {len(space.params)} searched, {len(space.fixed)} fixed")
    print(space.to_yaml(), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cluster.search MODEL [--space FILE]``: validate and print a space."""
    return run_command(check_space, build_parser().parse_args(argv), prog="cluster.search")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
