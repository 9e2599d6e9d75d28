"""The Python API: ``mve.load`` a shipped model, a checkpoint directory or an ``s3://`` URI.

    import mve

    clf = mve.load("cifar10-classifier")
    clf.predict("cat.jpg")[0].label          # top-k with labels, as `mve predict` prints
    x = clf.transforms()(pil_image)          # the checkpoint's preprocessing, [1, 3, 32, 32]
    vae = mve.load("cifar10-vae")
    grid = vae.sample(16, seed=0)            # uint8 [16, 3, 32, 32]

Like torchvision's weights, a loaded model carries its preprocessing and metadata; like
``timm.create_model(..., pretrained=True)`` it comes ready in eval mode. The server and the CLI
run the same code: :mod:`mve.images` for the tensors and :func:`mve.inference.top_k` for the
answer. Checkpoints are hash-verified safetensors, never unpickled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mve.checkpoint import Checkpoint, load_checkpoint
from mve.errors import UserError
from mve.images import ImageInput, preprocess, to_rgb_arrays, to_uint8_hwc
from mve.inference import SERVING_TTA, for_inference, top_k
from mve.models import get_spec
from mve.pretrained import SHIPPED, shipped_checkpoint
from mve.storage import local_directory

__all__ = ["Classifier", "Generator", "Model", "Prediction", "Provenance", "Score",
           "Transforms", "load"]

_CHUNK = 256  # images per forward pass: bounded memory for long lists


@dataclass(frozen=True)
class Score:
    """One class of a prediction."""

    label: str
    index: int
    probability: float


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most probable first."""

    label: str
    probability: float
    top_k: tuple[Score, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Prediction:
        return cls(d["label"], d["probability"], tuple(Score(**s) for s in d["top_k"]))


@dataclass(frozen=True)
class Provenance:
    """Where a checkpoint's training data came from (``mve.json``'s ``provenance``)."""

    source: str | None = None
    sha256: str | None = None
    kind: str | None = None
    split_seed: int | None = None
    val_size: int | None = None
    counts: Mapping[str, int] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Provenance:
        d = dict(d or {})
        known = {k: d.pop(k) for k in ("source", "sha256", "kind", "split_seed", "val_size",
                                       "counts") if k in d}
        return cls(**known, extra=d)


class Transforms:
    """The checkpoint's preprocessing as a callable (torchvision's ``weights.transforms()``):
    images in any form :func:`mve.images.to_rgb_arrays` reads -> float ``[N, 3, H, W]``."""

    def __init__(self, preprocessing: Mapping[str, Any]) -> None:
        self.preprocessing = dict(preprocessing)

    def __call__(self, images: ImageInput) -> torch.Tensor:
        return preprocess(to_rgb_arrays(images), self.preprocessing)

    def __repr__(self) -> str:
        p = self.preprocessing
        return (f"Transforms(resize={tuple(p['input_size'])}, bilinear, "
                f"mean={[round(m, 4) for m in p['mean']]}, std={[round(s, 4) for s in p['std']]})")


class Model:
    """A loaded checkpoint: the ``nn.Module`` (eval mode) and its metadata as attributes."""

    def __init__(self, ckpt: Checkpoint, name: str) -> None:
        self.name = name
        self.checkpoint_id = ckpt.checkpoint_id
        self.kind = ckpt.model_name
        self.model: nn.Module = for_inference(ckpt.model)
        self.config = ckpt.model_config
        self.preprocessing = dict(ckpt.preprocessing)
        self.metrics: dict[str, Any] = dict(ckpt.metrics)
        self.provenance = Provenance.from_dict(ckpt.meta.get("provenance"))
        self.card = _card(ckpt.path)
        self.num_params = sum(p.numel() for p in self.model.parameters())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def transforms(self) -> Transforms:
        """This checkpoint's preprocessing (a fresh callable)."""
        return Transforms(self.preprocessing)

    def to(self, device: str | torch.device) -> Model:
        self.model.to(device)
        for_inference(self.model)
        return self

    def _inputs(self, images: ImageInput) -> torch.Tensor:
        return preprocess(to_rgb_arrays(images), self.preprocessing).to(self.device)

    def _pixels(self, y: torch.Tensor) -> torch.Tensor:
        """Model-space images -> ``uint8 [N, 3, H, W]`` on the CPU."""
        return torch.from_numpy(to_uint8_hwc(y, self.preprocessing)).permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, {self.checkpoint_id}, "
                f"{self.num_params:,} parameters)")


