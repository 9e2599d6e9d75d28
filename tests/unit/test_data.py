"""Unit tests for mve.data: sources, the decoded cache and split errors (splits: test_splits.py;
transforms and the loader: test_augment.py)."""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_splits import _synthetic  # tests/unit/test_splits.py

from mve.data import (
    DataError,
    detect_source,
    load_data,
    load_source,
    make_splits,
    resolve_data_path,
)

CLASSES = tuple(f"class{c:02d}" for c in range(10))
PER_CLASS = 12
REAL_ARCHIVE = Path("/work/shared/data/cifar10-train-jpeg.tar.gz")


# ----------------------------------------------------------------------------- fake data
def _pixels(c: int, i: int, size: int = 32) -> np.ndarray:
    """Random-ish HWC uint8 image whose mean depends on the class."""
    rng = np.random.default_rng(1000 * c + i)
    return (rng.integers(0, 64, (size, size, 3)) + 16 * c).astype(np.uint8)


def _tree(root: Path, splits: tuple[str, ...], fmt: str = "png") -> dict[str, np.ndarray]:
    """Write an image-folder tree; ``splits`` = ("",) for flat class folders."""
    out = {}
    for s in splits:
        for c, name in enumerate(CLASSES):
            for i in range(PER_CLASS):
                rel = "/".join(p for p in (s, name, f"{i:03d}.{fmt}") if p)
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                arr = _pixels(c, i + 100 * (s == "test"))
                Image.fromarray(arr).save(root / rel, quality=95) if fmt == "jpg" else \
                    Image.fromarray(arr).save(root / rel)
                out[rel] = arr
    return out


def _archive(src: Path, out: Path, wrap: str | None = None) -> Path:
    """Archive the files under ``src`` into ``out`` (.tar.gz/.tgz/.tar/.zip), optionally wrapped."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    names = [(p, "/".join(x for x in (wrap, p.relative_to(src).as_posix()) if x)) for p in files]
    if out.suffix == ".zip":
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            for p, name in names:
                zf.write(p, name)
    else:
        with tarfile.open(out, "w:gz" if out.suffix in (".gz", ".tgz") else "w") as tf:
            for p, name in names:
                tf.add(p, name)
    return out


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pickle like Python 2 wrote the official CIFAR-10 batches: str/bytes as BINSTRING and
    numpy.core.multiarray._reconstruct as a plain GLOBAL."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _py2str(self, obj: str | bytes) -> None:
        b = obj.encode("latin1") if isinstance(obj, str) else obj
        self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    def save_global(self, obj: object, name: str | None = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = _py2str
    dispatch[type(np.dtype)] = save_global


def _cifar_python(folder: Path, py2: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    folder.mkdir(parents=True)

    def dump(obj: dict, f: io.BufferedWriter) -> None:
        _Py2Pickler(f, protocol=2).dump(obj) if py2 else pickle.dump(obj, f, protocol=2)

    rng = np.random.default_rng(0)
    images, labels, is_test = [], [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (6, 3072)).astype(np.uint8)
        lab = [int(x) for x in rng.integers(0, 10, 6)]
        with open(folder / name, "wb") as f:
            dump({b"batch_label": b"x", b"data": data, b"labels": lab}, f)
        images.append(data.reshape(-1, 3, 32, 32))
        labels += lab
        is_test += [name == "test_batch"] * 6
    with open(folder / "batches.meta", "wb") as f:
        dump({b"label_names": [n.encode() for n in CLASSES], b"num_vis": 3072}, f)
    return np.concatenate(images), np.array(labels), np.array(is_test)


def _cifar_binary(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    recs = []
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = rng.integers(0, 256, (4, 3073)).astype(np.uint8)
        rec[:, 0] %= 10
        (folder / name).write_bytes(rec.tobytes())
        recs.append(rec)
    (folder / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n\n")
    rec = np.concatenate(recs)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


@pytest.fixture(scope="session")
def fake(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Read-only fake sources shared by the tests."""
    root = tmp_path_factory.mktemp("fake")
    d: dict = {"arrays": {}}
    for name, splits in {"flat": ("",), "train_only": ("train",),
                         "train_test": ("train", "test"), "test_only": ("test",)}.items():
        d[name] = root / name
        d["arrays"][name] = _tree(d[name], splits)
    d["jpeg"] = root / "jpeg"
    _tree(d["jpeg"], ("train",), fmt="jpg")
    arch = root / "arch"
    arch.mkdir()
    d["tgz"] = _archive(d["train_test"], arch / "tt.tar.gz")
    d["tgz_wrapped"] = _archive(d["train_test"], arch / "wrapped.tgz", wrap="mydata")
    d["tar"] = _archive(d["flat"], arch / "flat.tar", wrap="flat")
    d["zip"] = _archive(d["train_only"], arch / "train.zip")
    d["zip_wrapped"] = _archive(d["test_only"], arch / "test.zip", wrap="top")
    d["cifar_parent"] = root / "cifar_parent"
    d["cifar_py"] = d["cifar_parent"] / "cifar-10-batches-py"
    d["cifar_arrays"] = _cifar_python(d["cifar_py"])
    d["cifar_py2"] = root / "py2" / "cifar-10-batches-py"
    assert _cifar_python(d["cifar_py2"], py2=True)[0].tobytes() == d["cifar_arrays"][0].tobytes()
    (d["cifar_parent"] / "unrelated.txt").write_text("other things next to the release")
    d["cifar_tgz"] = _archive(d["cifar_py"], arch / "cifar-10-python.tar.gz",
                              wrap="cifar-10-batches-py")
    d["cifar_bin"] = root / "cifar-10-batches-bin"
    d["cifar_bin_arrays"] = _cifar_binary(d["cifar_bin"])
    d["cifar_bin_zip"] = _archive(d["cifar_bin"], arch / "bin.zip", wrap="cifar-10-batches-bin")
    return d


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVE_CACHE_DIR", str(tmp_path / "default-cache"))


