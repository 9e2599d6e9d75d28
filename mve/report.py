"""Run records and human-readable reports: what ran, and how well it did."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mve import __version__
from mve.metrics import per_class_table

__all__ = ["run_info", "write_json", "write_run_report", "format_vae_metrics", "vae_grids"]


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


def run_info(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Versions, git state, host and the command line of this run."""
    return {
        "command": " ".join(argv if argv is not None else sys.argv),
        "mve_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        **_git_sha(),
    }


def write_json(path: str | Path, data: Any) -> Path:
    """Writes JSON atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, p)
    return p


def format_vae_metrics(m: Mapping[str, Any], prefix: str = "") -> str:
    rows = [("ELBO (bits/dim)", "elbo_bpd", "{:.3f}"), ("Reconstruction PSNR (dB)", "psnr", "{:.2f}"),
            ("Reconstruction SSIM", "ssim", "{:.4f}"), ("Reconstruction MSE", "mse", "{:.5f}"),
            ("KL (nats/image)", "kl", "{:.1f}"), ("Loss", "loss", "{:.2f}")]
    lines = ["| Metric | Value |", "|--------|-------|"]
    for label, key, fmt in rows:
        if prefix + key in m:
            lines.append(f"| {label} | {fmt.format(m[prefix + key])} |")
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
                           "reconstructions (even rows)"), ("samples.png", "Samples from the prior")):
        if (out / name).exists():
            parts += [f"## {caption}", "", f"![{name}]({name})", ""]
    parts += ["## Config", "", "```yaml", cfg_yaml.rstrip(), "```", ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(parts))
    return path


@torch.no_grad()
def vae_grids(model: torch.nn.Module, images: torch.Tensor, out: str | Path, *,
              mean: Sequence[float], std: Sequence[float], n: int = 32, seed: int = 0) -> None:
    """Writes reconstructions.png (originals over reconstructions) and samples.png.

    Args:
        images: uint8 [N, 3, H, W] validation images; the first ``n // 2`` are used.
    """
    from mve.data import denormalize_to_uint8, normalize
    from mve.plots import plot_image_grid

    out = Path(out)
    model.eval()
    k = min(n // 2, len(images))
    if k:
        x = normalize(images[:k], mean, std)
        recon = denormalize_to_uint8(model.reconstruct(x), mean, std)
        rows = [t for i in range(0, k, 8) for t in (images[i:i + 8], recon[i:i + 8])]
        plot_image_grid(torch.cat(rows), out / "reconstructions.png", nrow=8)
    samples = denormalize_to_uint8(model.sample(n, temperature=1.0, seed=seed), mean, std)
    plot_image_grid(samples, out / "samples.png", nrow=8)
