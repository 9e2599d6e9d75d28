"""Reading ``.tar.gz``/``.tgz``/``.tar``/``.zip`` archives member by member, in memory.

A dataset archive is streamed once, in order, and never extracted. A truncated or damaged archive
must fail loudly rather than yield fewer images: :mod:`tarfile` takes a short or missing header
after the first member as the end of the archive, so a ``.tar.gz`` cut between two members would
otherwise load as a smaller, valid-looking data set. :func:`iter_archive` therefore requires the
tar end-of-archive block and reads a compressed stream to its end, where gzip, bzip2 and xz check
their length and CRC.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import posixpath
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from mve.data.errors import DataError

__all__ = ["archive_type", "iter_archive"]

_BLOCK = tarfile.BLOCKSIZE
_COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


def archive_type(path: Path) -> str | None:
    """``"tar.gz"``, ``"tar"`` or ``"zip"`` from the file name; None for anything else."""
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    return "tar" if name.endswith(".tar") else "zip" if name.endswith(".zip") else None


@contextlib.contextmanager
def _archive_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError,
            OSError) as e:
        raise DataError(f"cannot read archive {path}: corrupt or truncated? "
                        f"({type(e).__name__}: {e})") from e


def _clean(name: str) -> str | None:
    """Normalise an archive member name; None for junk (hidden, __MACOSX, outside the root)."""
    name = posixpath.normpath(name.replace("\\", "/")).lstrip("/")
    parts = name.split("/")
    if name in ("", ".") or parts[0] == ".." or any(p.startswith(".") or p == "__MACOSX"
                                                    for p in parts):
        return None
    return name


def _open_tar_stream(path: Path) -> BinaryIO:
    """The uncompressed tar bytes of ``path``, whatever compression its magic number names."""
    with open(path, "rb") as f:
        magic = f.read(6)
    for prefix, opener in _COMPRESSED:
        if magic.startswith(prefix):
            return opener(path, "rb")
    return open(path, "rb")


def _check_tar_end(path: Path, raw: BinaryIO, tf: tarfile.TarFile) -> None:
    """Fail unless the archive ended at a zero block and its compressed stream is complete."""
    raw.seek(tf.offset)
    end = raw.read(_BLOCK)
    if len(end) < _BLOCK or end.count(0) != _BLOCK:
        raise DataError(f"cannot read archive {path}: corrupt or truncated? (the tar stream "
                        f"stops at byte {tf.offset} without an end-of-archive block)")
    while raw.read(1 << 20):  # to the end: gzip/bz2/xz verify length and CRC there
        pass


def _iter_tar(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    with _open_tar_stream(path) as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
        # Members are visited in order, so every seek tarfile makes on ``raw`` is forward.
        while (m := tf.next()) is not None:
            name = _clean(m.name) if m.isfile() else None
            if name is not None:
                yield name, lambda m=m: tf.extractfile(m).read()
        _check_tar_end(path, raw, tf)


def _iter_zip(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    with zipfile.ZipFile(path) as zf:  # the central directory lists every member up front
        for info in zf.infolist():
            name = None if info.is_dir() else _clean(info.filename)
            if name is not None:
                yield name, lambda info=info: zf.read(info)


def iter_archive(path: Path, archive: str) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """Yield ``(name, read)`` per regular archive member; ``read`` is valid until the next one.

    Raises:
        DataError: the archive is corrupt or truncated, when listing or when reading a member.
    """

    def reader(fn: Callable[[], bytes]) -> Callable[[], bytes]:
        def read() -> bytes:
            with _archive_errors(path):
                return fn()
        return read

    with _archive_errors(path):
        members = _iter_zip(path) if archive == "zip" else _iter_tar(path)
        for name, read in members:
            yield name, reader(read)
