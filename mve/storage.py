"""Storage locations: a local or shared folder, or an object-store URI (``s3://``, ``gs://``).

Used by Ray Train/Tune for run storage, and by Serve and :func:`mve.load` to fetch checkpoints; pyarrow's
filesystems do the I/O, so nothing here needs Ray.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mve.errors import UserError

__all__ = ["resolve_storage", "local_directory"]


def resolve_storage(storage: str | None, *, s3_endpoint: str | None = None
                    ) -> tuple[str, Any | None]:
    """Maps ``--storage`` to Ray's ``(storage_path, storage_filesystem)``.

    ``None`` means ``./runs/ray``; a local or shared-filesystem path is made absolute; an
    ``s3://bucket/prefix`` URI goes through pyarrow, with ``s3_endpoint`` (or
    ``$AWS_ENDPOINT_URL``) for S3-compatible servers such as MinIO.
    """
    if storage is None:
        return str(Path("runs/ray").absolute()), None
    parsed = urlparse(storage)
    if parsed.scheme in ("", "file"):
        return str(Path(parsed.path if parsed.scheme else storage).expanduser().absolute()), None
    if parsed.scheme != "s3":
        return storage, None  # gs://, hdfs://, ...: pyarrow infers the filesystem
    from pyarrow import fs

    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {}
    if endpoint:
        ep = urlparse(endpoint)
        kwargs.update(endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "https")
    if os.environ.get("AWS_REGION"):
        kwargs["region"] = os.environ["AWS_REGION"]
    return f"{parsed.netloc}{parsed.path}".rstrip("/"), fs.S3FileSystem(**kwargs)


@contextmanager
def local_directory(source: str | os.PathLike) -> Iterator[Path]:
    """A local directory with the contents of ``source``: a path or ``file://`` URI as it is, a
    pyarrow-readable URI (``s3://``, ``gs://``; ``$AWS_ENDPOINT_URL`` for MinIO) copied into a
    temporary directory that is removed on exit."""
    text = os.fspath(source)
    parsed = urlparse(text)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # "C:" is a drive, not a URI
        yield Path(parsed.path if parsed.scheme == "file" else text).expanduser()
        return
    import pyarrow.fs as pafs

    path, fs = resolve_storage(text)
    if fs is None:
        fs, path = pafs.FileSystem.from_uri(text)
    tmp = Path(tempfile.mkdtemp(prefix="mve-fetch-"))
    try:
        (tmp / "dir").mkdir()  # copy_files does not create a missing local destination
        try:
            pafs.copy_files(path, str(tmp / "dir"), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
        except Exception as exc:
            raise UserError(f"cannot fetch {text}: {exc}") from None
        yield tmp / "dir"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
