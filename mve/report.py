"""Run records and human-readable reports: what ran, and how well it did."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mve import __version__
from mve.atomic import write_json, write_text
from mve.metrics import per_class_table

__all__ = ["run_info", "write_json", "write_run_report", "format_vae_metrics", "vae_grids",
           "write_vae_report"]


def _git_sha() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
        return {"git_sha": sha, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def _command(argv: Sequence[str]) -> str:
    """The command line as a user would type it (``mve ...`` for the CLI however it started)."""
    args = list(argv)
    if args and (Path(args[0]).name == "mve" or args[0].endswith(("mve_cli/__main__.py", "mve_cli/main.py"))):
        args[0] = "mve"
    return " ".join(shlex.quote(a) if a and not a.startswith("mve") else a for a in args)


def run_info(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Versions, git state, host and the command line of this run."""
    return {
        "command": _command(argv if argv is not None else sys.argv),
        "mve_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        **_git_sha(),
    }


def format_vae_metrics(m: Mapping[str, Any], prefix: str = "") -> str:
    rows = [("ELBO (bits/dim)", "elbo_bpd", "{:.3f}"), ("Reconstruction PSNR (dB)", "psnr", "{:.2f}"),
            ("Reconstruction SSIM", "ssim", "{:.4f}"), ("Reconstruction MSE", "mse", "{:.5f}"),
            ("KL (nats/image)", "kl", "{:.1f}"), ("Loss", "loss", "{:.2f}"),
            ("FID (Inception-v3)", "fid", "{:.2f}"), ("KID (Inception-v3)", "kid", "{:.4f}"),
            ("FCD (classifier features; not comparable to FID)", "fcd", "{:.3f}"),
            ("KCD (classifier features)", "kcd", "{:.4f}")]
    lines = ["| Metric | Value |", "|--------|-------|"]
    for label, key, fmt in rows:
        if prefix + key in m:
            value = fmt.format(m[prefix + key])
            if key in ("kid", "kcd") and f"{prefix}{key}_std" in m:
                value += f" ± {m[prefix + key + '_std']:.4f}"
            if key in ("fid", "kid", "fcd", "kcd") and "fid_num_samples" in m:
                value += (f" ({m['fid_num_samples']:,} samples vs {m.get('fid_num_real', 0):,} "
                          "training images)")
            lines.append(f"| {label} | {value} |")
    return "\n".join(lines)


def write_run_report(out: str | Path, *, title: str, cfg_yaml: str, history: list[dict[str, Any]],
                     eval_metrics: Mapping[str, Any], class_names: Sequence[str] | None,
                     task: str, command: str) -> Path:
    """Writes REPORT.md plus confusion-matrix and learning-curve PNGs into ``out``."""
    from mve.plots import plot_confusion_matrix, plot_learning_curves

    out = Path(out)
    parts = [f"# {title}", "", f"Reproduce: `{command}`", ""]
    if history:
        plot_learning_curves(history, out / "learning_curves.png", title=title)
        parts += ["## Learning curves", "", "![learning curves](learning_curves.png)", ""]
    if task == "classification" and "per_class" in eval_metrics:
        plot_confusion_matrix(eval_metrics["confusion_matrix"], list(class_names or []),
                              out / "confusion_matrix.png", title=f"{title}: validation")
        parts += ["## Validation, per class", "", per_class_table(dict(eval_metrics)), "",
                  "![confusion matrix](confusion_matrix.png)", ""]
    elif eval_metrics:
        parts += ["## Validation", "", format_vae_metrics(eval_metrics), ""]
    for name, caption in (("reconstructions.png", "Validation images (odd rows) and their "
                           "reconstructions (even rows)"), ("samples.png", "Samples from the prior"),
                          ("variations.png", _VARIATIONS_CAPTION)):
        if (out / name).exists():
            parts += [f"## {caption}", "", f"![{name}]({name})", ""]
    parts += ["## Config", "", "```yaml", cfg_yaml.rstrip(), "```", ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(parts))
    return path


_VARIATIONS_CAPTION = ("Variations: each row is a validation image, its reconstruction, then "
                       "decodes of z = mu + sigma * eps around its posterior")


