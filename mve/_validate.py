"""Validation of plain dicts into typed, frozen config dataclasses (through pydantic)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import pydantic

from mve.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A config file, preset or ``--set`` override that does not fit the typed config."""


def check_keys(cls: type, data: Mapping[str, Any], where: str) -> None:
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"unknown {where} keys {unknown}; valid keys: {sorted(valid)}")


def validate_dataclass(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """Coerces and checks ``data`` against dataclass ``cls``; unknown keys are errors."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    check_keys(cls, data, where)
    try:
        return pydantic.TypeAdapter(cls).validate_python(dict(data))
    except pydantic.ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {where}{'.' + loc if loc else ''}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"invalid {where} config:\n" + "\n".join(lines)) from None
