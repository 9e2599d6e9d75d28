"""Dataset sources: detect what a path holds and decode it into uint8 tensors.

Supported sources (:data:`SOURCE_KINDS`): the official CIFAR-10 python release
(``cifar-10-batches-py``), the CIFAR-10 binary release (``cifar-10-batches-bin``) and image-folder
trees (``<root>/<class>/<image>`` or ``<root>/{train,test}/<class>/<image>``), each as a directory
or as a ``.tar.gz``/``.tgz``/``.tar``/``.zip`` archive. Archives are streamed in memory, never
extracted; CIFAR pickles are read with an unpickler that only reconstructs numpy arrays.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import posixpath
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mve.data import cache as _cache
from mve.data.archives import archive_type, iter_archive
from mve.data.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["DataError", "IMAGE_EXTENSIONS", "RawDataset", "SOURCE_KINDS", "detect_source",
           "load_source"]

SOURCE_KINDS = ("cifar10-python", "cifar10-binary", "image-folder")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
_CIFAR = {  # kind -> (conventional folder, meta file, train batch files, test batch file)
    "cifar10-python": ("cifar-10-batches-py", "batches.meta",
                       tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch"),
    "cifar10-binary": ("cifar-10-batches-bin", "batches.meta.txt",
                       tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin"),
}
_EXPECTED = ("a CIFAR-10 python release (cifar-10-batches-py), a CIFAR-10 binary release "
             "(cifar-10-batches-bin) or an image-folder tree <root>/<class>/<image> or "
             "<root>/{train,test}/<class>/<image> with " + "/".join(sorted(IMAGE_EXTENSIONS))
             + " images, as a directory or a .tar.gz/.tgz/.tar/.zip archive")


@dataclass(frozen=True, eq=False)
class RawDataset:
    """Every image of a source, decoded, with labels and the source's own test-split flags."""

    kind: str
    archive: str | None
    images: torch.Tensor
    labels: torch.Tensor
    is_test: torch.Tensor
    class_names: tuple[str, ...]
    source: str
    sha256: str
    from_cache: bool


@dataclass(frozen=True)
class _Layout:
    kind: str
    archive: str | None
    root: str  # posix prefix of the dataset inside the listing: "", "a/" or "a/b/"
    members: tuple[tuple[str, int, bool], ...] = ()  # image-folder: (name, label, is_test)
    class_names: tuple[str, ...] = ()

    def files(self) -> list[str]:
        """Names (relative to the source path) of the files this layout reads."""
        if self.kind == "image-folder":
            return [name for name, _, _ in self.members]
        _, meta, data, test = _CIFAR[self.kind]
        return [self.root + f for f in (meta, *data, test)]


# ----------------------------------------------------------------------------- reading files
def _list_dir(path: Path) -> dict[str, os.stat_result]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        for f in filenames:
            if not f.startswith("."):
                full = os.path.join(dirpath, f)
                out[Path(os.path.relpath(full, path)).as_posix()] = os.stat(full)
    return out


