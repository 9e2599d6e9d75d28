"""``mve train prior --vae CKPT``: the latent diffusion prior, trained in this process.

Options are ``mve train``'s: ``--preset`` names an architecture preset of the prior
(``default``, ``tiny``), ``--set KEY=VALUE`` sets a field of the training config
(:class:`~mve.prior_train.PriorTrainConfig`: ``lr``, ``batch_size``, ...) or, as
``model.KEY=VALUE``, of the architecture (:class:`~mve.models.latent_prior.LatentPriorConfig`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mve._validate import ConfigError, validate_dataclass
from mve.checkpoint import load_checkpoint
from mve.config import parse_overrides
from mve.data import load_data, resolve_data_path
from mve.errors import UserError
from mve.models import make_config
from mve.options import progress_enabled, resolve_device
from mve.pretrained import default_vae, missing_message
from mve.prior_train import PriorTrainConfig, train_prior

__all__ = ["run_from_args", "prior_configs", "vae_path", "done_message"]


def prior_configs(preset: str | None, overrides: list[str], *, epochs: int | None = None,
                  seed: int | None = None) -> tuple[Any, PriorTrainConfig]:
    """The architecture and training configs named by ``--preset``/``--set``/``--epochs``."""
    sets = parse_overrides(overrides)
    model_sets = sets.pop("model", {}) or {}
    for key, value in (("epochs", epochs), ("seed", seed)):
        if value is not None:
            sets.setdefault(key, value)
    try:
        model_cfg = make_config("prior", model_sets, preset=preset or "default")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid prior model config: {exc}") from None
    return model_cfg, validate_dataclass(PriorTrainConfig, sets, "prior training")


def vae_path(value: str | None) -> Path:
    """The VAE of ``--vae`` ('default' or nothing: the shipped one)."""
    if value in (None, "default"):
        path = default_vae()
        if path is None:
            raise UserError("mve train prior needs --vae CKPT; " + missing_message("vae"))
        return path
    return Path(value)


def run_from_args(args: argparse.Namespace) -> int:
    """Trains the prior of ``--vae`` on ``--data`` into ``--out`` (a prior checkpoint), in this
    process (``mve train prior --local``; without it, ``cluster.prior_train`` on Ray Train)."""
    model_cfg, cfg = prior_configs(args.preset, args.overrides, epochs=args.epochs,
                                   seed=args.seed)
    device = resolve_device(args.device)
    vae = load_checkpoint(vae_path(getattr(args, "vae", None)), device=device)
    if vae.model_name != "vae":
        raise UserError(f"--vae {vae.path} is a {vae.model_name} checkpoint, not a VAE")
    data = load_data(resolve_data_path(args.data),
                     val_size=args.val_size if args.val_size is not None else 5000,
                     seed=0, limit=args.limit, progress=progress_enabled())
    out = Path(args.out or "runs/prior-local")
    train_prior(vae, data.train.images, data.val.images if data.val is not None else None,
                out, model_config=model_cfg, cfg=cfg, device=device, resume=args.resume,
                progress=progress_enabled())
    print(done_message(vae.path, out, f"in this process ({cfg.epochs} epoch(s))"))
    return 0


def done_message(vae: Path, out: Path, how: str) -> str:
    """What ``mve train prior`` prints at the end, locally or on Ray Train."""
    return (f"mve train prior {how}: done; the prior of {vae} is in {out}.\n"
            f"A VAE samples from the prior in its prior/ folder by default: copy it there and "
            f"run\n  mve generate --vae VAE_COPY --mode sample --n 64 --steps 16 --out grid.png")
