"""Classifier training speed on this machine: images/s, FLOPs per image, and the share of the
machine's measured matmul FLOP rate that training uses, for the recipe presets and the CPU
options (channels_last, torch.compile, thread count).

    python bench/bench_classifier.py [--data ARCHIVE] [--steps 6] [--repeats 3] [--out FILE.md]

Every figure is the median of ``--repeats`` timed runs in this one process (after a warm-up),
so the rows of one table compare with each other; the peak is measured in the same process.
Share = training FLOPs per image (forward + backward, counted by
``torch.utils.flop_counter``) x images/s / measured fp32 matmul FLOP/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from timing import repeat_time  # bench/timing.py
from torch.utils.flop_counter import FlopCounterMode

from mve.config import load_train_config
from mve.data import Split, TensorLoader
from mve.models import build_model
from mve.report import run_info
from mve.train import build_optimizer


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Median fp32 FLOP/s of an n x n x n matmul (what the BLAS achieves on this machine)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def train_flops_per_image(model: torch.nn.Module, batch: int, channels_last: bool) -> float:
    x = torch.randn(batch, 3, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).float().logsumexp(1).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def bench_train(preset: str, *, batch: int, steps: int, repeats: int, channels_last: bool,
                compile_model: bool, images: torch.Tensor, labels: torch.Tensor
                ) -> tuple[float, float]:
    """(median images/s, training FLOPs per image) of ``steps`` optimiser steps."""
    cfg = load_train_config("classifier", preset=preset, overrides=[f"batch_size={batch}"])
    model = build_model(cfg.model, cfg.model_config)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    flops = train_flops_per_image(model, min(batch, 64), channels_last)
    opt = build_optimizer(model, cfg.optim)
    step_model = torch.compile(model) if compile_model else model
    loader = TensorLoader(Split(images, labels), batch_size=batch, mean=(0.5,) * 3,
                          std=(0.25,) * 3, shuffle=True, drop_last=True, augment=cfg.data.augment)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    model.train()

    def epoch() -> None:
        for x, y in loader:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = loss_fn(step_model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    epoch()  # warm-up (and compilation)
    times = repeat_time(epoch, repeats)
    return batch * len(loader) / statistics.median(times), flops


def profile_steps(preset: str, batch: int, steps: int, images: torch.Tensor,
                  labels: torch.Tensor, top: int = 12) -> str:
    """``torch.profiler`` table of ``steps`` training steps (data, forward, backward, optimiser):
    where the CPU time of one step goes."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cfg = load_train_config("classifier", preset=preset, overrides=[f"batch_size={batch}"])
    model = build_model(cfg.model, cfg.model_config).train()
    opt = build_optimizer(model, cfg.optim)
    loader = TensorLoader(Split(images, labels), batch_size=batch, mean=(0.5,) * 3,
                          std=(0.25,) * 3, shuffle=True, drop_last=True, augment=cfg.data.augment)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        it = iter(loader)
        for _ in range(steps):
            with record_function("data (gather + augment + normalise)"):
                x, y = next(it)
            with record_function("forward"):
                loss = loss_fn(model(x), y)
            with record_function("backward"):
                opt.zero_grad(set_to_none=True)
                loss.backward()
            with record_function("optimizer"):
                opt.step()
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=top)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="image archive (default: synthetic images)")
    p.add_argument("--steps", type=int, default=6, help="optimiser steps per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--profile", action="store_true",
                   help="print a torch.profiler table of the fast recipe's training steps")
    p.add_argument("--out", help="append the Markdown table to this file")
    args = p.parse_args(argv)
    rows: list[tuple[str, ...]] = []
    peak = matmul_peak()
    configs = [("seed", 125, False, False), ("fast", 256, False, False),
               ("fast", 256, True, False)]
    if args.compile:
        configs.append(("fast", 256, True, True))
    n = max(b for _, b, _, _ in configs) * args.steps
    if args.data:
        from mve.data import load_data
        split = load_data(args.data, limit=n).train
        images, labels = split.images[:n], split.labels[:n]
    else:
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,))
    if args.profile:
        print(profile_steps("fast", 256, min(3, args.steps), images[:256 * args.steps],
                            labels[:256 * args.steps]))
    for preset, batch, cl, comp in configs:
        ips, flops = bench_train(preset, batch=batch, steps=args.steps, repeats=args.repeats,
                                 channels_last=cl, compile_model=comp,
                                 images=images[:batch * args.steps],
                                 labels=labels[:batch * args.steps])
        layout = ("channels_last" if cl else "NCHW") + (" + compile" if comp else "")
        rows.append((preset, str(batch), layout, f"{ips:.0f}", f"{flops / 1e9:.3f}",
                     f"{flops * ips / 1e9:.1f}", f"{100 * flops * ips / peak:.1f}%"))
        print(rows[-1], flush=True)
    info = run_info()
    lines = [
        "",
        f"### Classifier training throughput and FLOP-rate share ({time.strftime('%Y-%m-%d')}, "
        f"{info['cpu_count']} CPUs)",
        "",
        f"`python bench/bench_classifier.py {' '.join(sys.argv[1:] if argv is None else argv)}` — torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, fp32; measured fp32 matmul "
        f"peak (2048³, median of 5): **{peak / 1e9:.1f} GFLOP/s**. Medians of {args.repeats} "
        f"timed runs of {args.steps} steps after a warm-up.",
        "",
        "| preset | batch | layout | train img/s | train GFLOP/img | GFLOP/s | share of peak |",
        "|---|---|---|---|---|---|---|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