# ----------------------------------------------------------------------------- detection
def _image_folder(names: list[str], root: str) -> tuple[tuple, tuple] | None:
    """Interpret the image files under ``root`` as an image-folder tree, or return None."""
    rel = [n[len(root):] for n in names
           if n.startswith(root) and posixpath.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    parts = [r.split("/") for r in rel]
    if not parts:
        return None
    if all(len(p) == 3 and p[0] in ("train", "test") for p in parts):
        entries = sorted((p[0] == "test", p[1], r) for p, r in zip(parts, rel, strict=True))
        train = {c for t, c, _ in entries if not t}
        test = {c for t, c, _ in entries if t}
        if train and test and train != test:
            raise DataError(f"train/ and test/ class folders disagree under '{root}': only in "
                            f"train: {sorted(train - test)}, only in test: {sorted(test - train)}")
    elif all(len(p) == 2 for p in parts):
        entries = sorted((False, p[0], r) for p, r in zip(parts, rel, strict=True))
    else:
        return None
    classes = tuple(sorted({c for _, c, _ in entries}))
    index = {c: i for i, c in enumerate(classes)}
    return tuple((root + r, index[c], t) for t, c, r in entries), classes


def _find_layout(names: list[str], where: Path, archive: str | None) -> _Layout:
    """Find the dataset in a listing of file names, tolerating one wrapping top folder."""
    nameset = set(names)
    roots = [""]
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        roots.append(tops.pop() + "/")
    for root in roots:
        for kind, (folder, meta, data, test) in _CIFAR.items():
            for base in (root, root + folder + "/"):
                if base + meta in nameset:
                    missing = [f for f in (*data, test) if base + f not in nameset]
                    if missing:
                        raise DataError(f"incomplete {kind} release in {where} at '{base}': "
                                        f"missing {', '.join(missing)}")
                    return _Layout(kind, archive, base)
        found = _image_folder(names, root)
        if found is not None:
            return _Layout("image-folder", archive, root, *found)
    raise DataError(f"no supported dataset found in {where}: expected {_EXPECTED}")


def _check_path(path: str | os.PathLike) -> tuple[Path, str | None]:
    p = Path(os.path.abspath(Path(path).expanduser()))
    if not p.exists():
        raise DataError(f"data path {p} does not exist; expected {_EXPECTED}")
    if p.is_dir():
        return p, None
    archive = archive_type(p)
    if archive is None:
        raise DataError(f"data path {p} is a file but not a .tar.gz/.tgz/.tar/.zip archive; "
                        f"expected {_EXPECTED}")
    return p, archive


def _locate(p: Path, archive: str | None) -> tuple[_Layout, dict[str, os.stat_result] | None]:
    if archive is None:
        stats = _list_dir(p)
        return _find_layout(sorted(stats), p, None), stats
    return _find_layout([n for n, _ in iter_archive(p, archive)], p, archive), None


def detect_source(path: str | os.PathLike) -> tuple[str, str | None]:
    """Return ``(kind, archive)`` of a data path without decoding any image.

    Raises:
        DataError: the path is missing, unreadable or holds no supported dataset.
    """
    layout, _ = _locate(*_check_path(path))
    return layout.kind, layout.archive


# ----------------------------------------------------------------------------- decoding
class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays (all a CIFAR-10 python batch holds)."""

    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise DataError(f"refusing to unpickle {module}.{name}: a CIFAR-10 batch only holds "
                            "numpy arrays, lists, bytes and numbers")
        if name == "_reconstruct":  # resolve without importing the deprecated numpy.core alias
            return np.ndarray.__reduce__(np.empty(0, np.uint8))[0]
        return super().find_class(module, name)


def _unpickle(data: bytes, name: str) -> dict:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DataError as e:
        raise DataError(f"{name}: {e}") from None
    except Exception as e:  # any malformed pickle
        raise DataError(f"cannot unpickle CIFAR-10 batch {name}: {e}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{name}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _resize(img: Image.Image, size: int | None) -> Image.Image:
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return img


def _cifar_batch(kind: str, blob: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    if kind == "cifar10-binary":
        if len(blob) % 3073:
            raise DataError(f"{name}: size {len(blob)} is not a multiple of 3073-byte records")
        rec = np.frombuffer(blob, np.uint8).reshape(-1, 3073)
        return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)
    d = _unpickle(blob, name)
    arr, labels = d.get(b"data"), d.get(b"labels")
    if not (isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.shape[1:] == (3072,)
            and isinstance(labels, list) and len(labels) == len(arr)):
        raise DataError(f"{name}: not a CIFAR-10 batch (need b'data' uint8 [N,3072] and "
                        "b'labels', a list of N ints)")
    return arr.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _decode_cifar(p: Path, layout: _Layout, size: int | None):
    folder, meta, data, test = _CIFAR[layout.kind]
    blobs = {n: read() for n, read in _iter_files(p, layout)}
    parts = [(*_cifar_batch(layout.kind, blobs[layout.root + f], f"{p}:{layout.root}{f}"),
              f == test) for f in (*data, test)]
    meta_name = f"{p}:{layout.root}{meta}"
    if layout.kind == "cifar10-python":
        names = _unpickle(blobs[layout.root + meta], meta_name).get(b"label_names")
        if not isinstance(names, list) or not names:
            raise DataError(f"{meta_name}: no b'label_names' list")
        classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    else:
        text = blobs[layout.root + meta].decode("utf-8", errors="replace")
        classes = tuple(line.strip() for line in text.splitlines() if line.strip())
    images = np.concatenate([a for a, _, _ in parts])
    labels = np.concatenate([lab for _, lab, _ in parts])
    is_test = np.concatenate([np.full(len(lab), t) for _, lab, t in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{p}: labels outside 0..{len(classes) - 1} ({len(classes)} classes)")
    if size is not None and size != 32:
        images = np.stack([np.asarray(_resize(Image.fromarray(im.transpose(1, 2, 0)), size))
                           .transpose(2, 0, 1) for im in images])
    return images, labels, is_test, classes


def _iter_files(p: Path, layout: _Layout) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """Yield ``(name, read)`` for the files of ``layout`` (archives: in archive order)."""
    wanted = set(layout.files())
    if layout.archive is None:
        for name in sorted(wanted):
            yield name, (p / name).read_bytes
    else:
        yield from ((n, r) for n, r in iter_archive(p, layout.archive) if n in wanted)


def _decode_image(data: bytes, name: str, size: int | None) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(_resize(im.convert("RGB"), size))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e


def _decode(p: Path, layout: _Layout, size: int | None, progress: bool):
    """Decode every image of ``layout``: (uint8 [N,3,H,W], labels, is_test, class names)."""
    if layout.kind != "image-folder":
        return _decode_cifar(p, layout, size)
    from tqdm import tqdm

    index = {name: i for i, (name, _, _) in enumerate(layout.members)}
    out: np.ndarray | None = None
    done = np.zeros(len(index), dtype=bool)
    first = ""
    with tqdm(total=len(index), desc=f"decoding {p.name}", unit="img", file=sys.stderr,
              disable=not progress) as bar:
        for name, read in _iter_files(p, layout):
            arr = _decode_image(read(), f"{p}:{name}", size)
            if out is None:
                out, first = np.empty((len(index), 3, *arr.shape[:2]), np.uint8), name
            elif arr.shape[:2] != out.shape[2:]:
                raise DataError(
                    f"{p}: image {name} is {arr.shape[1]}x{arr.shape[0]} but {first} is "
                    f"{out.shape[3]}x{out.shape[2]}; pass image_size to resize all images")
            out[index[name]] = arr.transpose(2, 0, 1)
            done[index[name]] = True
            bar.update(1)
    if out is None or not done.all():
        raise DataError(f"{p}: {int((~done).sum())} listed images vanished while decoding")
    labels = np.array([lab for _, lab, _ in layout.members], dtype=np.int64)
    is_test = np.array([t for _, _, t in layout.members], dtype=bool)
    return out, labels, is_test, layout.class_names


def _announce(p: Path, layout: _Layout, cache: Path | None) -> None:
    """One INFO line before a decode, on a terminal or not: the first use of a large source
    takes a while (25 s for CIFAR-10 as JPEGs on 2 cores) and a Ray worker shows no bar."""
    what = (f"{len(layout.members):,} images" if layout.kind == "image-folder"
            else f"the {layout.kind} release")
    where = f"first use; cached in {cache}" if cache is not None else "not cached"
    logger.info("decoding %s from %s (%s)", what, p, where)


def load_source(path: str | os.PathLike, *, image_size: int | None = None,
                cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                progress: bool = False) -> RawDataset:
    """Decode a data source into uint8 tensors, or serve it from the decoded cache.

    Args:
        path: directory or archive holding one of :data:`SOURCE_KINDS`.
        image_size: resize images to ``image_size`` x ``image_size`` (PIL bilinear); if None,
            all images must share the size of the first one.
        cache_dir: cache directory; default ``$MVE_CACHE_DIR`` or ``~/.cache/mve/datasets``.
        use_cache: read and fill the decoded cache.
        progress: show a tqdm progress bar on stderr while decoding.

    Raises:
        DataError: missing, unsupported, corrupt or inconsistent source.
    """
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool)
                                   or image_size <= 0):
        raise DataError(f"image_size must be a positive int or None, got {image_size!r}")
    p, archive = _check_path(path)
    layout: _Layout | None = None
    if archive is None:
        layout, stats = _locate(p, None)
        sha = _cache.sha256_listing((n, stats[n].st_size, stats[n].st_mtime_ns)
                                    for n in layout.files())
    else:
        sha = _cache.sha256_file(p)

    cache = _cache.resolve_cache_dir(cache_dir) if use_cache else None

    def decode() -> tuple[dict[str, torch.Tensor], dict]:
        # Only on a cache miss (under the cache's lock: of several processes, such as Ray
        # workers or Tune trials, the one that decodes says so; the others then read the cache)
        t0 = time.perf_counter()
        lay = layout if layout is not None else _locate(p, archive)[0]
        _announce(p, lay, cache)
        images, labels, is_test, classes = _decode(p, lay, image_size, progress)
        logger.info("decoded %s images from %s in %.1f s", f"{len(images):,}", p.name,
                    time.perf_counter() - t0)
        tensors = {"images": torch.from_numpy(np.ascontiguousarray(images)),
                   "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
                   "is_test": torch.from_numpy(is_test.astype(np.uint8))}
        return tensors, {"kind": lay.kind, "archive": lay.archive, "class_names": list(classes)}

    if cache is not None:
        tensors, info, hit = _cache.get_or_fill(cache, source=str(p), sha256=sha,
                                                image_size=image_size, fill=decode)
    else:
        (tensors, info), hit = decode(), False
    return RawDataset(kind=info["kind"], archive=info["archive"], images=tensors["images"],
                      labels=tensors["labels"], is_test=tensors["is_test"].bool(),
                      class_names=tuple(info["class_names"]), source=str(p), sha256=sha,
                      from_cache=hit)
