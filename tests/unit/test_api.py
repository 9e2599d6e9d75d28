"""The Python API (``mve.load``, ``mve.list_models``) on the shipped models and small checkpoints,
and the README's example run as written. No Ray."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _readme import python_example  # tests/integration/_readme.py
from PIL import Image

import mve
from mve.checkpoint import CheckpointError, save_checkpoint
from mve.errors import UserError
from mve.images import preprocess
from mve.inference import SERVING_TTA, top_k
from mve.models import build_model, make_config

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def _image(seed: int, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def clf() -> mve.Classifier:
    return mve.load("cifar10-classifier")


@pytest.fixture(scope="module")
def vae() -> mve.Generator:
    return mve.load("cifar10-vae")


def test_shipped_classifier_metadata(clf: mve.Classifier) -> None:
    assert isinstance(clf, mve.Classifier) and not clf.model.training
    assert clf.num_params == 992_152 == sum(p.numel() for p in clf.model.parameters())
    assert clf.classes == tuple(CLASSES)
    assert clf.metrics["val_accuracy"] == pytest.approx(0.914)
    assert clf.provenance.val_size == 5000 and clf.provenance.counts["train"] == 45_000
    assert clf.card.startswith("# mve classifier")
    assert clf.tta == SERVING_TTA == "flip"
    assert "992,152 parameters" in repr(clf)


def test_every_input_form_gives_the_same_probabilities(clf: mve.Classifier,
                                                        tmp_path: Path) -> None:
    arr = _image(0)
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    chw = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    forms = [arr, chw, chw[None], Image.fromarray(arr), path, str(path), path.read_bytes()]
    ref = clf.probabilities(arr)
    assert ref.shape == (1, 10) and torch.allclose(ref.sum(1), torch.ones(1))
    for form in forms:
        assert torch.allclose(clf.probabilities(form), ref, atol=1e-6), type(form)
    # the model itself, on the checkpoint's preprocessing, with the same TTA
    with torch.inference_mode():
        direct = clf.model(preprocess([arr], clf.preprocessing)).float().softmax(-1)
    assert torch.allclose(direct, ref, atol=1e-6)


def test_predict_is_the_servers_top_k(clf: mve.Classifier) -> None:
    images = [_image(i) for i in range(5)]
    preds = clf.predict(images, top_k=3)
    probs = clf.probabilities(images).numpy()
    assert [p.label for p in preds] == [CLASSES[i] for i in probs.argmax(1)]
    assert clf.top_k_dicts(images, 3) == top_k(probs, CLASSES, 3)
    for p, row in zip(preds, probs, strict=True):
        assert len(p.top_k) == 3 and p.top_k[0].label == p.label
        assert [s.probability for s in p.top_k] == sorted(row, reverse=True)[:3]
        assert p.top_k[0].index == CLASSES.index(p.label)


def test_tta_modes_change_the_computation(clf: mve.Classifier) -> None:
    x = [_image(7)]
    flip = clf.probabilities(x)
    clf.tta = "none"
    try:
        none = clf.probabilities(x)
        with torch.inference_mode():
            plain = clf.model(clf.transforms()(x)).float().softmax(-1)
    finally:
        clf.tta = SERVING_TTA
    assert torch.allclose(none, plain, atol=1e-6) and not torch.allclose(none, flip)
    with pytest.raises(UserError, match="tta"):
        clf.tta = "rotate"
    assert mve.load("cifar10-classifier", tta=None).tta == "flip_translate"  # the checkpoint's


def test_transforms_resize_and_normalise(clf: mve.Classifier) -> None:
    big = _image(3, (64, 48))
    t = clf.transforms()
    x = t(Image.fromarray(big))
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, preprocess([big], clf.preprocessing))
    assert "resize=(32, 32)" in repr(t)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(3, 32, 32), "uint8"),
    (torch.zeros(2, 5, 32, 32, dtype=torch.uint8), r"\[3, H, W\]"),
    (np.zeros((32, 32, 4), dtype=np.uint8), r"\[H, W, 3\]"),
    (b"not an image", "PNG or JPEG"),
    ("/nonexistent/cat.jpg", "cannot read"),
    (3.5, "cannot read an image from a float"),
    ([], "no image"),
])
def test_bad_inputs_are_one_line_errors(clf: mve.Classifier, bad: object, match: str) -> None:
    with pytest.raises(UserError, match=match):
        clf.predict(bad)


def test_predict_rejects_top_k_below_one(clf: mve.Classifier) -> None:
    with pytest.raises(UserError, match="top_k"):
        clf.predict(_image(0), top_k=0)


def test_generator_methods(vae: mve.Generator) -> None:
    a, b = _image(1), _image(2)
    s = vae.sample(4, seed=0)
    assert s.shape == (4, 3, 32, 32) and s.dtype == torch.uint8
    assert torch.equal(s, vae.sample(4, seed=0)) and not torch.equal(s, vae.sample(4, seed=1))
    rec = vae.reconstruct([a, b])
    assert rec.shape == (2, 3, 32, 32)
    strip = vae.interpolate(a, b, steps=5)
    assert strip.shape == (5, 3, 32, 32)
    for end, r in ((strip[0], rec[0]), (strip[-1], rec[1])):  # slerp's ends, up to rounding
        assert (end.int() - r.int()).abs().max() <= 1
    var = vae.variations(_jpeg(a), 3, temperature=0.0)
    assert torch.equal(var[0], var[2])  # temperature 0: every variation is the reconstruction
    with pytest.raises(UserError, match="one image"):
        vae.variations([a, b], 2)
    with pytest.raises(UserError):
        vae.sample(0)


def test_save_grid_and_to_pil(vae: mve.Generator, tmp_path: Path) -> None:
    imgs = vae.sample(6, seed=3)
    pil = mve.to_pil(imgs)
    assert len(pil) == 6 and np.array_equal(np.asarray(pil[2]), imgs[2].permute(1, 2, 0).numpy())
    out = mve.save_grid(imgs, tmp_path / "g.png", nrow=3)
    with Image.open(out) as im:
        assert im.size == (3 * 34 + 2, 2 * 34 + 2)


def _small_classifier(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = make_config("classifier", {"num_classes": 3, "starting_channels": 8,
                                     "final_channels": 16, "cnn_layers": 3, "fcn_layers": 2})
    return save_checkpoint(path, build_model("classifier", cfg).eval(), model_name="classifier",
                           model_config=cfg, preprocessing={"input_size": [32, 32],
                                                            "mean": [0.5] * 3, "std": [0.25] * 3},
                           class_names=["a", "b", "c"], metrics={"val_accuracy": 0.5})


def test_load_a_directory_or_file_uri(tmp_path: Path) -> None:
    d = _small_classifier(tmp_path / "clf")
    by_path, by_uri = mve.load(d), mve.load(f"file://{d}")
    assert by_path.classes == ("a", "b", "c") and by_path.card == ""
    assert by_path.checkpoint_id == by_uri.checkpoint_id
    assert by_path.predict(_image(0), top_k=5)[0].top_k[-1].index in (0, 1, 2)  # k capped at 3
    with pytest.raises(CheckpointError, match="does not exist"):
        mve.load(tmp_path / "missing")
    with pytest.raises(UserError, match="no shipped model"):
        from mve.pretrained import shipped_checkpoint
        shipped_checkpoint("imagenet-resnet50")


def test_load_from_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real S3 protocol server (moto's, on loopback); the checkpoint is fetched with pyarrow."""
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                     "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(k, v)
        s3 = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http",
                               region="us-east-1", allow_bucket_creation=True)
        s3.create_dir("bucket")
        src = ROOT / "models" / "cifar10-classifier"
        pafs.copy_files(str(src), "bucket/clf", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=s3)
        remote = mve.load("s3://bucket/clf")
        assert remote.checkpoint_id == mve.load(src).checkpoint_id
        assert remote.card.startswith("# mve classifier")  # read before the copy is removed
        with pytest.raises(UserError):
            mve.load("s3://bucket/nothing-here")
    finally:
        server.stop()


