"""Data sources, decoded cache, splits, augmentation and in-memory batch loading for mve."""

from mve.data.cache import CACHE_FORMAT_VERSION, resolve_cache_dir
from mve.data.loader import TensorLoader
from mve.data.sources import (
    IMAGE_EXTENSIONS,
    SOURCE_KINDS,
    DataError,
    RawDataset,
    detect_source,
    load_source,
)
from mve.data.splits import (
    DataBundle,
    Split,
    channel_stats,
    load_data,
    make_splits,
    resolve_data_path,
    showcase,
    stratified_subset,
)
from mve.data.transforms import (
    AugmentConfig,
    augment_batch,
    cutout,
    denormalize_to_uint8,
    normalize,
    random_crop,
    random_flip,
)

__all__ = [
    "CACHE_FORMAT_VERSION",
    "IMAGE_EXTENSIONS",
    "SOURCE_KINDS",
    "AugmentConfig",
    "DataBundle",
    "DataError",
    "RawDataset",
    "Split",
    "TensorLoader",
    "showcase",
    "stratified_subset",
    "augment_batch",
    "channel_stats",
    "cutout",
    "denormalize_to_uint8",
    "detect_source",
    "load_data",
    "load_source",
    "make_splits",
    "normalize",
    "random_crop",
    "random_flip",
    "resolve_cache_dir",
    "resolve_data_path",
]
