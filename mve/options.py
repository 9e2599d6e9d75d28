"""The pure library's command-line options, as argparse *parent* parsers.

``mve train`` (the ``mve_cli`` package) and ``python -m cluster.train`` (a ``ray job submit``
entrypoint) both build their parser from :func:`train_parent`, so the two accept the same
options with the same meaning; ``cluster`` adds its Ray Train group on top. Parents are
composed as torchvision's reference scripts compose theirs::

    argparse.ArgumentParser(parents=[train_parent(), ray_train_parent()])
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

from mve.config import TrainConfig, load_train_config
from mve.errors import UserError
from mve.models import list_models

__all__ = ["config_parent", "train_parent", "train_config_from_args", "config_from_args",
           "given", "resolve_device", "progress_enabled", "tracking_parent",
           "add_tracking_options"]


def config_parent() -> argparse.ArgumentParser:
    """``--preset``, ``--config`` (repeatable) and ``--set KEY=VALUE`` (repeatable)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--preset", help="named recipe preset, e.g. 'seed' for the research note's "
                                    "network (default: the best known recipe; see "
                                    "`mve config show`)")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML config file; may be repeated, later files win")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="dotted override with a YAML value, e.g. --set optim.lr=3e-4; repeatable")
    return p


def train_parent() -> argparse.ArgumentParser:
    """The options of ``mve train`` that do not depend on where training runs."""
    t = argparse.ArgumentParser(add_help=False, parents=[config_parent(), tracking_parent()])
    t.add_argument("model", choices=list_models(latent=True),
                   help="model family; `prior` is the diffusion prior of a VAE (with --vae)")
    t.add_argument("--vae", metavar="DIR", help="prior only: the VAE checkpoint whose latents it "
                   "models ('default': models/cifar10-vae)")
    t.add_argument("--local", action="store_true", help="train in this process, without Ray")
    t.add_argument("--data", help="data path (else $MVE_DATA, else official CIFAR-10 in the cache)")
    t.add_argument("--epochs", type=int, help="number of epochs (overrides the config)")
    t.add_argument("--limit", type=int, help="at most N training images, stratified (smoke runs)")
    t.add_argument("--val-size", type=int, metavar="N",
                   help="validation images held out, stratified (default: the config's, 5000; "
                        "fewer make a smoke run's evaluation faster)")
    t.add_argument("--out", help="output directory (default runs/<model>-local or -ray)")
    t.add_argument("--seed", type=int, help="training seed")
    t.add_argument("--device", default="auto", help="--local only: auto, cpu, cuda or cuda:N")
    t.add_argument("--resume", action="store_true",
                   help="--local only: continue from the latest epoch checkpoint in --out "
                        "(Ray runs resume by themselves when storage and --name are reused)")
    t.add_argument("--keep-checkpoints", type=int, default=2,
                   help="epoch checkpoints to keep (default 2; Ray keeps the best N)")
    return t


def tracking_parent() -> argparse.ArgumentParser:
    """Experiment tracking options, shared by ``mve train`` and ``mve tune``."""
    t = argparse.ArgumentParser(add_help=False)
    add_tracking_options(t)
    return t


def add_tracking_options(t: argparse.ArgumentParser) -> None:
    """``--no-tensorboard``, ``--mlflow``, ``--mlflow-experiment``, ``--register-model``."""
    g = t.add_argument_group("experiment tracking (README: Tracking runs)")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                   help="do not write TensorBoard event files (default: under the run's "
                        "output or storage, in tensorboard/)")
    g.add_argument("--mlflow", metavar="URI", help="log params, metrics per epoch and the "
                   "final checkpoint to this MLflow tracking server (default "
                   "$MLFLOW_TRACKING_URI; none when unset)")
    g.add_argument("--mlflow-experiment", metavar="NAME", default="mve",
                   help="MLflow experiment (default mve)")
    g.add_argument("--register-model", metavar="NAME",
                   help="with --mlflow: register the final (or the search's best) checkpoint "
                        "as a new version of this MLflow model")


def config_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None
                     ) -> TrainConfig:
    """The TrainConfig named by ``--preset``/``--config``/``--set`` (plus ``extra``)."""
    return load_train_config(args.model, preset=args.preset, files=args.config,
                             overrides=args.overrides, extra=extra)


def given(args: argparse.Namespace, **keys: str) -> dict[str, Any]:
    """``{config_key: args.<option>}`` for each option the user gave (not None)."""
    return {key: getattr(args, opt) for key, opt in keys.items()
            if getattr(args, opt) is not None}


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of ``mve train``: the config options plus --epochs, --seed, --limit,
    --val-size (a --set of the same key wins, as for every option)."""
    extra: dict[str, Any] = given(args, epochs="epochs", seed="seed")
    data = given(args, limit="limit", val_size="val_size")
    if data:
        extra["data"] = data
    return config_from_args(args, extra)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), or a torch device name that this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"bad --device {name!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available")
    return dev


def progress_enabled() -> bool:
    """Progress bars on an interactive terminal, or when MVE_PROGRESS=1."""
    return sys.stderr.isatty() or os.environ.get("MVE_PROGRESS") == "1"
