"""Storage locations: a local or shared folder, or an object-store URI (``s3://``, ``gs://``).

Used by Ray Train/Tune for run storage and by Serve to fetch checkpoints; pyarrow's
filesystems do the I/O, so nothing here needs Ray.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = ["resolve_storage"]


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
