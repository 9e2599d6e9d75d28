"""The sha256 of every file under a folder, by relative path: two calls compare equal only
when no file was written, added or removed in between (tests that a command left a checkpoint
as it was)."""

from __future__ import annotations

from pathlib import Path

from mve.data.cache import sha256_file

__all__ = ["tree_digests"]


def tree_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file()}
