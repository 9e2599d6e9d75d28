"""Loading a checkpoint for serving: local paths, ``file://`` and pyarrow URIs (no Ray needed).

``load_model(source, kind)`` fetches a remote checkpoint (``s3://``, ``gs://``; ``AWS_ENDPOINT_URL``
for MinIO) into a temporary directory, loads it with :func:`mve.checkpoint.load_checkpoint`
(hash-verified, never unpickles) and checks that it is the expected model family.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mve.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from mve.inference import for_inference
from mve.models import get_spec
from serve_app.images import input_size

__all__ = ["LoadedModel", "load_model"]


@dataclass(frozen=True)
class LoadedModel:
    """A loaded checkpoint and where it came from."""

    source: str
    ckpt: Checkpoint
    loaded_at: float

    @property
    def id(self) -> str:
        return self.ckpt.checkpoint_id

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.ckpt.preprocessing

    @property
    def class_names(self) -> list[str]:
        names = self.ckpt.class_names
        return list(names) if names else []


def _local_copy(source: str) -> tuple[Path, Path | None]:
    """A local directory for a path, ``file://`` URI or pyarrow-readable URI (s3://, gs://)."""
    parsed = urlparse(source)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else source).expanduser(), None
    import pyarrow.fs as pafs

    from mve.storage import resolve_storage

    path, fs = resolve_storage(source)
    if fs is None:
        fs, path = pafs.FileSystem.from_uri(source)
    tmp = Path(tempfile.mkdtemp(prefix="mve-ckpt-"))
    try:
        (tmp / "ckpt").mkdir()  # copy_files does not create a missing local destination
        pafs.copy_files(path, str(tmp / "ckpt"), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot fetch checkpoint {source}: {exc}") from None
    return tmp / "ckpt", tmp


def load_model(source: str, kind: str) -> LoadedModel:
    """Loads and checks a checkpoint of model family ``kind`` (blocking; call in a thread)."""
    path, tmp = _local_copy(source)
    try:
        ckpt = load_checkpoint(path, device="cpu")
        for_inference(ckpt.model)  # channels-last weights: ~2x faster CPU convolutions
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if ckpt.model_name != kind:
        raise CheckpointError(f"{source} holds a {ckpt.model_name!r} model, not a {kind!r}")
    if get_spec(kind).task == "classification":
        k = ckpt.model_config.num_classes
        if not ckpt.class_names or len(ckpt.class_names) != k:
            raise CheckpointError(f"{source}: class_names must list {k} classes")
    input_size(ckpt.preprocessing)
    return LoadedModel(source, ckpt, time.time())
