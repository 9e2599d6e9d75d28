"""The shipped models/cifar10-classifier: small enough, under 1M parameters, at least 90%, and
it reproduces its recorded validation accuracy on the shared data (slow: 5,000 images x 6 TTA
views on the CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mve.checkpoint import load_checkpoint
from mve.data import TensorLoader, load_data
from mve.pretrained import repo_root
from mve.train import evaluate

ARCHIVE = Path(os.environ.get("MVE_TEST_ARCHIVE",
                              repo_root().parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"))
SHIPPED = repo_root() / "models" / "cifar10-classifier"


def test_shipped_classifier_is_small_and_records_its_accuracy():
    ckpt = load_checkpoint(SHIPPED)
    assert sum(p.numel() for p in ckpt.model.parameters()) <= 1_000_000
    size = sum(f.stat().st_size for f in SHIPPED.iterdir() if f.is_file())
    assert size <= 5_000_000, size
    assert ckpt.metrics["val_accuracy"] >= 0.90
    for name in ("REPORT.md", "confusion_matrix.png", "learning_curves.png"):
        assert (SHIPPED / name).is_file(), name
    report = (SHIPPED / "REPORT.md").read_text()
    assert "mve train classifier" in report and "| cat" in report


@pytest.mark.slow
@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"CIFAR-10 archive {ARCHIVE} is absent")
def test_shipped_classifier_reproduces_its_recorded_accuracy():
    ckpt = load_checkpoint(SHIPPED)
    recorded = ckpt.metrics["val_accuracy"]
    prov = ckpt.meta.get("provenance") or {}
    data = load_data(ARCHIVE, val_size=int(prov.get("val_size", 5000)),
                     seed=int(prov.get("split_seed", 0)))
    prep = ckpt.preprocessing
    loader = TensorLoader(data.val, batch_size=500, mean=prep["mean"], std=prep["std"])
    m = evaluate(ckpt.model, loader, task="classification", device=torch.device("cpu"),
                 class_names=ckpt.class_names)
    assert m["num_samples"] == len(data.val) == 5000
    assert abs(m["accuracy"] - recorded) <= 0.005, (m["accuracy"], recorded)
