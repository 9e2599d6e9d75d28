"""``mve``: every command's parser composed from its package's parent parsers.

    mve summary classifier --preset seed
    mve data inspect ../shared/data/cifar10-train-jpeg.tar.gz
    mve train classifier --local --data PATH --epochs 1 --limit 5000 --out runs/demo
    mve evaluate runs/demo --data PATH --json

Building the parser imports no Ray: handlers are named ``"module:function"`` and imported when
their command runs, so ``mve summary`` or ``mve train --local`` never load Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from cluster.k8s.cli import k8s_parent
from cluster.options import ray_train_parent
from cluster.tune import cli as tune_cli
from mve import __version__
from mve.errors import UserError, run_command
from mve.logs import setup_logging, verbosity_parent
from mve.options import train_parent
from mve_cli import evaluate, inspect
from mve_cli.models import models_parent
from serve_app.cli import generate_parent, predict_parent
from serve_app.embedded import serve_parent

__all__ = ["main", "build_parser"]

_EPILOG = ("Data: --data PATH, else $MVE_DATA, else the official CIFAR-10 in ~/.cache/mve "
           "(downloaded when online). PATH may be cifar-10-batches-py, an image-folder tree, "
           "or a .tar.gz/.zip of either.")

# command -> (handler "module:function", parent parser builder, help, description)
_COMMANDS: dict[str, tuple[str, Callable[[], argparse.ArgumentParser], str, str | None]] = {
    "summary": ("mve_cli.inspect:summary", inspect.summary_parent,
                "print a model's plan and layer table",
                "Print the derived plan and a torchinfo layer table ending with the total "
                "parameter count."),
    "config": ("mve_cli.inspect:config_show", inspect.config_show_parent,
               "show the resolved training config as YAML", None),
    "data": ("mve_cli.inspect:data_inspect", inspect.data_parent, "inspect a data source", None),
    "train": ("mve_cli.main:train", lambda: argparse.ArgumentParser(
        add_help=False, parents=[train_parent(), ray_train_parent()]),
        "train a model (Ray Train; one process with --local)",
        "Train a model. By default it runs on Ray Train (an embedded local Ray, or --address); "
        "with --local it runs in this process without Ray. The output directory becomes the "
        "final checkpoint with REPORT.md, plots, config and history. Without --preset it "
        "trains the best known recipe (`fast` for the classifier); --preset seed is the "
        "research note's network."),
    "serve": ("serve_app.embedded:serve_command", serve_parent,
              "serve checkpoints over HTTP with Ray Serve",
              "Serve a classifier and/or VAE checkpoint with Ray Serve (embedded local Ray or "
              "--address) and print the URL; Ctrl-C stops it."),
    "predict": ("serve_app.cli:predict_command", predict_parent,
                "classify images: in this process, or via a server with --url",
                "Print the top-k classes of each image. Without --url (or $MVE_URL) the "
                "classifier runs in this process (--classifier, default the shipped "
                "cifar10-classifier); with --url a running `mve serve` answers."),
    "models": ("mve_cli.models:models", models_parent,
               "list the shipped models (with their metrics) and the training presets", None),
    "generate": ("serve_app.cli:generate_command", generate_parent,
                 "VAE samples, variations, interpolations (--vae DIR, or a server)",
                 "Write a PNG grid (sample, variations) or strip (interpolate). With --vae DIR "
                 "the checkpoint runs in this process; otherwise a running `mve serve` (--url) "
                 "does the work."),
    "k8s": ("cluster.k8s.cli:run", k8s_parent,
            "KubeRay: submit a RayJob, promote a checkpoint, status", None),
    "tune": ("cluster.tune.cli:run", tune_cli.tune_parent,
             "hyperparameter search with Ray Tune (ASHA + Optuna)", tune_cli.DESCRIPTION),
    "evaluate": ("mve_cli.evaluate:evaluate", evaluate.evaluate_parent,
                 "evaluate a checkpoint: per-class table, confusion matrix",
                 "Evaluate a checkpoint on a data split. A classifier prints the per-class "
                 "table and writes a confusion-matrix PNG into --out; a VAE prints PSNR, SSIM "
                 "and the ELBO in bits/dim, and with --fid N FID and KID of N samples. With "
                 "--json the last line is one JSON object with the metrics. The checkpoint "
                 "is only read."),
}


# commands whose help text is laid out by hand
_RAW = {"tune": {"epilog": tune_cli.EPILOG,
                 "formatter_class": argparse.RawDescriptionHelpFormatter}}


def _vae_parser(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("vae", help="VAE tools: fit the latent prior, write the report",
                       description="fit-prior: fit a Gaussian-mixture prior to the training "
                                   "latents and store it in the checkpoint (sampling then uses "
                                   "it). report: evaluate (PSNR, SSIM, bits/dim, optional FID), "
                                   "record the metrics and write REPORT.md with grids.")
    v.set_defaults(handler="mve_cli.evaluate:vae")
    vs = v.add_subparsers(dest="action", required=True, metavar="ACTION")
    vs.add_parser("fit-prior", parents=[evaluate.fit_prior_parent(), *_verbosity("vae")],
                  help="fit the GMM latent prior into a VAE checkpoint")
    vs.add_parser("report", parents=[evaluate.report_parent(), *_verbosity("vae")],
                  help="evaluate a VAE checkpoint and write REPORT.md with grids")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mve", description="mve: train, tune, serve and evaluate CIFAR-scale vision models.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        parents=[verbosity_parent()])
    parser.add_argument("--version", action="version", version=f"mve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (handler, parent, help_, description) in _COMMANDS.items():
        p = sub.add_parser(name, parents=[parent(), *_verbosity(name)], help=help_,
                           description=description, **_RAW.get(name, {}))
        p.set_defaults(handler=handler)
    _vae_parser(sub)
    return parser


def _verbosity(command: str) -> list[argparse.ArgumentParser]:
    """``-q``/``-v`` after the command too (``mve train ... -q``), set only when given so that
    ``mve -q train`` holds. ``mve tune`` has its own ``-q`` and a ``-v N`` for Tune's output."""
    return [] if command == "tune" else [verbosity_parent(suppress=True)]


def _resolve(handler: str) -> Callable[[argparse.Namespace], int]:
    module, _, function = handler.partition(":")
    try:
        return getattr(importlib.import_module(module), function)
    except ImportError as exc:  # e.g. Ray missing from a minimal install
        raise UserError(f"`mve` cannot load {module} ({exc})") from None


def train(args: argparse.Namespace) -> int:
    """``mve train``: in this process with --local (no Ray imported), else on Ray Train."""
    if args.vae and args.model != "prior":
        raise UserError("--vae is for `mve train prior` (the VAE whose latents it models)")
    prior = args.model == "prior"
    if args.local:
        module = "mve.prior_run" if prior else "mve.local_train"
    else:
        module = "cluster.prior_train" if prior else "cluster.train"
    try:
        run_from_args = importlib.import_module(module).run_from_args
    except ImportError as exc:
        if args.local:
            raise
        raise UserError(f"Ray Train is not available ({exc}); pass --local to train in "
                        "this process") from None
    return run_from_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet and args.log_verbose:  # e.g. `mve -q train ... -v`
        parser.error("-q/--quiet and -v/--verbose contradict each other; give one")
    setup_logging(quiet=args.quiet, verbose=args.log_verbose)
    return run_command(lambda a: _resolve(a.handler)(a), args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
