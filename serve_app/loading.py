"""Loading a checkpoint for serving: local paths, ``file://`` and pyarrow URIs (no Ray needed).

``load_model(source, kind)`` fetches a remote checkpoint (``s3://``, ``gs://``; ``AWS_ENDPOINT_URL``
for MinIO) into a temporary directory, loads it with :func:`mve.checkpoint.load_checkpoint`
(hash-verified, never unpickles) and checks that it is the expected model family. A
classifier answers through :class:`mve.inference.Precision` (``runner``): fp32, or a bfloat16
copy where the CPU computes bfloat16 natively (``precision: auto``). :func:`with_precision`
makes a new :class:`LoadedModel` of the same checkpoint in another precision, without reading
the checkpoint again; being a new object, its requests never share a batch with the old one's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from mve.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from mve.errors import UserError
from mve.images import input_size
from mve.inference import Precision, for_inference
from mve.models import get_spec
from mve.storage import local_directory

__all__ = ["LoadedModel", "load_model", "with_precision"]


@dataclass(frozen=True)
class LoadedModel:
    """A loaded checkpoint and where it came from."""

    source: str
    ckpt: Checkpoint
    loaded_at: float
    runner: nn.Module  # what answers: ckpt.model itself, or a Precision wrapper of it

    @property
    def precision(self) -> str:
        return getattr(self.runner, "precision", "fp32")

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


def _runner(ckpt: Checkpoint, precision: str) -> nn.Module:
    """The module that answers: a classifier in ``precision``; other families (the VAE, whose
    samples were not measured in bfloat16) in fp32 whatever ``precision`` says, as they
    ignore ``tta``."""
    if get_spec(ckpt.model_name).task == "classification":
        return Precision(ckpt.model, precision).eval()
    return ckpt.model


def with_precision(model: LoadedModel, precision: str) -> LoadedModel:
    """``model``'s checkpoint answering in ``precision`` (itself when that is its precision)."""
    new = replace(model, runner=_runner(model.ckpt, precision), loaded_at=time.time())
    return model if new.precision == model.precision else new


def load_model(source: str, kind: str, precision: str = "fp32") -> LoadedModel:
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
    return LoadedModel(source, ckpt, time.time(), _runner(ckpt, precision))