class Classifier(Model):
    """An image classifier: :meth:`predict` gives top-k labels, :meth:`probabilities` all."""

    def __init__(self, ckpt: Checkpoint, name: str, tta: str | None = SERVING_TTA) -> None:
        super().__init__(ckpt, name)
        self.classes: tuple[str, ...] = tuple(ckpt.class_names or ())
        if tta is not None:
            self.tta = tta

    @property
    def tta(self) -> str:
        """Test-time augmentation: ``none``, ``flip`` (the serving default) or
        ``flip_translate``; assign to change it."""
        return self.model.config.tta

    @tta.setter
    def tta(self, mode: str) -> None:
        try:
            self.model.set_tta(mode)
        except ValueError as exc:
            raise UserError(str(exc)) from None

    @torch.inference_mode()
    def probabilities(self, images: ImageInput) -> torch.Tensor:
        """``[N, K]`` class probabilities (float32, CPU)."""
        x = self._inputs(images)
        return torch.cat([self.model(c).float().softmax(dim=-1).cpu()
                          for c in x.split(_CHUNK)])

    def predict(self, images: ImageInput, top_k: int = 5) -> list[Prediction]:
        """The ``top_k`` classes of each image, most probable first."""
        if top_k < 1:
            raise UserError(f"top_k must be >= 1, got {top_k}")
        return [Prediction.from_dict(d) for d in self.top_k_dicts(images, top_k)]

    def top_k_dicts(self, images: ImageInput, k: int) -> list[dict[str, Any]]:
        """:meth:`predict` as the plain dicts of the server's ``/v1/classify`` answer."""
        return top_k(self.probabilities(images).numpy(), self.classes, k)


class Generator(Model):
    """The VAE: every method returns ``uint8 [N, 3, H, W]`` images on the CPU."""

    @torch.inference_mode()
    def sample(self, n: int = 16, *, temperature: float = 1.0, seed: int | None = None,
               prior: str | None = None, steps: int | None = None) -> torch.Tensor:
        """``n`` samples from the prior (``"standard"``, ``"gmm"`` or ``"diffusion"``; default
        the diffusion prior when the checkpoint has one, else its own); ``steps``: the
        diffusion sampler's steps."""
        return self._pixels(self._call(self.model.sample, n, temperature=temperature,
                                       seed=seed, prior=prior, steps=steps))

    @torch.inference_mode()
    def reconstruct(self, images: ImageInput) -> torch.Tensor:
        """The posterior-mean reconstruction of each image."""
        x = self._inputs(images)
        return self._pixels(torch.cat([self.model.reconstruct(c) for c in x.split(_CHUNK)]))

    @torch.inference_mode()
    def variations(self, image: ImageInput, n: int = 8, *, temperature: float = 1.0,
                   seed: int | None = None) -> torch.Tensor:
        """``n`` decodes around the posterior of one image."""
        x = self._one(image, "variations")
        return self._pixels(self._call(self.model.variations, x[0], n,
                                       temperature=temperature, seed=seed))

    @torch.inference_mode()
    def interpolate(self, a: ImageInput, b: ImageInput, steps: int = 8, *,
                    method: str = "slerp") -> torch.Tensor:
        """``steps`` images from ``a`` to ``b`` through the latent space."""
        xa, xb = self._one(a, "interpolate"), self._one(b, "interpolate")
        return self._pixels(self._call(self.model.interpolate, xa[0], xb[0], steps,
                                       method=method))

    def _one(self, image: ImageInput, what: str) -> torch.Tensor:
        x = self._inputs(image)
        if len(x) != 1:
            raise UserError(f"{what} takes one image per input, got {len(x)}")
        return x

    @staticmethod
    def _call(fn: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:  # a bad n/temperature/steps, or no fitted GMM prior
            raise UserError(str(exc)) from None


def _card(path: Path) -> str:
    report = path / "REPORT.md"
    return report.read_text() if report.is_file() else ""


def load(source: str | os.PathLike, *, device: str | torch.device = "cpu",
         tta: str | None = SERVING_TTA) -> Classifier | Generator:
    """A shipped model by name (:func:`mve.list_models`), a checkpoint directory, or a
    ``file://``/``s3://``/``gs://`` URI of one; ``tta`` sets a classifier's test-time
    augmentation (None keeps the checkpoint's own)."""
    text = os.fspath(source)
    where = shipped_checkpoint(text) if text in SHIPPED else text
    with local_directory(where) as path:  # a fetched copy lives until the model is built
        ckpt = load_checkpoint(path, device=device)
        if get_spec(ckpt.model_name).task == "classification":
            return Classifier(ckpt, text, tta)
        return Generator(ckpt, text)