@torch.no_grad()
def vae_grids(model: torch.nn.Module, images: torch.Tensor, out: str | Path, *,
              mean: Sequence[float], std: Sequence[float], n: int = 32, seed: int = 0,
              variation_rows: int = 4, variations: int = 6) -> None:
    """Writes reconstructions.png (originals over reconstructions), samples.png (from the
    model's configured prior) and variations.png.

    Args:
        images: uint8 [N, 3, H, W] validation images, every class in turn
            (:meth:`DataBundle.showcase_images`); the first ``n // 2`` are used.
    """
    from mve.data import denormalize_to_uint8, normalize
    from mve.plots import plot_image_grid

    out = Path(out)
    model.eval()
    dev = next(model.parameters()).device
    images = images.cpu()
    k = min(n // 2, len(images))
    if k:
        x = normalize(images[:k], mean, std).to(dev)
        recon = denormalize_to_uint8(model.reconstruct(x).float().cpu(), mean, std)
        rows = [t for i in range(0, k, 8) for t in (images[i:i + 8], recon[i:i + 8])]
        plot_image_grid(torch.cat(rows), out / "reconstructions.png", nrow=8)
    samples = denormalize_to_uint8(model.sample(n, temperature=1.0, seed=seed).float().cpu(),
                                   mean, std)
    plot_image_grid(samples, out / "samples.png", nrow=8)
    rows = []
    for i in range(min(variation_rows, len(images))):
        x = normalize(images[i:i + 1], mean, std).to(dev)
        recon = denormalize_to_uint8(model.reconstruct(x).float().cpu(), mean, std)
        var = model.variations(x[0], variations, seed=seed + i).float().cpu()
        rows.append(torch.cat([images[i:i + 1], recon, denormalize_to_uint8(var, mean, std)]))
    if rows:
        plot_image_grid(torch.cat(rows), out / "variations.png", nrow=variations + 2)


def write_vae_report(out: str | Path, model: torch.nn.Module, val_images: torch.Tensor, *,
                     metrics: Mapping[str, Any], preprocessing: Mapping[str, Any],
                     reproduce: str | None = None, title: str = "mve VAE",
                     prior_info: Mapping[str, Any] | None = None, seed: int = 0) -> Path:
    """Writes REPORT.md for a VAE checkpoint directory with its grids.

    Args:
        val_images: the validation images drawn (:meth:`DataBundle.showcase_images`).
        metrics: ``val_psnr``, ``val_ssim``, ``val_elbo_bpd`` (+ ``val_num_samples``) and
            optionally the output of :func:`mve.fid.sample_quality` (``fid``/``kid`` or
            ``fcd``/``kcd`` with their sample counts).
        reproduce: the command that reproduces the checkpoint (shown verbatim).
    """
    out = Path(out)
    mean, std = preprocessing["mean"], preprocessing["std"]
    vae_grids(model, val_images, out, mean=mean, std=std, seed=seed)
    cfg = getattr(model, "config", None)
    n_params = sum(p.numel() for p in model.parameters())
    latent = "x".join(str(v) for v in getattr(cfg, "latent_shape", ()))
    prior = getattr(cfg, "prior", "standard")
    val = {k.removeprefix("val_"): v for k, v in metrics.items() if k.startswith("val_")}
    quality = {k: v for k, v in metrics.items() if not k.startswith("val_")}
    parts = [f"# {title}", "",
             f"{n_params:,} parameters; latent {latent} "
             f"({getattr(cfg, 'latent_dim', '?')} values); prior: {prior}.", ""]
    n_val = f"{int(val['num_samples']):,} images, " if "num_samples" in val else ""
    parts += [f"## Validation ({n_val}pixels in [0, 1] quantised to 8 bits; bits/dim "
              "is the beta = 1 negative ELBO)", "", format_vae_metrics(val), ""]
    if quality:
        feats = quality.get("fid_features", "")
        parts += ["## Sample quality", "", format_vae_metrics(quality), "",
                  f"Features: `{feats}`; samples from the {quality.get('fid_prior', prior)} prior "
                  f"at temperature {quality.get('fid_temperature', 1.0)}; KID over "
                  f"{quality.get('kid_subsets', '?')} subsets of "
                  f"{quality.get('kid_subset_size', '?')}.", ""]
    if prior_info:
        parts += ["## Latent prior", "", f"A {prior_info.get('components')}-component "
                  f"full-covariance Gaussian mixture fitted by EM to the posterior means of "
                  f"{prior_info.get('samples', 0):,} training images (mean log-likelihood "
                  f"{prior_info.get('mean_log_likelihood_nats', float('nan')):.1f} nats vs "
                  f"{prior_info.get('standard_normal_log_likelihood_nats', float('nan')):.1f} "
                  "under N(0, I)).", ""]
    for name, head, caption in (
            ("reconstructions.png", "Reconstructions",
             "Validation images (odd rows) and their reconstructions (even rows)."),
            ("samples.png", "Samples", f"Decoded draws from the {prior} prior at temperature 1."),
            ("variations.png", "Variations", _VARIATIONS_CAPTION.split(": ", 1)[1] + ".")):
        if (out / name).exists():
            parts += [f"## {head}", "", caption, "", f"![{name}]({name})", ""]
    parts += ["## Reproduce", "", "```bash", reproduce or "(command not recorded)", "```", ""]
    return write_text(out / "REPORT.md", "\n".join(parts))
