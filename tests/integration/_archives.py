"""Small generated image-folder archives for the Ray integration tests."""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# A one-parameter search over tiny models, for tests of where and how trials run.
TINY_SPACE = """
optim.lr: {loguniform: [1.0e-3, 1.0e-1]}
fixed:
  model.num_classes: 3
  model.cnn_layers: 3
  model.final_channels: 16
  model.fcn_layers: 2
  batch_size: 20
"""


def colour_archive(root: Path, *, classes: int = 3, per_class: int = 40, seed: int = 0,
                   colour=None, noise: float = 30.0, class_dir: str = "c{k}",
                   image_name: str = "{i}.png", name: str = "d.tar.gz",
                   names: Sequence[str] | None = None) -> Path:
    """A tar.gz of ``train/<class_dir>/<image_name>`` (32x32 PNGs) whose colour tells the class:
    pixels ~ N(colour(k), noise) per channel; ``colour`` defaults to a brightness ramp."""
    rng = np.random.default_rng(seed)
    classes = classes if names is None else len(names)
    root.mkdir(parents=True, exist_ok=True)
    out = root / name
    with tarfile.open(out, "w:gz") as tar:
        for k in range(classes):
            d = root / "train" / (class_dir.format(k=k) if names is None else names[k])
            d.mkdir(parents=True)
            mean = 50 + 70 * k if colour is None else np.asarray(colour(k), dtype=float)
            for i in range(per_class):
                px = np.clip(rng.normal(mean, noise, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / image_name.format(i=i))
        tar.add(root / "train", arcname="train")
    return out


def rgb_ramp(k: int) -> list[float]:
    """A class colour that changes in two channels at once (classes far apart)."""
    return [40 + 60 * k, 200 - 50 * k, 120]
