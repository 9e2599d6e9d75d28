"""Train/val/test splits, normalisation statistics and the one-call :func:`load_data`.

Validation is a seeded, stratified hold-out of the source's train portion; ``limit`` then
subsamples the remaining training images (stratified), so the validation split never depends on
``limit``. The test split is whatever the source provides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mve.data.sources import DataError, RawDataset, load_source

__all__ = ["DataBundle", "Split", "channel_stats", "load_data", "make_splits",
           "resolve_data_path", "showcase", "stratified_subset"]

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True, eq=False)
class Split:
    """Images (uint8 ``[N, 3, H, W]``) and labels (int64 ``[N]``) of one split."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self, num_classes: int) -> list[int]:
        """Number of images per class, for classes ``0 .. num_classes - 1``."""
        return torch.bincount(self.labels, minlength=num_classes).tolist()


@dataclass(frozen=True, eq=False)
class DataBundle:
    """The splits of one source with class names, train statistics and provenance."""

    train: Split
    val: Split | None
    test: Split | None
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: tuple[int, int]
    provenance: dict = field(default_factory=dict)

    def split(self, name: str) -> Split:
        """Return split ``name`` ("train", "val" or "test").

        Raises:
            DataError: unknown name, or the split is absent or empty.
        """
        available = [n for n in SPLIT_NAMES if (s := getattr(self, n)) is not None and len(s)]
        if name not in SPLIT_NAMES:
            raise DataError(f"unknown split {name!r}; available splits: {available}")
        s = getattr(self, name)
        if s is None or len(s) == 0:
            raise DataError(f"the {name} split of {self.provenance.get('source', 'this data')} is "
                            f"{'absent' if s is None else 'empty'}; available splits: {available}")
        return s

    def showcase_images(self, limit: int = 32) -> torch.Tensor | None:
        """The validation images that reports and grids draw: :func:`showcase` of the split
        (every class in turn), or None when there is no validation split."""
        if self.val is None or len(self.val) == 0:
            return None
        return showcase(self.val, limit, len(self.class_names)).images


def channel_stats(images: torch.Tensor, chunk: int = 2048) -> tuple[tuple[float, ...],
                                                                    tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 ``[N, C, H, W]`` images in [0, 1] units.

    Sums are exact int64 accumulations over chunks, so no float copy of the data is made.
    """
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.int64)
    squares = torch.zeros(c, dtype=torch.int64)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].to(torch.int64)
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    count = images.numel() // c
    if count == 0:
        raise DataError("cannot compute normalisation statistics of an empty split")
    mean = total.double() / count
    var = (squares.double() / count - mean * mean).clamp_min(0)
    return (tuple(float(m) / 255 for m in mean), tuple(float(s) / 255 for s in var.sqrt()))


def _quotas(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` over classes proportionally to ``sizes`` (largest remainder, ties to
    the lower class index)."""
    n = sum(sizes)
    exact = [total * s / n for s in sizes]
    q = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - q[i]), i))
    for i in order[: total - sum(q)]:
        q[i] += 1
    return q


def stratified_subset(split: Split, limit: int, num_classes: int, *, seed: int = 0) -> Split:
    """At most ``limit`` images of ``split``, each class in proportion to its share (the same
    largest-remainder quotas as ``limit`` in :func:`make_splits`), seeded, in original order."""
    if limit >= len(split):
        return split
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=gen)
    labels = split.labels[order]
    keep = _quotas(limit, split.class_counts(num_classes))
    idx = torch.cat([order[labels == k][:n] for k, n in enumerate(keep)]).sort().values
    return Split(split.images[idx], split.labels[idx])


def showcase(split: Split, limit: int, num_classes: int, *, seed: int = 0) -> Split:
    """A stratified, seeded sample of ``split`` (as :func:`stratified_subset`) ordered class by
    class in turn, so that every prefix covers the classes: the images drawn in reports and
    grids, and the ones scored as "the validation images". Splits keep the source's order,
    and a class-sorted image folder's first images are all of its first class."""
    part = stratified_subset(split, limit, num_classes, seed=seed)
    labels = part.labels
    # rank of each image within its class, then class: 0th of every class, 1st of every class...
    rank = torch.zeros_like(labels)
    for k in range(num_classes):
        mask = labels == k
        rank[mask] = torch.arange(int(mask.sum()))
    order = torch.argsort(rank * num_classes + labels, stable=True)
    return Split(part.images[order], labels[order])