def test_list_models_without_loading() -> None:
    infos = {m.name: m for m in mve.list_models()}
    assert set(infos) == {"cifar10-classifier", "cifar10-vae"}
    assert infos["cifar10-classifier"].num_params == 992_152
    assert infos["cifar10-vae"].num_params == 2_136_734
    assert infos["cifar10-vae"].metrics["fid"] == pytest.approx(88.147, abs=1e-3)
    assert infos["cifar10-vae"].card.startswith("# mve VAE")
    assert infos["cifar10-classifier"].path == (ROOT / "models" / "cifar10-classifier")


def test_public_names_resolve() -> None:
    for name in mve.__all__:
        assert getattr(mve, name) is not None, name
    assert set(mve.__all__) <= set(dir(mve))
    with pytest.raises(AttributeError):
        mve.no_such_thing  # noqa: B018


def test_serving_tta_is_the_serve_configs() -> None:
    cfg = yaml.safe_load((ROOT / "serve_app" / "config.yaml").read_text())
    ttas = {app["name"]: d.get("user_config", {}).get("tta")
            for app in cfg["applications"] for d in app.get("deployments", [])}
    clf_ttas = {v for k, v in ttas.items() if "classifier" in k}
    assert clf_ttas == {SERVING_TTA}, ttas


def test_readme_example_runs_as_written(tmp_path: Path) -> None:
    """The example, in a fresh interpreter, on two JPEGs: its printed top-1 is the model's."""
    cat, dog = _image(11), _image(12)
    (tmp_path / "cat.jpg").write_bytes(_jpeg(cat))
    (tmp_path / "dog.jpg").write_bytes(_jpeg(dog))
    out = subprocess.run([sys.executable, "-c", python_example()], cwd=tmp_path, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("cat.jpg: "))
    expected = mve.load("cifar10-classifier").predict(tmp_path / "cat.jpg")[0]
    assert line == f"cat.jpg: {expected.label} {expected.probability:.1%}"
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert (tmp_path / "cat-to-dog.png").stat().st_size > 0
    assert "Traceback" not in out.stderr
