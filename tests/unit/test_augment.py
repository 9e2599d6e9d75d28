"""Pixel transforms (normalise, flip, crop, cutout) and the tensor loader (sharding, epochs,
seeded augmentation) of mve.data, on synthetic tensors."""

from __future__ import annotations

import pytest
import torch

from mve.data import (
    AugmentConfig,
    Split,
    TensorLoader,
    augment_batch,
    cutout,
    denormalize_to_uint8,
    normalize,
    random_crop,
    random_flip,
)


# ----------------------------------------------------------------------------- transforms
def _batch(n: int = 16, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


def test_normalize_roundtrip() -> None:
    x, mean, std = _batch(), (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    y = normalize(x, mean, std)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y[:, 1], (x[:, 1].double() / 255 - 0.4).float() / 0.2, atol=1e-5)
    assert torch.equal(denormalize_to_uint8(y, mean, std), x)


def test_augment_identity_and_flip() -> None:
    x, g = _batch(), torch.Generator().manual_seed(0)
    cfg = AugmentConfig(crop_padding=0, flip=False)
    assert torch.equal(augment_batch(x, cfg, g), x)
    assert torch.equal(augment_batch(x.float(), cfg, g), x.float())
    mask = torch.arange(16) % 2 == 0
    out = augment_batch(x, cfg, g, flip_mask=mask)
    assert torch.equal(out[mask], x[mask].flip(-1)) and torch.equal(out[~mask], x[~mask])
    flipped = random_flip(x, torch.Generator().manual_seed(1))
    same = (flipped == x).flatten(1).all(1)
    assert torch.equal(flipped[~same], x[~same].flip(-1)) and 0 < int(same.sum()) < 16
    with pytest.raises(ValueError):
        AugmentConfig(pad_mode="wrap")
    with pytest.raises(ValueError):
        AugmentConfig(crop_padding=-1)


@pytest.mark.parametrize("pad_mode", ["reflect", "zeros"])
def test_random_crop_matches_padded_windows(pad_mode: str) -> None:
    x, p = _batch(32), 2
    out = random_crop(x, p, torch.Generator().manual_seed(3), pad_mode)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x.float(), (p, p, p, p),
                                     mode="reflect" if pad_mode == "reflect" else "constant")
    windows = padded.unfold(2, 8, 1).unfold(3, 8, 1)  # [B, C, 5, 5, 8, 8]
    hits = (windows == out.float()[:, :, None, None]).all(-1).all(-1).all(1)  # [B, 5, 5]
    assert hits.flatten(1).any(1).all()
    assert not hits[:, p, p].all()  # some images actually moved
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)


def test_cutout_zeroes_square() -> None:
    x = torch.full((64, 3, 8, 8), 7, dtype=torch.uint8)
    out = cutout(x, 4, torch.Generator().manual_seed(0))
    zeros = (out == 0).all(1).flatten(1).sum(1)
    assert zeros.max() == 16 and zeros.min() >= 4 and torch.equal(out[out != 0], x[out != 0])


# ----------------------------------------------------------------------------- loader
def _id_split(n: int) -> Split:
    """Labels equal the sample index, so batches reveal which samples they hold."""
    return Split(_batch(n, 4), torch.arange(n))


def test_loader_covers_every_sample_once() -> None:
    split = _id_split(23)
    loader = TensorLoader(split, batch_size=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    batches = list(loader)
    assert len(loader) == len(batches) == 5 and loader.num_samples == 23
    assert torch.cat([y for _, y in batches]).tolist() == list(range(23))
    x = torch.cat([x for x, _ in batches])
    assert x.dtype == torch.float32 and torch.equal(x, normalize(split.images, (0.5,) * 3,
                                                                 (0.25,) * 3))
    dropped = TensorLoader(split, batch_size=5, mean=(0,) * 3, std=(1,) * 3, drop_last=True)
    assert len(dropped) == 4 == len(list(dropped)) and dropped.num_samples == 20


def test_loader_sharding_and_epochs() -> None:
    split = _id_split(23)
    kw = {"batch_size": 4, "mean": (0,) * 3, "std": (1,) * 3, "shuffle": True, "seed": 5}
    ranks = [TensorLoader(split, rank=r, world_size=2, **kw) for r in range(2)]
    seen = [torch.cat([y for _, y in loader]).tolist() for loader in ranks]
    assert [len(s) for s in seen] == [12, 12] == [r.num_samples for r in ranks]
    assert set(seen[0]) | set(seen[1]) == set(range(23))
    assert len(set(seen[0]) & set(seen[1])) == 1  # the one padding repeat
    perm = torch.cat([y for _, y in TensorLoader(split, **kw)]).tolist()  # same epoch perm
    assert sorted(perm) == list(range(23)) and perm != list(range(23))
    assert seen == [(perm + perm[:1])[r::2] for r in range(2)]  # padded from the start, strided
    first = [y.tolist() for _, y in ranks[0]]
    ranks[0].set_epoch(1)
    assert [y.tolist() for _, y in ranks[0]] != first
    ranks[0].set_epoch(0)
    assert [y.tolist() for _, y in ranks[0]] == first
    strict = [TensorLoader(split, rank=r, world_size=2, drop_last=True, **kw) for r in range(2)]
    got = [torch.cat([y for _, y in loader]).tolist() for loader in strict]
    assert len(got[0]) == len(got[1]) == 8 and not set(got[0]) & set(got[1])


def test_loader_augmentation_seeded() -> None:
    split = _id_split(40)
    kw = {"batch_size": 16, "mean": (0,) * 3, "std": (1,) * 3,
          "augment": AugmentConfig(crop_padding=1, cutout=2), "seed": 3}
    a, b = TensorLoader(split, **kw), TensorLoader(split, **kw)
    xa, xb = torch.cat([x for x, _ in a]), torch.cat([x for x, _ in b])
    assert torch.equal(xa, xb) and not torch.equal(xa, normalize(split.images, (0,) * 3, (1,) * 3))
    b.set_epoch(1)
    assert not torch.equal(xa, torch.cat([x for x, _ in b]))


def test_alternating_flip_complements() -> None:
    split = _id_split(64)
    cfg = AugmentConfig(crop_padding=0, flip=True, alternating_flip=True)
    loader = TensorLoader(split, batch_size=10, mean=(0,) * 3, std=(1,) * 3, augment=cfg,
                          shuffle=True, seed=2)
    flips = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        order, xs = zip(*[(y, x) for x, y in loader], strict=True)
        x = torch.empty(64, 3, 4, 4)
        x[torch.cat(order)] = torch.cat(xs)
        orig = split.images.float() / 255
        flipped = torch.isclose(x, orig.flip(-1)).flatten(1).all(1)
        assert (flipped | torch.isclose(x, orig).flatten(1).all(1)).all()
        flips.append(flipped)
    assert 10 < int(flips[0].sum()) < 54
    assert torch.equal(flips[1], ~flips[0]) and torch.equal(flips[2], flips[0])
