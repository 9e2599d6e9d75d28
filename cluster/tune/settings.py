"""A search's settings: the command line resolved and validated before Ray starts."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cluster.search import SearchSpace, base_config, load_space, validate_space
from mve.config import TrainConfig
from mve.errors import UserError
from mve.options import given
from mve.tracking import TrackingOptions

__all__ = ["SearchError", "TuneSettings", "prepare"]

logger = logging.getLogger("cluster.tune")


class SearchError(UserError):
    """A search the user asked for that cannot run: a bad option, or a different search under
    an existing experiment's name (shown as one line, exit code 2)."""


@dataclass(frozen=True)
class TuneSettings:
    """Everything a search needs, resolved and validated before Ray starts."""

    model: str
    metric: str
    mode: str
    space: SearchSpace
    base: TrainConfig  # every trial's starting config; base.data.path is the resolved data
    samples: int
    max_epochs: int
    grace_period: int = 1
    reduction_factor: float = 2
    seed: int = 0
    workers_per_trial: int = 1
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 1
    max_concurrent: int | None = None
    storage: str | None = None
    s3_endpoint: str | None = None
    address: str | None = None
    name: str = "tune"
    out: Path = field(default_factory=lambda: Path("runs/tune"))
    verbose: int = 1
    command: str = ""
    tracking: TrackingOptions = field(default_factory=TrackingOptions)

    @property
    def data_path(self) -> str:
        """The resolved data path, as every trial's config records it."""
        return str(self.base.data.path)

    def spec(self) -> dict[str, Any]:
        """What defines the search; a resumed experiment must have the same spec."""
        return json.loads(json.dumps({
            "model": self.model, "metric": self.metric, "mode": self.mode,
            "space": self.space.to_dict(), "base": self.base.to_dict(),
            "data_path": self.data_path, "samples": self.samples, "max_epochs": self.max_epochs,
            "grace_period": self.grace_period, "reduction_factor": self.reduction_factor,
            "seed": self.seed, "workers_per_trial": self.workers_per_trial,
        }, default=str))


def _check_options(args: argparse.Namespace) -> None:
    if args.samples < 1:
        raise SearchError(f"--samples must be >= 1, got {args.samples}")
    if args.max_epochs < 1:
        raise SearchError(f"--max-epochs must be >= 1, got {args.max_epochs}")
    if not 1 <= args.grace_period <= args.max_epochs:
        raise SearchError(f"--grace-period must be in [1, --max-epochs={args.max_epochs}], "
                          f"got {args.grace_period}")
    if args.reduction_factor <= 1:
        raise SearchError(f"--reduction-factor must be > 1, got {args.reduction_factor}")
    if args.workers_per_trial < 1:
        raise SearchError(f"--workers-per-trial must be >= 1, got {args.workers_per_trial}")
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        raise SearchError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")


def _base_config(args: argparse.Namespace, space: SearchSpace, pinned: list[str]) -> TrainConfig:
    """The config every trial starts from, with the resolved data path recorded in it."""
    from mve.data import resolve_data_path

    extra: dict[str, Any] = {"epochs": args.max_epochs, **given(args, seed="seed")}
    data = given(args, limit="limit", val_size="val_size")
    base = base_config(args.model, space, preset=args.preset, files=args.config,
                       overrides=args.overrides, extra={**extra, "data": data} if data else extra)
    if base.data.val_size < 1:
        raise SearchError("a search needs a validation split: --val-size must be >= 1")
    if args.gpus_per_trial > 0 and base.precision == "fp32" and "precision" not in pinned:
        base = replace(base, precision="bf16")
        logger.info("GPU trials: precision bf16 (pin with --set precision=fp32)")
    data_path = str(resolve_data_path(args.data or base.data.path, download=True))
    return base.with_data_path(data_path)


def _command(args: argparse.Namespace) -> str:
    """The command line recorded in the reports: ``mve tune ARGS`` as the user typed it."""
    argv = getattr(args, "argv", None)  # set by `python -m cluster.tune`
    if argv is not None:
        return shlex.join(["mve", "tune", *argv])
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def prepare(args: argparse.Namespace) -> TuneSettings:
    """Resolves and validates the whole search without starting Ray.

    Raises:
        UserError: a bad space, config, data path or option.
    """
    from mve.models import target_metric

    model = args.model
    _check_options(args)
    space = load_space(args.space, model)
    pinned = [o.partition("=")[0].strip() for o in args.overrides]
    if any(k in space.params for k in pinned):
        logger.info("--set pins %s: not searched", [k for k in pinned if k in space.params])
    space = space.pin(pinned)
    base = _base_config(args, space, pinned)
    validate_space(space, base)
    metric, mode = target_metric(model)
    return TuneSettings(
        model=model, metric=metric, mode=mode, space=space, base=base,
        samples=args.samples, max_epochs=args.max_epochs, grace_period=args.grace_period,
        reduction_factor=args.reduction_factor, seed=args.seed if args.seed is not None else 0,
        workers_per_trial=args.workers_per_trial, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, max_failures=args.max_failures,
        max_concurrent=args.max_concurrent, storage=args.storage, s3_endpoint=args.s3_endpoint,
        address=args.address, name=args.name or f"tune-{model}",
        out=Path(args.out or f"runs/tune-{model}"), verbose=0 if args.quiet else args.verbose,
        command=_command(args), tracking=TrackingOptions.from_args(args))
