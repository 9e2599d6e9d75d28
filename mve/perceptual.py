"""The frozen feature network behind the VAE's perceptual loss, built from a classifier checkpoint.

Models do no I/O: the trainer (``mve.train.fit``) calls :func:`perceptual_network` with the VAE
config's ``perceptual_classifier`` path and hands the result to ``VAE.set_perceptual``. The
network sees the classifier only through its public ``feature_maps``, so every classifier
architecture (``geometric``, ``convgroups``) works.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mve.checkpoint import load_checkpoint
from mve.config import ConfigError

__all__ = ["FeatureExtractor", "perceptual_network"]


class FeatureExtractor(nn.Module):
    """A frozen classifier seen through ``feature_maps``: images in VAE model space ``[-1, 1]``
    -> the classifier's first ``stages`` feature maps (all when ``None``).

    Inputs are mapped to the classifier's own normalisation (``mean``/``std`` of its checkpoint's
    preprocessing). It stays in eval mode, so BatchNorm keeps its running statistics and pooling
    is deterministic, and its weights take no gradient; gradients still flow to the input.
    """

    def __init__(self, classifier: nn.Module, mean: Sequence[float], std: Sequence[float],
                 stages: int | None = None) -> None:
        super().__init__()
        if not callable(getattr(classifier, "feature_maps", None)):
            raise TypeError(f"{type(classifier).__name__} has no feature_maps(x) method")
        self.classifier = classifier.requires_grad_(False)
        self.stages = stages
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Ignores ``mode``: a frozen network never enters training mode."""
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = ((x + 1.0) / 2.0 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.classifier.feature_maps(h, stages=self.stages)


def perceptual_network(path: str | os.PathLike, device: torch.device | str = "cpu", *,
                       stages: int | None = None) -> FeatureExtractor:
    """The classifier checkpoint at ``path`` as a frozen :class:`FeatureExtractor` on ``device``.

    Loaded with ``mve.checkpoint.load_checkpoint`` (hashes verified); ``stages`` is the VAE's
    ``perceptual_layers``. A checkpoint whose model has no ``feature_maps`` is a ConfigError.
    """
    # Building the model draws initial weights from the global RNG before the checkpoint's
    # weights replace them; fork it so loading a collaborator leaves the run's random stream as
    # it was.
    with torch.random.fork_rng(devices=[]):
        ckpt = load_checkpoint(path, device=device)
    if not callable(getattr(ckpt.model, "feature_maps", None)):
        raise ConfigError(f"perceptual_classifier {str(path)!r} is a {ckpt.model_name} "
                          "checkpoint without feature maps; name an mve classifier checkpoint")
    prep = ckpt.preprocessing
    return FeatureExtractor(ckpt.model, prep["mean"], prep["std"], stages).to(device)
