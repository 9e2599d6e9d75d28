"""Small generated image-folder archives for the Ray integration tests."""

from __future__ import annotations

import tarfile
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


def colour_archive(root: Path, *, classes: int = 3, per_class: int = 40, seed: int = 0) -> Path:
    """A tar.gz of ``train/c<k>/<i>.png`` (32x32) whose mean brightness tells the class."""
    rng = np.random.default_rng(seed)
    out = root / "d.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        for k in range(classes):
            d = root / "train" / f"c{k}"
            d.mkdir(parents=True)
            for i in range(per_class):
                px = np.clip(rng.normal(50 + 70 * k, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{i}.png")
        tar.add(root / "train", arcname="train")
    return out
