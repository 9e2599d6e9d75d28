"""One logging setup for every entry point (the CLI, Ray Train workers, Tune trials)."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["LOG_FORMAT", "PACKAGES", "setup_logging", "plain_stderr", "verbosity_parent",
           "driver_level", "use_level", "worker_logging"]

LOG_FORMAT = "%(asctime)s - %(levelname)s - [%(module)s:%(funcName)s] %(message)s"
# The project's own loggers: -v makes these DEBUG while the root (every library) stays at INFO,
# so that a verbose run shows mve's detail, not urllib3's or matplotlib's.
PACKAGES = ("mve", "mve_cli", "cluster", "serve_app")


def _level(quiet: bool, verbose: bool) -> int:
    return logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO


def setup_logging(*, quiet: bool = False, verbose: bool = False) -> None:
    """The driver's format on stderr: INFO; only warnings and errors with ``quiet``; mve's own
    debug lines too with ``verbose``.

    The level is set on mve's loggers every call (not only the root's, which ``basicConfig``
    sets once per process), so a second command in the same process gets its own level.
    """
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format=LOG_FORMAT,
                        stream=sys.stderr)
    use_level(_level(quiet, verbose))


def use_level(level: int) -> None:
    """mve's loggers at ``level``: the driver's ``-q``/``-v`` applied inside a Ray worker,
    whose root logger Ray configures (INFO, to the driver's console)."""
    for name in PACKAGES:
        logging.getLogger(name).setLevel(level)


def worker_logging(level: int) -> None:
    """In a Ray worker: mve's loggers at the driver's ``level``, every other one at WARNING
    (INFO with ``-v``). Ray sets a worker's root logger to INFO with a handler to the driver's
    console, so without this each ``ray.train.report`` prints its whole result there
    ("Reporting training result 1: TrainingReport(...)", Ray Train's execution context)."""
    use_level(level)
    logging.getLogger().setLevel(logging.INFO if level < logging.INFO else logging.WARNING)


def driver_level() -> int:
    """The level ``setup_logging`` gave this process's mve loggers, to hand to Ray workers;
    INFO when it was never called (a library user's process)."""
    return logging.getLogger("mve").level or logging.INFO


def verbosity_parent(*, suppress: bool = False) -> argparse.ArgumentParser:
    """``-q/--quiet`` and ``-v/--verbose`` (dests ``quiet`` and ``log_verbose``).

    With ``suppress`` an option that is not given sets nothing: a subcommand's parser then
    keeps what ``mve -q``/``mve -v`` before the subcommand set (argparse copies every default
    of a subparser over the main parser's values). ``log_verbose`` is not ``verbose``, which
    ``mve tune -v N`` uses for Tune's own progress output.
    """
    default = argparse.SUPPRESS if suppress else False
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="only warnings and errors")
    g.add_argument("-v", "--verbose", dest="log_verbose", action="store_true", default=default,
                   help="mve's debug lines too")
    return p


def plain_stderr(name: str, level: int = logging.INFO) -> logging.Logger:
    """Logger ``name`` writing bare messages to stderr, once: inside a Ray worker its lines
    reach the driver's output already prefixed by Ray, so they carry no format of their own."""
    log = logging.getLogger(name)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)
    return log
