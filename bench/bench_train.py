"""Benchmarks of the pure-PyTorch core: data decode/cache and training/inference throughput.

    python bench/bench_train.py --data ../shared/data/cifar10-train-jpeg.tar.gz --out BENCHMARKS.md

Each figure is the median of ``--repeats`` runs measured in this one process, so figures in one
table are comparable with each other; absolute numbers move with the machine's load.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from timing import publish, repeat_time  # bench/timing.py

from mve.config import load_train_config
from mve.data import TensorLoader, load_data
from mve.models import build_model
from mve.report import run_info
from mve.train import build_optimizer


def bench_data(path: str, repeats: int) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        load_data(path, cache_dir=cache)
        cold = time.perf_counter() - t0
        warm = statistics.median(repeat_time(lambda: load_data(path, cache_dir=cache), repeats))
    return [("decode archive into the tensor cache (cold)", f"{cold:.1f} s"),
            ("load from the tensor cache + split (warm, median)", f"{warm:.2f} s"),
            ("cold / warm", f"{cold / warm:.0f}x")]


def bench_model(path: str | None, preset: str | None, steps: int, repeats: int, batch: int
                ) -> list[tuple[str, str]]:
    cfg = load_train_config("classifier", preset=preset, overrides=[f"batch_size={batch}"])
    model = build_model(cfg.model, cfg.model_config)
    if path:
        split = load_data(path, limit=batch * steps).train
    else:  # synthetic images of the right shape
        split = __import__("mve.data", fromlist=["Split"]).Split(
            torch.randint(0, 256, (batch * steps, 3, 32, 32), dtype=torch.uint8),
            torch.randint(0, 10, (batch * steps,)))
    loader = TensorLoader(split, batch_size=batch, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True,
                          drop_last=True, augment=cfg.data.augment)
    opt = build_optimizer(model, cfg.optim)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_epoch():
        model.train()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

    @torch.no_grad()
    def infer_epoch():
        model.eval()
        for x, _ in loader:
            model(x)

    train_epoch()  # warm-up
    n = len(loader) * batch
    tr = statistics.median(repeat_time(train_epoch, repeats))
    inf = statistics.median(repeat_time(infer_epoch, repeats))
    label = preset or "default"
    return [(f"train images/s ({label} recipe, batch {batch}, fp32)", f"{n / tr:.0f}"),
            (f"inference images/s (batch {batch})", f"{n / inf:.0f}"),
            ("seconds per 45,000-image epoch (train)", f"{45_000 / (n / tr):.0f}")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="data path (synthetic images when omitted; the data bench needs it)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="batches per timed epoch")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--out", help="write a markdown section to this file (replaces it)")
    args = p.parse_args()
    rows: list[tuple[str, str]] = []
    if args.data:
        rows += bench_data(args.data, args.repeats)
    rows += bench_model(args.data, None, args.steps, args.repeats, args.batch)
    rows += bench_model(args.data, "seed", args.steps, args.repeats, 125)
    info = run_info()
    lines = ["# Benchmarks", "", f"Command: `python bench/bench_train.py{' --data ' + args.data if args.data else ''}"
             f" --repeats {args.repeats} --steps {args.steps} --batch {args.batch}`", "",
             f"Machine: {info['platform']}, {info['cpu_count']} CPUs, torch {info['torch_version']} "
             f"({info['torch_threads']} threads), mve {info['mve_version']} @ {info['git_sha']}. "
             f"Medians of {args.repeats} runs.", "", "| Measure | Value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    text = "\n".join(lines) + "\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
