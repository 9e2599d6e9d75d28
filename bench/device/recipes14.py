"""Issue 14 on one GPU: the classifier recipes over several seeds, a distillation teacher, and
the final model on all 50,000 training images, in one process with the data loaded once.

    python bench/device/recipes14.py --data DATA --out DIR [--budget-s 780]        # the GPU call
    python bench/device/recipes14.py --data DATA --out DIR --device cpu --limit 1000 \
        --epochs 1 --seeds 2 --budget-s 300                                       # CPU rehearsal

Order (each step is skipped when the budget cannot hold it, so a short call still ends with a
balanced table): the teacher (recipe ``teacher``, ~9.9M parameters, seed 0); then every
student recipe for seed 0, then for seed 1, ...; then the recipe with the best mean trained
on all 50,000 images (``data.val_size=0``), saved as a servable checkpoint for ``models/``.
Writes ``runs.jsonl`` (one line per run: recipe, seed, final validation accuracy, seconds to
94%, histories) and ``summary.md`` (mean +- std, n) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mve.checkpoint import save_checkpoint  # noqa: E402
from mve.config import load_train_config  # noqa: E402
from mve.data import load_data  # noqa: E402
from mve.train import fit, preprocessing_for  # noqa: E402

# Student recipes: name -> (preset, overrides). `best-distill` adds the teacher's path.
STUDENTS: dict[str, tuple[str, list[str]]] = {
    "fast": ("fast", []),
    "best": ("best", []),
    "best-distill": ("best", []),
    "muon": ("muon", []),
    "best-res3": ("best", ["model.preset=convgroups-res3"]),
}
TARGET = 0.94


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=780.0, help="stop starting runs after this")
    p.add_argument("--recipes", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    p.add_argument("--limit", type=int, default=None, help="training images (rehearsal)")
    p.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs")
    p.add_argument("--no-final", action="store_true", help="skip the 50,000-image final model")
    return p.parse_args(argv)


def config(preset: str, overrides: list[str], args: argparse.Namespace, seed: int, **extra):
    sets = [*overrides, f"seed={seed}"]
    if args.device.startswith("cuda"):
        sets += ["precision=bf16", "channels_last=true"]
    if args.epochs is not None:
        sets.append(f"epochs={args.epochs}")
    if args.limit is not None:
        sets.append(f"data.limit={args.limit}")
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_train_config("classifier", preset=preset, overrides=sets).with_data_path(args.data)


def train(cfg, data, device: str) -> tuple[torch.nn.Module, list[dict], float]:
    t0 = time.perf_counter()
    result = fit(cfg, data, device=device, progress=False)
    return result.model, result.history, time.perf_counter() - t0


def record(out: Path, name: str, seed: int, cfg, history: list[dict], wall: float) -> dict:
    accs = [h.get("val_accuracy") for h in history]
    reached = next((h["train_time_s"] for h in history
                    if (h.get("val_accuracy") or 0) >= TARGET), None)
    row = {"recipe": name, "seed": seed, "val_accuracy": accs[-1], "epochs": cfg.epochs,
           "train_time_s": history[-1]["train_time_s"], "wall_s": round(wall, 1),
           "time_to_94_s": reached, "val_curve": accs}
    with open(out / "runs.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{name} seed {seed}: val {accs[-1]}, {row['train_time_s']:.1f}s train, "
          f"to 94%: {reached}", flush=True)
    return row


def save(model, cfg, data, path: Path, history: list[dict]) -> None:
    save_checkpoint(path, model, model_name="classifier", model_config=cfg.model_config,
                    preprocessing=preprocessing_for(cfg, data), class_names=data.class_names,
                    metrics=history[-1], train_config=cfg.to_dict())


def summary(rows: list[dict]) -> str:
    lines = ["| recipe | val accuracy mean | std | n | seeds | train s (mean) | to 94% (runs) |",
             "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == name and r["val_accuracy"] is not None]
        if not mine:
            continue
        accs = [100 * r["val_accuracy"] for r in mine]
        std = f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "- (one run)"
        secs = statistics.mean(r["train_time_s"] for r in mine)
        hit = sum(r["time_to_94_s"] is not None for r in mine)
        lines.append(f"| {name} | {statistics.mean(accs):.2f}% | {std} | {len(accs)} | "
                     f"{' '.join(f'{a:.2f}' for a in accs)} | {secs:.1f} | {hit}/{len(mine)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    left = lambda: args.budget_s - (time.monotonic() - start)  # noqa: E731
    data = load_data(args.data, val_size=5000, seed=0, limit=args.limit, progress=False)
    rows: list[dict] = []
    teacher = args.out / "teacher"
    if "best-distill" in args.recipes:
        cfg = config("teacher", [], args, seed=0)
        model, history, wall = train(cfg, data, args.device)
        save(model, cfg, data, teacher, history)
        rows.append(record(args.out, "teacher", 0, cfg, history, wall))
    longest = 0.0
    for seed in range(args.seeds):
        for name in args.recipes:
            if left() < 1.2 * longest:
                print(f"budget: skipping {name} seed {seed}", flush=True)
                continue
            preset, overrides = STUDENTS[name]
            extra = {"distill.teacher": str(teacher)} if name == "best-distill" else {}
            cfg = config(preset, overrides, args, seed=seed, **extra)
            _, history, wall = train(cfg, data, args.device)
            longest = max(longest, wall)
            rows.append(record(args.out, name, seed, cfg, history, wall))
    (args.out / "summary.md").write_text(summary(rows))
    print(summary(rows), flush=True)
    if not args.no_final and left() > 1.5 * longest:
        final_model(args, rows, teacher)
    return 0


def final_model(args: argparse.Namespace, rows: list[dict], teacher: Path) -> None:
    """The recipe with the best mean, trained once on all 50,000 images, seed 0."""
    students = [r for r in rows if r["recipe"] != "teacher" and r["val_accuracy"] is not None]
    means = {n: statistics.mean(r["val_accuracy"] for r in students if r["recipe"] == n)
             for n in dict.fromkeys(r["recipe"] for r in students)}
    name = max(means, key=means.get)
    preset, overrides = STUDENTS[name]
    extra = {"distill.teacher": str(teacher)} if name == "best-distill" else {}
    cfg = config(preset, overrides, args, seed=0, **{"data.val_size": 0, **extra})
    data = load_data(args.data, val_size=0, seed=0, limit=args.limit, progress=False)
    model, history, wall = train(cfg, data, args.device)
    save(model, cfg, data, args.out / "final", history)
    print(f"final: {name} on {len(data.train)} images, {wall:.1f}s", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
