"""In-memory tensor batch iterator: seeded shuffling, rank sharding, on-device augmentation.

Batches are gathered by indexing the uint8 split tensor (no per-image Python, no worker
processes), moved to the device, augmented there and normalised to float.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import torch

from mve.data.splits import Split
from mve.data.transforms import AugmentConfig, augment_batch, normalize

__all__ = ["TensorLoader"]

_PRELOAD_MAX_BYTES = 4 << 30


def _derive_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts``, identical across runs and machines."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class TensorLoader:
    """Iterates (x, y) batches from in-memory uint8 tensors: per epoch a seeded permutation, sharded by rank, augmented and normalised in batch on `device`.

    Every rank draws the same permutation for an epoch (from ``seed`` and the epoch), pads it by
    repeating from its start to a multiple of ``world_size`` (or truncates it when
    ``drop_last``), and takes ``perm[rank::world_size]``, like ``DistributedSampler``.
    Augmentation is seeded per ``(seed, epoch, rank)``.

    Args:
        split: the images and labels to iterate.
        batch_size: samples per batch.
        mean: per-channel mean in [0, 1] units, for normalisation.
        std: per-channel std in [0, 1] units.
        shuffle: draw a new seeded permutation each epoch; otherwise natural order.
        drop_last: truncate the index list to a multiple of ``world_size`` instead of padding,
            and drop the final incomplete batch.
        augment: augmentation settings, or None for none (evaluation).
        seed: base seed for shuffling and augmentation.
        rank: this process's shard index.
        world_size: number of shards.
        device: where batches are produced.
        dtype: floating dtype of the yielded images.
        preload: copy the whole uint8 split to ``device`` once (default: when ``device`` is not
            the CPU and the split is at most 4 GiB).
    """

    def __init__(self, split: Split, *, batch_size: int, mean: Sequence[float],
                 std: Sequence[float], shuffle: bool = False, drop_last: bool = False,
                 augment: AugmentConfig | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, preload: bool | None = None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating, got {dtype}")
        self.split = split
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.seed, self.rank, self.world_size = augment, seed, rank, world_size
        self.device, self.dtype = torch.device(device), dtype
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.epoch = 0
        if preload is None:
            preload = (self.device.type != "cpu"
                       and split.images.numel() * split.images.element_size()
                       <= _PRELOAD_MAX_BYTES)
        self._images = split.images.to(self.device) if preload else split.images
        self._labels = split.labels.to(self.device) if preload else split.labels
        self._base_flip: torch.Tensor | None = None
        if augment is not None and augment.alternating_flip:
            gen = torch.Generator().manual_seed(_derive_seed("altflip", seed))
            self._base_flip = torch.rand(len(split), generator=gen) < 0.5

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; shuffling and augmentation are a function of (seed, epoch)."""
        self.epoch = int(epoch)

    def _shard_size(self) -> int:
        n = len(self.split)
        return n // self.world_size if self.drop_last else math.ceil(n / self.world_size)

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        per_rank = self._shard_size()
        if self.drop_last:
            return per_rank // self.batch_size
        return math.ceil(per_rank / self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        if self.drop_last:
            return len(self) * self.batch_size
        return self._shard_size()

    def indices(self) -> torch.Tensor:
        """Indices (into the split) this rank visits this epoch, in order."""
        n = len(self.split)
        if self.shuffle:
            gen = torch.Generator().manual_seed(_derive_seed("shuffle", self.seed, self.epoch))
            perm = torch.randperm(n, generator=gen)
        else:
            perm = torch.arange(n)
        total = self._shard_size() * self.world_size
        if total > n:
            perm = perm.repeat(math.ceil(total / n))
        return perm[:total][self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)``: x ``dtype`` ``[B, 3, H, W]`` normalised, y int64 ``[B]``."""
        idx = self.indices()
        gen = torch.Generator().manual_seed(
            _derive_seed("augment", self.seed, self.epoch, self.rank))
        flip_all = None
        if self._base_flip is not None:
            flip_all = self._base_flip ^ bool(self.epoch % 2)
        on_device = self._images.device == self.device
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            b = idx[start:start + self.batch_size]
            bi = b.to(self.device) if on_device else b
            x = self._images[bi].to(self.device, non_blocking=True)
            y = self._labels[bi].to(self.device, non_blocking=True)
            if self.augment is not None:
                flip = flip_all[b] if flip_all is not None else None
                x = augment_batch(x, self.augment, gen, flip_mask=flip)
            yield normalize(x, self.mean, self.std).to(self.dtype), y
