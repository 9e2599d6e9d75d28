"""Unit tests of mve.data's splits: the seeded, stratified hold-out, ``limit``, the showcase
that reports draw, and the normalisation statistics (sources and the cache: test_data.py)."""

from __future__ import annotations

import json

import numpy as np
import torch

from mve.data import RawDataset, Split, channel_stats, make_splits, showcase


def _synthetic(sizes: list[int], n_test: int = 0, *, by_class: bool = False) -> RawDataset:
    """A RawDataset whose pixel [0, 0, 0:2] encodes the image index (to track identity);
    ``by_class``: sorted by class, as an image folder is."""
    labels = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
    if not by_class:
        labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]
    n = len(labels) + n_test
    labels = torch.cat([labels, torch.arange(n_test) % len(sizes)])
    images = torch.randint(0, 256, (n, 3, 4, 4), generator=torch.Generator().manual_seed(4),
                           dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = torch.arange(n) % 256, torch.arange(n) // 256
    is_test = torch.arange(n) >= n - n_test
    return RawDataset("image-folder", None, images, labels, is_test,
                      tuple(f"c{i}" for i in range(len(sizes))), "/fake", "0" * 64, False)


def _ids(split: Split | None) -> set[int]:
    if split is None:
        return set()
    return set((split.images[:, 0, 0, 0].long() + 256 * split.images[:, 0, 0, 1].long()).tolist())


def test_splits_deterministic_stratified_disjoint() -> None:
    raw = _synthetic([100, 80, 120, 90, 60], n_test=25)
    a, b = make_splits(raw, val_size=50, seed=7), make_splits(raw, val_size=50, seed=7)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert a.val.class_counts(5) == [10] * 5
    assert a.train.class_counts(5) == [90, 70, 110, 80, 50]
    assert not _ids(a.train) & _ids(a.val) and len(_ids(a.train) | _ids(a.val)) == 450
    assert _ids(a.test) == set(range(450, 475)) and not (_ids(a.train) | _ids(a.val)) & _ids(a.test)
    other = make_splits(raw, val_size=50, seed=8)
    assert _ids(other.val) != _ids(a.val)
    prov = json.loads(json.dumps(a.provenance))
    assert prov["counts"] == {"train": 400, "val": 50, "test": 25}
    assert (prov["split_seed"], prov["val_size"], prov["image_size"]) == (7, 50, [4, 4])
    remainder = make_splits(raw, val_size=13, seed=0)
    assert remainder.val.class_counts(5) == [3, 3, 3, 2, 2]


def test_limit_independent_and_stratified() -> None:
    raw = _synthetic([100, 80, 120, 90, 60])
    full = make_splits(raw, val_size=50, seed=1)
    for limit in (37, 200):
        lim = make_splits(raw, val_size=50, seed=1, limit=limit)
        assert torch.equal(lim.val.images, full.val.images)
        assert len(lim.train) == limit and _ids(lim.train) <= _ids(full.train)
        counts = lim.train.class_counts(5)
        for c, n in enumerate([90, 70, 110, 80, 50]):
            assert abs(counts[c] - limit * n / 400) < 1
        assert torch.equal(make_splits(raw, val_size=50, seed=1, limit=limit).train.images,
                           lim.train.images)
    assert len(make_splits(raw, val_size=50, limit=10_000).train) == 400


def test_showcase_covers_every_class_in_every_prefix() -> None:
    """The images reports draw and score as "the validation images": the splits keep a
    class-sorted source's order, so the old ``val.images[:k]`` were all of the first classes."""
    raw = _synthetic([100, 80, 120, 90, 60], by_class=True)
    bundle = make_splits(raw, val_size=50, seed=3)
    assert bundle.val.labels[:10].tolist() == [0] * 10  # the order the showcase must not keep
    shown = showcase(bundle.val, 20, 5, seed=0)
    assert shown.labels[:5].sort().values.tolist() == [0, 1, 2, 3, 4]
    assert shown.class_counts(5) == [4] * 5 and _ids(shown) <= _ids(bundle.val)
    assert torch.equal(shown.images, showcase(bundle.val, 20, 5, seed=0).images)
    assert _ids(showcase(bundle.val, 20, 5, seed=1)) != _ids(shown)
    everything = showcase(bundle.val, 500, 5)
    assert _ids(everything) == _ids(bundle.val) and everything.labels[:5].tolist() == [0, 1, 2, 3, 4]
    drawn = bundle.showcase_images(10)
    assert len(drawn) == 10 and _ids(Split(drawn, drawn.new_zeros(10))) <= _ids(bundle.val)
    assert make_splits(raw, val_size=0).showcase_images() is None


def test_normalisation_stats_match_direct() -> None:
    raw = _synthetic([30, 30, 30], n_test=10)
    bundle = make_splits(raw, val_size=9, seed=0, limit=50)
    x = bundle.train.images.numpy().astype(np.float64) / 255
    assert np.allclose(bundle.mean, x.mean(axis=(0, 2, 3)), atol=1e-12)
    assert np.allclose(bundle.std, x.std(axis=(0, 2, 3)), atol=1e-12)
    assert all(isinstance(v, float) for v in bundle.mean + bundle.std)
    mean, std = channel_stats(bundle.train.images, chunk=7)
    assert np.allclose(mean, bundle.mean) and np.allclose(std, bundle.std)
