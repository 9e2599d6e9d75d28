"""Real CIFAR-10 images from the shared archive: the headline data checks of the foundation."""

from __future__ import annotations

import pytest

from mve.config import load_train_config
from mve.data import load_data
from mve.train import fit


@pytest.fixture(scope="module")
def full(shared_archive):
    return load_data(shared_archive, progress=False)


def test_shared_archive_splits_45000_5000(full):
    assert len(full.class_names) == 10
    assert full.class_names[0] == "airplane" and full.class_names[-1] == "truck"
    assert len(full.train) == 45_000 and len(full.val) == 5_000 and full.test is None
    assert full.val.class_counts(10) == [500] * 10
    assert full.image_size == (32, 32)
    # CIFAR-10's well-known channel statistics (JPEG re-encoding moves them slightly)
    for got, ref in zip(full.mean, (0.4914, 0.4822, 0.4465), strict=True):
        assert got == pytest.approx(ref, abs=0.01)
    for got, ref in zip(full.std, (0.2470, 0.2435, 0.2616), strict=True):
        assert got == pytest.approx(ref, abs=0.01)


def test_two_epochs_on_3000_images_clearly_beat_chance(shared_archive, full):
    cfg = load_train_config("classifier", overrides=[
        "epochs=2", "data.limit=3000", "data.val_size=1000", "eval_batch_size=500"])
    data = load_data(shared_archive, val_size=1000, limit=3000)  # served from the cache
    assert len(data.train) == 3000 and data.val.class_counts(10) == [100] * 10
    result = fit(cfg, data, progress=False)
    acc = result.history[-1]["val_accuracy"]
    # chance is 0.10; with 1,000 validation images its std is ~0.01, so 0.22 is far above it
    assert acc > 0.22, f"validation accuracy {acc:.3f} after 2 epochs (chance is 0.10)"


def test_the_default_recipe_learns_in_one_epoch_on_3000_images(shared_archive):
    """`mve train classifier --epochs 1 --limit 3000` without a preset: the fast recipe, its
    batch fitted to the small split (min_steps_per_epoch), well above the old default's 13%."""
    cfg = load_train_config("classifier", extra={"epochs": 1, "data": {"limit": 3000}})
    assert cfg.preset == "fast" and cfg.batch_size == 1024
    data = load_data(shared_archive, limit=3000)  # the 5,000-image validation split
    assert cfg.fitted_to(len(data.train)).batch_size == 3000 // cfg.min_steps_per_epoch
    result = fit(cfg, data, progress=False)
    acc = result.history[-1]["val_accuracy"]
    assert acc >= 0.30, f"validation accuracy {acc:.3f} after one epoch on 3,000 images"
