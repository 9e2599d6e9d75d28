"""The search-space file format: YAML -> :class:`SearchSpace` (see :mod:`cluster.search`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mve.config import ConfigError, read_yaml

__all__ = ["DISTRIBUTIONS", "Param", "SearchSpace", "SearchSpaceError", "default_space_path",
           "load_space", "parse_space", "flatten", "unflatten"]

SPACES_DIR = Path(__file__).resolve().parent.parent / "spaces"
RESERVED = "fixed"

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

    def contains(self, value: Any) -> bool:
        """Whether ``value`` lies in this distribution: its draws' bounds (:data:`DISTRIBUTIONS`),
        except that a float range includes ``hi``, as the Optuna distribution it becomes does."""
        a = self.args
        if self.dist == "choice":
            return value in a and any(type(value) is type(o) for o in a if o == value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.dist in ("uniform", "loguniform"):
            return a[0] <= value <= a[1]
        if self.dist == "quniform":  # multiples of q carry rounding error: compare loosely
            slack = 1e-9 * a[2]
            return (a[0] - slack <= value <= a[1] + slack
                    and math.isclose(value / a[2], round(value / a[2]), abs_tol=1e-9))
        if not float(value).is_integer():
            return False
        if self.dist == "qrandint":
            return a[0] <= value <= a[1] and (value - a[0]) % a[2] == 0
        return a[0] <= value < a[1]  # randint, lograndint

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

    def base_point(self, base: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
        """The searched values of the (nested) config ``base`` as one point to evaluate first,
        so a search starts from its recipe and can only improve on it; None when some value
        lies outside the space (Optuna's warm start needs every key), with those keys."""
        flat = flatten(base)
        point = {key: flat.get(key) for key in self.params}
        outside = [key for key, p in self.params.items() if not p.contains(point[key])]
        return (None if outside or not point else point), outside

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
