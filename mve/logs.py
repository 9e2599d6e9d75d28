"""One logging setup for every entry point (the CLI, Ray Train workers, Tune trials)."""

from __future__ import annotations

import logging
import sys

__all__ = ["LOG_FORMAT", "setup_logging", "plain_stderr"]

LOG_FORMAT = "%(asctime)s - %(levelname)s - [%(module)s:%(funcName)s] %(message)s"


def setup_logging(*, quiet: bool = False) -> None:
    """The driver's format on stderr: INFO, or only warnings and errors with ``quiet``."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format=LOG_FORMAT,
                        stream=sys.stderr)


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
