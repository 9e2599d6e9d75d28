"""Loading a checkpoint for serving: local paths, ``file://`` and pyarrow URIs (no Ray needed).

``load_model(source, kind)`` fetches a remote checkpoint (``s3://``, ``gs://``; ``AWS_ENDPOINT_URL``
for MinIO) into a temporary directory, loads it with :func:`mve.checkpoint.load_checkpoint`
(hash-verified, never unpickles) and checks that it is the expected model family.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from mve.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from mve.errors import UserError
from mve.images import input_size
from mve.inference import for_inference
from mve.models import get_spec
from mve.storage import local_directory

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


def load_model(source: str, kind: str) -> LoadedModel:
    """Loads and checks a checkpoint of model family ``kind`` (blocking; call in a thread)."""
    try:
        with local_directory(source) as path:
            ckpt = load_checkpoint(path, device="cpu")
    except UserError as exc:
        raise CheckpointError(str(exc)) from None
    for_inference(ckpt.model)  # channels-last weights: ~2x faster CPU convolutions
    if ckpt.model_name != kind:
        raise CheckpointError(f"{source} holds a {ckpt.model_name!r} model, not a {kind!r}")
    if get_spec(kind).task == "classification":
        k = ckpt.model_config.num_classes
        if not ckpt.class_names or len(ckpt.class_names) != k:
            raise CheckpointError(f"{source}: class_names must list {k} classes")
    input_size(ckpt.preprocessing)
    return LoadedModel(source, ckpt, time.time())