def _hold_out(raw: RawDataset, pool: torch.Tensor, val_size: int,
              seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per class, ``pool``'s indices shuffled by ``seed`` and cut into (validation, rest);
    ``val_size`` spread equally over classes, the remainder to the first classes."""
    num_classes = len(raw.class_names)
    gen = torch.Generator().manual_seed(seed)
    hold = bool(len(pool) and val_size)
    base, extra = divmod(val_size, num_classes)
    val_parts, rest_parts = [], []
    for c in range(num_classes):
        idx = pool[raw.labels[pool] == c]  # ascending original order
        want = base + (c < extra) if hold else 0
        if hold and len(idx) <= want:
            raise DataError(
                f"class {raw.class_names[c]!r} has {len(idx)} training images, too few to hold "
                f"out {want} for validation (val_size={val_size} over {num_classes} classes); "
                "lower val_size")
        perm = idx[torch.randperm(len(idx), generator=gen)]
        if hold:
            val_parts.append(perm[:want])
        rest_parts.append(perm[want:])
    return val_parts, rest_parts


def make_splits(raw: RawDataset, *, val_size: int = 5000, seed: int = 0,
                limit: int | None = None) -> DataBundle:
    """Split a decoded source into train/val/test and compute train statistics.

    Args:
        raw: the decoded source.
        val_size: validation images held out of the source's train portion, spread equally over
            classes (the remainder goes to the first classes); 0 disables validation.
        seed: split seed.
        limit: keep at most this many training images (stratified), after holding out val.

    Raises:
        DataError: bad arguments, or a class has too few training images for its val share.
    """
    if val_size < 0 or (limit is not None and limit < 0):
        raise DataError(f"val_size and limit must be >= 0, got {val_size} and {limit}")
    is_test = raw.is_test.bool()
    val_parts, rest_parts = _hold_out(raw, torch.nonzero(~is_test).flatten(), val_size, seed)
    if limit is not None and limit < sum(len(r) for r in rest_parts):
        keep = _quotas(limit, [len(r) for r in rest_parts])
        rest_parts = [r[:k] for r, k in zip(rest_parts, keep, strict=True)]

    def take(parts: list[torch.Tensor]) -> Split:
        idx = torch.sort(torch.cat(parts)).values if parts else torch.zeros(0, dtype=torch.long)
        return Split(raw.images[idx], raw.labels[idx])

    train = take(rest_parts)
    val = take(val_parts) if val_parts else None
    test_idx = torch.nonzero(is_test).flatten()
    test = Split(raw.images[test_idx], raw.labels[test_idx]) if len(test_idx) else None
    stats_split = next((s for s in (train, val, test) if s is not None and len(s)), None)
    if stats_split is None:
        raise DataError(f"{raw.source} holds no images")
    mean, std = channel_stats(stats_split.images)
    size = (int(raw.images.shape[2]), int(raw.images.shape[3]))
    splits = dict(zip(SPLIT_NAMES, (train, val, test), strict=True))
    provenance = {
        "source": raw.source, "kind": raw.kind, "archive": raw.archive, "sha256": raw.sha256,
        "split_seed": seed, "val_size": val_size, "limit": limit, "image_size": list(size),
        "class_names": list(raw.class_names),
        "counts": {n: (len(s) if s is not None else 0) for n, s in splits.items()},
        "stats_split": next(n for n, s in splits.items() if s is stats_split),
    }
    return DataBundle(train=train, val=val, test=test, class_names=raw.class_names,
                      mean=mean, std=std, image_size=size, provenance=provenance)


def load_data(path: str | os.PathLike, *, val_size: int = 5000, seed: int = 0,
              limit: int | None = None, image_size: int | None = None,
              cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
              progress: bool = False) -> DataBundle:
    """Load a source (see :func:`~mve.data.sources.load_source`) and split it (see
    :func:`make_splits`)."""
    raw = load_source(path, image_size=image_size, cache_dir=cache_dir, use_cache=use_cache,
                      progress=progress)
    return make_splits(raw, val_size=val_size, seed=seed, limit=limit)


_HOW_TO = ("point mve at data in one of three ways: pass --data PATH (DATA=PATH with make), set "
           "$MVE_DATA, or let mve download the official CIFAR-10 python release into "
           "~/.cache/mve/cifar-10-batches-py (needs internet; or place the extracted "
           "cifar-10-batches-py folder there yourself)")


def resolve_data_path(cli_value: str | os.PathLike | None, *, download: bool = True) -> Path:
    """Find the data path: ``cli_value``, else ``$MVE_DATA``, else CIFAR-10 in the user cache.

    The last option downloads the official CIFAR-10 python release through torchvision into
    ``~/.cache/mve`` when it is not there yet and ``download`` is true.

    Raises:
        DataError: a given path does not exist, or no data is available (explains the options).
    """
    for value, origin in ((cli_value, "--data"), (os.environ.get("MVE_DATA"), "$MVE_DATA")):
        if value is not None and str(value) != "":
            p = Path(value).expanduser()
            if not p.exists():
                raise DataError(f"data path {p} (from {origin}) does not exist; {_HOW_TO}")
            return p.absolute()
    root = Path.home() / ".cache" / "mve"
    target = root / "cifar-10-batches-py"
    if (target / "batches.meta").is_file():
        return target
    if not download:
        raise DataError(f"no data given and {target} does not exist; {_HOW_TO}")
    try:
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive

        # Download + md5 check + extract only: CIFAR10(download=True) would also unpickle
        # the batches unrestricted; mve reads them with its restricted unpickler instead.
        download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename,
                                     md5=CIFAR10.tgz_md5)
    except Exception as e:  # offline, proxy, disk full, corrupt download ...
        raise DataError(f"no data given and downloading CIFAR-10 into {root} failed "
                        f"({type(e).__name__}: {e}); {_HOW_TO}") from e
    if not (target / "batches.meta").is_file():
        raise DataError(f"CIFAR-10 download did not produce {target}; {_HOW_TO}")
    return target
