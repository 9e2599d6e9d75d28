"""Helpers shared by the bench scripts: wall-clock repeats and writing the Markdown result."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["repeat_time", "publish"]


def repeat_time(fn: Callable[[], None], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def publish(text: str, out: str | None) -> None:
    """Prints ``text`` and, with ``out``, writes it there too."""
    print(text)
    if out:
        Path(out).write_text(text)
