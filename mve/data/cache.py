"""Decoded-dataset cache: uint8 tensors in safetensors files plus a JSON sidecar.

An entry is keyed by the source path, its checksum, the requested image size and
:data:`CACHE_FORMAT_VERSION`. Files are written atomically (temp file in the same directory, fsync,
``os.replace``) and filling is serialised with a :class:`filelock.FileLock`, so several processes
filling one entry at once decode it once and never see a torn file. Unreadable or inconsistent
entries are treated as misses and rewritten. Nothing here uses pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from mve.atomic import atomic_write

__all__ = ["CACHE_FORMAT_VERSION", "cache_key", "get_or_fill", "read_entry", "resolve_cache_dir",
           "sha256_file", "sha256_listing", "write_entry"]

CACHE_FORMAT_VERSION = 1
_TENSORS = {"images": (torch.uint8, 4), "labels": (torch.int64, 1), "is_test": (torch.uint8, 1)}
Fill = Callable[[], tuple[dict[str, torch.Tensor], dict]]


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return ``cache_dir``, else ``$MVE_CACHE_DIR``, else ``~/.cache/mve/datasets``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mve" / "datasets"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_listing(entries: Iterable[tuple[str, int, int]]) -> str:
    """Hex sha256 over sorted ``(relative path, size, mtime_ns)`` entries (directory sources)."""
    h = hashlib.sha256()
    for name, size, mtime_ns in sorted(entries):
        h.update(f"{name}\0{size}\0{mtime_ns}\n".encode())
    return h.hexdigest()


def cache_key(source: str, sha256: str, image_size: int | None) -> str:
    """Cache entry name for a source, its checksum and the requested image size."""
    ident = json.dumps([CACHE_FORMAT_VERSION, source, sha256, image_size])
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def read_entry(cache_dir: Path, key: str,
               expect: dict | None = None) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Load an entry, or None when it is missing, unreadable or inconsistent."""
    from safetensors import safe_open

    try:
        info = json.loads((cache_dir / f"{key}.json").read_text())
        if info.get("format_version") != CACHE_FORMAT_VERSION or info.get("key") != key:
            return None
        if expect and any(info.get(k) != v for k, v in expect.items()):
            return None
        with safe_open(str(cache_dir / f"{key}.safetensors"), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key or set(f.keys()) != set(_TENSORS):
                return None
            tensors = {k: f.get_tensor(k) for k in _TENSORS}
        n = int(info["counts"]["total"])
        for name, (dtype, ndim) in _TENSORS.items():
            t = tensors[name]
            if t.dtype != dtype or t.ndim != ndim or t.shape[0] != n:
                return None
        if list(tensors["images"].shape[1:]) != info["shape"][1:]:
            return None
        return tensors, info
    except Exception:  # noqa: BLE001 - any unreadable entry is a miss, re-decoded by the caller
        return None


def write_entry(cache_dir: Path, key: str, tensors: dict[str, torch.Tensor], info: dict) -> dict:
    """Atomically write an entry (safetensors first, then the JSON sidecar that commits it)."""
    from safetensors.torch import save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    images, is_test = tensors["images"], tensors["is_test"].bool()
    info = {**info, "format_version": CACHE_FORMAT_VERSION, "key": key,
            "shape": list(images.shape),
            "counts": {"total": len(images), "test": int(is_test.sum()),
                       "train": int((~is_test).sum())}}
    data = {k: tensors[k].contiguous() for k in _TENSORS}
    atomic_write(cache_dir / f"{key}.safetensors",
                  lambda tmp: save_file(data, tmp, metadata={"key": key}))
    text = json.dumps(info, indent=1, sort_keys=True)
    atomic_write(cache_dir / f"{key}.json", lambda tmp: Path(tmp).write_text(text))
    return info


def get_or_fill(cache_dir: Path, *, source: str, sha256: str, image_size: int | None,
                fill: Fill) -> tuple[dict[str, torch.Tensor], dict, bool]:
    """Return ``(tensors, info, from_cache)``, calling ``fill()`` under a file lock on a miss."""
    from filelock import FileLock

    key = cache_key(source, sha256, image_size)
    expect = {"sha256": sha256, "source": source, "image_size": image_size}
    hit = read_entry(cache_dir, key, expect)
    if hit is not None:
        return *hit, True
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{key}.lock")):
        hit = read_entry(cache_dir, key, expect)  # another process may have filled it meanwhile
        if hit is not None:
            return *hit, True
        tensors, info = fill()
        info = write_entry(cache_dir, key, tensors, {**info, **expect})
    return tensors, info, False
