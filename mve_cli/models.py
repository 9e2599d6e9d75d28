"""``mve models``: the shipped checkpoints with their metrics, and the training presets."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

from mve.checkpoint import META, PRIOR_DIR
from mve.config import DEFAULT_RECIPE, RECIPE_NOTES, RECIPES
from mve.pretrained import ModelInfo, list_models, missing_message

__all__ = ["models_parent", "models"]

_WIDTH = 100  # columns: a terminal split in two still shows whole lines


def models_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="one JSON object instead of the tables")
    return p


def _headline(m: ModelInfo) -> str:
    """The metrics a user compares a model by, in words."""
    x = m.metrics
    parts = []
    if "val_accuracy" in x:
        parts.append(f"validation accuracy {100 * x['val_accuracy']:.1f}%")
    if "fid" in x:
        prior = f"{x['fid_prior']} prior, " if "fid_prior" in x else ""
        parts.append(f"FID {x['fid']:.1f} ({prior}n={x.get('fid_num_samples', 0):,})")
    if "val_psnr" in x:
        parts.append(f"PSNR {x['val_psnr']:.1f} dB")
    if "val_elbo_bpd" in x and "fid" not in x:
        parts.append(f"{x['val_elbo_bpd']:.2f} bits/dim")
    return ", ".join(parts) or "no metrics recorded"


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _as_json() -> dict[str, Any]:
    return {"shipped": [{"name": m.name, "kind": m.kind, "path": str(m.path) if m.path else None,
                         "num_params": m.num_params, "metrics": m.metrics}
                        for m in list_models()],
            "presets": {family: {name: {"default": name == DEFAULT_RECIPE.get(family),
                                        "description": RECIPE_NOTES[family].get(name, "")}
                                 for name in recipes}
                        for family, recipes in RECIPES.items()}}


def models(args: argparse.Namespace) -> int:
    """Prints the shipped models (name, size, metrics, path) and every preset of each family."""
    if args.json:
        print(json.dumps(_as_json(), indent=2))
        return 0
    print("Shipped models (mve.load(NAME) in Python; mve serve and mve predict use them):")
    for m in list_models():
        if m.path is None:
            print(f"  {m.name:<20} {m.kind:<11} absent: {missing_message(m.kind)}")
            continue
        print(f"  {m.name:<20} {m.kind:<11} {m.num_params:>9,} params  {_headline(m)}")
        print(f"  {'':<20} {_relative(m.path)} (card: REPORT.md)")
        if (m.path / PRIOR_DIR / META).is_file():  # what its samplers use by default
            print(f"  {'':<20} samples from its diffusion prior: {PRIOR_DIR}/ (card: "
                  f"{PRIOR_DIR}/REPORT.md)")
    print("\nTraining presets (mve train FAMILY --preset NAME; * = the default):")
    for family, recipes in RECIPES.items():
        for name in recipes:
            star = "*" if name == DEFAULT_RECIPE.get(family) else " "
            print(textwrap.fill(RECIPE_NOTES[family].get(name, ""), width=_WIDTH,
                                initial_indent=f"  {family:<10} {name:<9}{star} ",
                                subsequent_indent=" " * 24))
    return 0
