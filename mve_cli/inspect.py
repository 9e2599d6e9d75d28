"""``mve summary``, ``mve config show`` and ``mve data inspect``: look before training."""

from __future__ import annotations

import argparse
import json
import logging

from torchinfo import summary as torchinfo_summary

from mve.data import load_data
from mve.models import build_model, list_models
from mve.options import config_from_args, config_parent, progress_enabled

__all__ = ["summary_parent", "config_show_parent", "data_parent", "summary", "config_show",
           "data_inspect"]


def summary_parent() -> argparse.ArgumentParser:
    s = argparse.ArgumentParser(add_help=False, parents=[config_parent()])
    s.add_argument("model", choices=list_models())
    s.add_argument("--batch-size", type=int, default=100, help="batch size for the table (default 100)")
    s.add_argument("--depth", type=int, default=3, help="table depth (default 3)")
    return s


def config_show_parent() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False, parents=[config_parent()])
    c.add_argument("action", choices=["show"])
    c.add_argument("model", choices=list_models())
    return c


def data_parent() -> argparse.ArgumentParser:
    d = argparse.ArgumentParser(add_help=False)
    d.add_argument("action", choices=["inspect"])
    d.add_argument("path", help="cifar-10-batches-py, image folder, or .tar.gz/.zip archive")
    d.add_argument("--val-size", type=int, default=5000, help="validation images (default 5000)")
    d.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    d.add_argument("--limit", type=int, help="keep at most N training images, stratified")
    d.add_argument("--image-size", type=int, help="resize images to this square size")
    d.add_argument("--no-cache", action="store_true", help="decode without the tensor cache")
    d.add_argument("--json", action="store_true", help="print one JSON object last")
    return d


def summary(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
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
    print(config_from_args(args).to_yaml(), end="")
    return 0


def data_inspect(args: argparse.Namespace) -> int:
    bundle = load_data(args.path, val_size=args.val_size, seed=args.seed, limit=args.limit,
                       image_size=args.image_size, use_cache=not args.no_cache, progress=progress_enabled())
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