def _expected(arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images/labels/is_test in the documented order: train before test, then sorted path."""
    rels = sorted(arrays, key=lambda r: (r.startswith("test/"), r))
    cls = [next(p for p in r.split("/") if p in CLASSES) for r in rels]
    imgs = np.stack([arrays[r].transpose(2, 0, 1) for r in rels])
    return (torch.from_numpy(imgs), torch.tensor([CLASSES.index(c) for c in cls]),
            torch.tensor([r.startswith("test/") for r in rels]))


# ----------------------------------------------------------------------------- detection/decoding
@pytest.mark.parametrize("key,kind,archive", [
    ("flat", "image-folder", None), ("train_only", "image-folder", None),
    ("train_test", "image-folder", None), ("test_only", "image-folder", None),
    ("tgz", "image-folder", "tar.gz"), ("tgz_wrapped", "image-folder", "tar.gz"),
    ("tar", "image-folder", "tar"), ("zip", "image-folder", "zip"),
    ("zip_wrapped", "image-folder", "zip"), ("cifar_py", "cifar10-python", None),
    ("cifar_parent", "cifar10-python", None), ("cifar_tgz", "cifar10-python", "tar.gz"),
    ("cifar_bin", "cifar10-binary", None), ("cifar_bin_zip", "cifar10-binary", "zip"),
])
def test_detect_source(fake: dict, key: str, kind: str, archive: str | None) -> None:
    assert detect_source(fake[key]) == (kind, archive)


@pytest.mark.parametrize("key,arrays", [
    ("flat", "flat"), ("train_only", "train_only"), ("train_test", "train_test"),
    ("test_only", "test_only"), ("tgz", "train_test"), ("tgz_wrapped", "train_test"),
    ("tar", "flat"), ("zip", "train_only"), ("zip_wrapped", "test_only"),
])
def test_image_folder_png_pixel_exact(fake: dict, key: str, arrays: str) -> None:
    raw = load_source(fake[key], use_cache=False)
    images, labels, is_test = _expected(fake["arrays"][arrays])
    assert raw.class_names == CLASSES
    assert raw.images.dtype == torch.uint8 and raw.labels.dtype == torch.int64
    assert raw.is_test.dtype == torch.bool
    assert torch.equal(raw.images, images)
    assert torch.equal(raw.labels, labels)
    assert torch.equal(raw.is_test, is_test)
    assert raw.source == str(Path(fake[key]).absolute()) and not raw.from_cache


def test_jpeg_folder_decodes_close(fake: dict, capfd: pytest.CaptureFixture) -> None:
    raw = load_source(fake["jpeg"], use_cache=False, progress=True)
    assert "120/120" in capfd.readouterr().err
    images, labels, _ = _expected(fake["arrays"]["train_only"])
    assert raw.images.shape == (120, 3, 32, 32) and torch.equal(raw.labels, labels)
    err = (raw.images.float() - images.float()).abs().mean()
    assert err < 12, err  # lossy, but the same pictures


@pytest.mark.parametrize("key", ["cifar_py", "cifar_parent", "cifar_tgz", "cifar_py2"])
def test_cifar_python_pixel_exact(fake: dict, key: str) -> None:
    images, labels, is_test = fake["cifar_arrays"]
    raw = load_source(fake[key], use_cache=False)
    assert (raw.kind, raw.class_names) == ("cifar10-python", CLASSES)
    assert torch.equal(raw.images, torch.from_numpy(images))
    assert raw.labels.tolist() == labels.tolist() and raw.is_test.tolist() == is_test.tolist()


@pytest.mark.parametrize("key", ["cifar_bin", "cifar_bin_zip"])
def test_cifar_binary_pixel_exact(fake: dict, key: str) -> None:
    images, labels = fake["cifar_bin_arrays"]
    raw = load_source(fake[key], use_cache=False)
    assert (raw.kind, raw.class_names) == ("cifar10-binary", CLASSES)
    assert torch.equal(raw.images, torch.from_numpy(images))
    assert raw.labels.tolist() == labels.tolist() and raw.is_test.sum() == 4


def test_corrupt_archives(fake: dict, tmp_path: Path) -> None:
    data = fake["tgz"].read_bytes()
    cases = {"trunc.tar.gz": data[: len(data) // 2], "junk.tgz": b"not an archive" * 100,
             "trunc.zip": fake["zip"].read_bytes()[:-200]}
    zbytes = bytearray(fake["zip"].read_bytes())
    zbytes[200:260] = bytes(60)  # damage member data: CRC/inflate error when read
    cases["crc.zip"] = bytes(zbytes)
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(DataError, match="corrupt|cannot decode") as info:
            load_source(tmp_path / name, use_cache=False)
        assert name in str(info.value) and info.value.__cause__ is not None


def _tar_cut_after_members(src: Path, keep: int) -> bytes:
    """The bytes of an uncompressed tar of ``src`` that stop right after its ``keep``-th file:
    a truncation that lands between two members, which tarfile alone reads as a clean end."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for p in sorted(q for q in src.rglob("*") if q.is_file()):
            tf.add(p, p.relative_to(src).as_posix())
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        members = tf.getmembers()
    m = members[keep - 1]
    return buf.getvalue()[: m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE]


@pytest.mark.parametrize("cut", ["between-members", "inside-header"])
@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_truncated_tar_is_an_error_not_a_smaller_dataset(fake: dict, tmp_path: Path, cut: str,
                                                         suffix: str) -> None:
    # Cut after every test/ image and half the train/ ones: what is left is a valid-looking tree.
    blob = _tar_cut_after_members(fake["train_test"], keep=len(CLASSES) * PER_CLASS * 3 // 2)
    blob += b"ustar-garbage" * 10 if cut == "inside-header" else b""
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(gzip.compress(blob) if suffix == ".tar.gz" else blob)
    with pytest.raises(DataError, match="corrupt or truncated") as info:
        load_source(path, use_cache=False)
    assert path.name in str(info.value)


def test_tar_gz_with_a_bad_crc_is_an_error(fake: dict, tmp_path: Path) -> None:
    blob = bytearray(fake["tgz"].read_bytes())
    blob[-8] ^= 0xFF  # the gzip trailer's CRC32: every member decompresses, the check fails
    (tmp_path / "crc.tar.gz").write_bytes(bytes(blob))
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_source(tmp_path / "crc.tar.gz", use_cache=False)


def test_compressed_tar_named_dot_tar_still_reads(fake: dict, tmp_path: Path) -> None:
    (tmp_path / "flat.tar").write_bytes(gzip.compress(fake["tar"].read_bytes()))
    ref = load_source(fake["tar"], use_cache=False)
    got = load_source(tmp_path / "flat.tar", use_cache=False)
    assert torch.equal(got.images, ref.images) and torch.equal(got.labels, ref.labels)


def test_undecodable_image(fake: dict, tmp_path: Path) -> None:
    shutil.copytree(fake["flat"], tmp_path / "d")
    (tmp_path / "d" / CLASSES[3] / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="bad.png") as info:
        load_source(tmp_path / "d", use_cache=False)
    assert info.value.__cause__ is not None


def test_bad_paths(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "texts" / "a").mkdir(parents=True)
    (tmp_path / "texts" / "a" / "readme.txt").write_text("x")
    (tmp_path / "deep" / "a" / "b" / "c").mkdir(parents=True)
    Image.fromarray(_pixels(0, 0)).save(tmp_path / "deep" / "a" / "b" / "c" / "x.png")
    for p in ("missing", "empty", "notes.txt", "texts", "deep"):
        with pytest.raises(DataError, match="expected") as info:
            detect_source(tmp_path / p)
        assert str(tmp_path / p) in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        load_source(tmp_path / "missing")


def test_train_test_class_mismatch(fake: dict, tmp_path: Path) -> None:
    shutil.copytree(fake["train_test"], tmp_path / "d")
    shutil.rmtree(tmp_path / "d" / "test" / CLASSES[0])
    with pytest.raises(DataError, match="disagree"):
        detect_source(tmp_path / "d")


class _Evil:
    def __init__(self, func: object, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


@pytest.mark.parametrize("how", ["system", "open"])
def test_malicious_pickle_refused(fake: dict, tmp_path: Path, how: str) -> None:
    shutil.copytree(fake["cifar_py"], tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    evil = _Evil(os.system, (f"touch {marker}",)) if how == "system" else _Evil(open, (
        str(marker), "w"))
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(
        pickle.dumps({b"data": evil, b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_source(tmp_path, use_cache=False)
    assert not marker.exists()


def test_image_size(fake: dict, tmp_path: Path) -> None:
    shutil.copytree(fake["flat"], tmp_path / "d")
    big = np.random.default_rng(5).integers(0, 256, (40, 48, 3)).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "d" / CLASSES[9] / "zz.png")
    with pytest.raises(DataError, match="image_size"):
        load_source(tmp_path / "d", use_cache=False)
    raw = load_source(tmp_path / "d", image_size=16, use_cache=False)
    assert raw.images.shape == (121, 3, 16, 16)
    want = np.asarray(Image.fromarray(big).resize((16, 16), Image.Resampling.BILINEAR))
    assert torch.equal(raw.images[-1], torch.from_numpy(want.transpose(2, 0, 1).copy()))
    cifar = load_source(fake["cifar_py"], image_size=8, use_cache=False)
    assert cifar.images.shape == (36, 3, 8, 8)


# ----------------------------------------------------------------------------- cache
def test_cache_hit_and_invalidation(fake: dict, tmp_path: Path) -> None:
    shutil.copytree(fake["train_only"], tmp_path / "d")
    cache = tmp_path / "cache"
    first = load_source(tmp_path / "d", cache_dir=cache)
    second = load_source(tmp_path / "d", cache_dir=cache)
    assert not first.from_cache and second.from_cache
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.class_names == CLASSES and second.kind == "image-folder"
    assert len(list(cache.glob("*.safetensors"))) == len(list(cache.glob("*.json"))) == 1
    assert not list(cache.glob("*.pkl")) and not list(cache.glob("*.tmp"))
    target = tmp_path / "d" / "train" / CLASSES[0] / "000.png"
    Image.fromarray(255 - _pixels(0, 0)).save(target)
    os.utime(target, ns=(1, 1))
    third = load_source(tmp_path / "d", cache_dir=cache)
    assert not third.from_cache and third.sha256 != first.sha256
    assert torch.equal(third.images[0], torch.from_numpy(255 - _pixels(0, 0)).permute(2, 0, 1))
    shutil.copy(fake["tgz"], tmp_path / "a.tar.gz")
    assert not load_source(tmp_path / "a.tar.gz", cache_dir=cache).from_cache
    assert load_source(tmp_path / "a.tar.gz", cache_dir=cache).from_cache
    shutil.copy(fake["tgz_wrapped"], tmp_path / "a.tar.gz")
    assert not load_source(tmp_path / "a.tar.gz", cache_dir=cache).from_cache


def test_default_cache_dir_from_env(fake: dict, tmp_path: Path) -> None:
    load_source(fake["cifar_py"])
    assert len(list((tmp_path / "default-cache").glob("*.safetensors"))) == 1
    assert load_source(fake["cifar_py"]).from_cache
    assert not load_source(fake["cifar_py"], use_cache=False).from_cache


@pytest.mark.parametrize("damage", ["truncate", "garbage_json", "delete_tensors"])
def test_corrupt_cache_recovered(fake: dict, tmp_path: Path, damage: str) -> None:
    cache = tmp_path / "cache"
    good = load_source(fake["zip"], cache_dir=cache)
    st, js = next(cache.glob("*.safetensors")), next(cache.glob("*.json"))
    if damage == "truncate":
        st.write_bytes(st.read_bytes()[:1000])
    elif damage == "garbage_json":
        js.write_text("{not json")
    else:
        st.unlink()
    again = load_source(fake["zip"], cache_dir=cache)
    assert not again.from_cache and torch.equal(again.images, good.images)
    assert load_source(fake["zip"], cache_dir=cache).from_cache


def _cache_worker(src: str, cache: str, barrier, queue) -> None:  # noqa: ANN001 - mp objects
    barrier.wait(timeout=120)
    raw = load_source(src, cache_dir=cache)
    queue.put((raw.from_cache, raw.images.numpy().tobytes(), raw.labels.tolist()))


def test_concurrent_cache_fill(fake: dict, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    cache = tmp_path / "cache"
    procs = [ctx.Process(target=_cache_worker, args=(str(fake["tgz"]), str(cache), barrier, queue))
             for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(not hit for hit, _, _ in results) == 1  # exactly one process decoded
    assert len({(img, tuple(lab)) for _, img, lab in results}) == 1
    assert len(list(cache.glob("*.safetensors"))) == len(list(cache.glob("*.json"))) == 1
    assert not list(cache.glob(".*.tmp"))
    raw = load_source(fake["tgz"], cache_dir=cache)
    assert raw.from_cache and raw.images.numpy().tobytes() == results[0][1]


def test_split_errors_and_edge_cases(fake: dict) -> None:
    raw = _synthetic([20, 5])
    with pytest.raises(DataError, match="too few"):
        make_splits(raw, val_size=10)
    none = make_splits(raw, val_size=0)
    assert none.val is None and len(none.train) == 25
    with pytest.raises(DataError, match="available splits: \\['train'\\]"):
        none.split("val")
    with pytest.raises(DataError, match="unknown split"):
        none.split("validation")
    test_only = load_data(fake["test_only"], use_cache=False)
    assert len(test_only.train) == 0 and test_only.val is None and len(test_only.test) == 120
    assert test_only.split("test") is test_only.test
    with pytest.raises(DataError, match="train split .* empty"):
        test_only.split("train")
    assert test_only.provenance["stats_split"] == "test"
    bundle = load_data(fake["train_test"], val_size=20, use_cache=False)
    assert [len(bundle.split(n)) for n in ("train", "val", "test")] == [100, 20, 120]
    assert bundle.class_names == CLASSES and bundle.image_size == (32, 32)


# ----------------------------------------------------------------------------- paths, misc
def test_resolve_data_path(fake: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MVE_DATA", raising=False)
    assert resolve_data_path(fake["tgz"]) == fake["tgz"]
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_path(tmp_path / "nope")
    monkeypatch.setenv("MVE_DATA", str(fake["flat"]))
    assert resolve_data_path(None) == fake["flat"]
    monkeypatch.delenv("MVE_DATA")
    with pytest.raises(DataError, match="MVE_DATA"):
        resolve_data_path(None, download=False)

    import torchvision.datasets.utils as tv_utils
    from torchvision.datasets import CIFAR10

    def offline(url: str, root: str, **kwargs: object) -> None:
        raise OSError("network unreachable")  # what an offline machine gives

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="--data .*MVE_DATA") as info:
        resolve_data_path(None)
    assert isinstance(info.value.__cause__, OSError)
    calls = []

    def online(url: str, root: str, **kwargs: object) -> None:
        calls.append((url, kwargs.get("md5")))
        shutil.copytree(fake["cifar_py"], Path(root) / "cifar-10-batches-py")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", online)
    target = tmp_path / "home" / ".cache" / "mve" / "cifar-10-batches-py"
    assert resolve_data_path(None) == target
    assert calls == [(CIFAR10.url, CIFAR10.tgz_md5)]  # the official release, md5-checked
    assert resolve_data_path(None) == target and len(calls) == 1  # cached: no second download


def test_real_archive_detect() -> None:
    if not REAL_ARCHIVE.is_file():
        pytest.skip(f"{REAL_ARCHIVE} not present")
    assert detect_source(REAL_ARCHIVE) == ("image-folder", "tar.gz")


def test_import_has_no_ray_and_no_side_effects(tmp_path: Path) -> None:
    code = ("import sys, mve.data; assert 'ray' not in sys.modules, 'ray imported'; "
            "import os; assert not os.listdir('.'), os.listdir('.')")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=120)


def test_cache_files_are_safetensors_and_json(fake: dict, tmp_path: Path) -> None:
    from safetensors import safe_open

    load_source(fake["cifar_bin"], cache_dir=tmp_path)
    assert {p.suffix for p in tmp_path.iterdir()} <= {".safetensors", ".json", ".lock"}
    with safe_open(str(next(tmp_path.glob("*.safetensors"))), framework="pt") as f:
        assert set(f.keys()) == {"images", "labels", "is_test"}
        assert f.get_tensor("images").dtype == torch.uint8
    info = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert info["kind"] == "cifar10-binary" and info["class_names"] == list(CLASSES)
    assert info["counts"] == {"total": 24, "train": 20, "test": 4}
