"""``python -m cluster.search MODEL [--space FILE]``: validate a space file and print it
resolved, without Ray."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import cluster.search as search
from cluster.search import base_config, load_space, validate_space
from mve.errors import run_command
from mve.models import list_models

# -- CLI ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``python -m cluster.search`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m cluster.search", description=search.__doc__,
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
