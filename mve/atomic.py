"""Atomic file writes: a temp file in the destination folder, fsync, then ``os.replace``.

A reader (another process, a crashed run's successor) sees the old file or the whole new one,
never a torn write. Every writer of reports, plots, caches and manifests goes through here.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "write_bytes", "write_text", "write_json"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Calls ``write(tmp_path)`` and renames the result over ``path``; parent folders are
    created. The temp file gets the usual umask-based mode, not mkstemp's 0600."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # persist the rename; not possible on every platform
        dfd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return out


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Indented JSON (``str`` for anything JSON does not know), atomically."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")
