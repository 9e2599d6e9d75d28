"""Ray Train (1 and 2 workers) against mve's plain loop: same model, data and threads.

    python bench/bench_ray_train.py --data ../shared/data/cifar10-train-jpeg.tar.gz --out BENCHMARKS-ray.md

Each Ray worker gets one CPU, so Ray sets one intra-op thread per worker; the plain loop is
pinned to one thread too. Throughput is the mean of the epochs after the first (warm-up),
as reported by the training loop itself; the median of ``--repeats`` runs is shown.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from timing import publish  # bench/timing.py

from mve.config import load_train_config
from mve.data import load_data
from mve.train import fit


def plain(cfg, data_path: str) -> tuple[float, float]:
    torch.set_num_threads(1)
    data = load_data(data_path, val_size=cfg.data.val_size, limit=cfg.data.limit)
    t = time.perf_counter()
    result = fit(cfg, data, progress=False)
    wall = time.perf_counter() - t
    return statistics.mean(h["train_images_per_s"] for h in result.history[1:]), wall


def ray_train(cfg, data_path: str, workers: int, storage: str, name: str) -> tuple[float, float]:
    from cluster.train import ClusterConfig, run_training

    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        run_training(cfg, ClusterConfig(num_workers=workers, storage=storage), data_path,
                     out=out, name=name)
        wall = time.perf_counter() - t
        import json

        history = json.loads((Path(out) / "history.json").read_text())
    return statistics.mean(h["train_images_per_s"] for h in history[1:]), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write the markdown table to this file")
    args = p.parse_args()
    import ray

    cfg = load_train_config("classifier", overrides=[
        f"epochs={args.epochs}", f"data.limit={args.limit}", "data.val_size=1000"])
    rows: dict[str, list[tuple[float, float]]] = {"plain": [], "ray1": [], "ray2": []}
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory() as storage:
            for r in range(args.repeats):
                rows["plain"].append(plain(cfg, args.data))
                rows["ray1"].append(ray_train(cfg, args.data, 1, storage, f"b1-{r}"))
                rows["ray2"].append(ray_train(cfg, args.data, 2, storage, f"b2-{r}"))
    finally:
        ray.shutdown()
    med = {k: (statistics.median(x for x, _ in v), statistics.median(w for _, w in v))
           for k, v in rows.items()}
    lines = [
        "## Ray Train against the plain loop",
        "",
        f"Command: `python bench/bench_ray_train.py --data {args.data} --limit {args.limit} "
        f"--epochs {args.epochs} --repeats {args.repeats}`",
        "",
        f"Default classifier recipe (seed architecture), {args.limit} training images, "
        f"{args.epochs} epochs, 1 intra-op thread per process, 2-core machine; medians of "
        f"{args.repeats} runs, all runs interleaved in one process.",
        "",
        "| Setup | train images/s (epochs 2+) | vs plain | wall time (s) |",
        "|---|---|---|---|",
    ]
    for key, label in (("plain", "mve plain loop, 1 thread"), ("ray1", "Ray Train, 1 worker"),
                       ("ray2", "Ray Train, 2 workers (DDP, gloo)")):
        ips, wall = med[key]
        lines.append(f"| {label} | {ips:.0f} | {ips / med['plain'][0]:.2f}x | {wall:.1f} |")
    lines += ["", f"2 workers vs 1: {med['ray2'][0] / med['ray1'][0]:.2f}x throughput "
              f"(ideal 2x on 2 cores)."]
    text = "\n".join(lines) + "\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
