"""Accuracy and CPU speed of each test-time augmentation (TTA) mode and serving precision of a
classifier checkpoint.

    python bench/bench_tta.py [--checkpoint models/cifar10-classifier]
        [--data ../shared/data/cifar10-train-jpeg.tar.gz] [--threads 2] [--repeats 7]
        [--precisions fp32 bf16] [--out FILE.md]

Accuracy is on exactly the validation split ``mve evaluate`` uses (the checkpoint's recorded
``val_size`` and ``split_seed``, its mean/std, batch 500), in eval mode, which is deterministic:
one checkpoint, one evaluation, n=1. The 95% interval is the Wilson score interval of that
accuracy over the validation images; "differs" counts images whose predicted class is not the
``none`` prediction of the same precision, "differs from fp32" those whose class is not the
fp32 prediction of the same mode (bf16 is :class:`mve.inference.Precision`, as served). Speed is the model alone (no decoding or HTTP) on the CPU with ``--threads``
threads: the median of ``--repeats`` timed loops per (mode, batch), each after two untimed calls;
the repeats are interleaved across modes and batches so that other load on the machine spreads
over all cells alike.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from mve.checkpoint import load_checkpoint
from mve.data import TensorLoader, load_data
from mve.inference import Precision, for_inference

MODES = ("none", "flip", "flip_translate")
BATCHES = (1, 8, 32)
ROOT = Path(__file__).resolve().parents[1]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of the proportion k/n."""
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return centre - half, centre + half


def load(checkpoint: str, data_path: str) -> tuple:
    """(checkpoint, validation loader) split exactly as ``mve evaluate`` splits it."""
    ckpt = load_checkpoint(checkpoint)
    prov = ckpt.meta.get("provenance") or {}
    prep = ckpt.preprocessing
    data = load_data(data_path, val_size=int(prov.get("val_size", 5000)),
                     seed=int(prov.get("split_seed", 0)), image_size=int(prep["input_size"][0]),
                     progress=sys.stderr.isatty())
    if ckpt.class_names and list(data.class_names) != list(ckpt.class_names):
        raise SystemExit(f"the data's classes {data.class_names} differ from {ckpt.class_names}")
    loader = TensorLoader(data.split("val"), batch_size=500, mean=prep["mean"], std=prep["std"])
    return ckpt, loader


@torch.inference_mode()
def predictions(model: torch.nn.Module, loader: TensorLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, labels) of every validation image, in loader order."""
    model.eval()
    preds, labels = [], []
    for x, y in loader:
        preds.append(model(x).argmax(1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


@torch.inference_mode()
def speed(models: dict[str, Precision], images: torch.Tensor,
          repeats: int) -> dict[tuple[str, str, int], float]:
    """Median seconds per forward call for each (precision, mode, batch), repeats interleaved."""
    cells = [(p, m, b) for p in models for m in MODES for b in BATCHES]
    loops = {b: max(2, 64 // b) for b in BATCHES}  # ~0.1-0.5 s per timed loop
    times: dict[tuple[str, str, int], list[float]] = {c: [] for c in cells}
    for rep in range(repeats + 1):  # the first round is a warm-up
        for prec, mode, b in cells:
            model = models[prec]
            model.set_tta(mode)
            x = images[:b]
            model(x), model(x)  # untimed: the first calls after a shape change run slower
            t = time.perf_counter()
            for _ in range(loops[b]):
                model(x)
            if rep:
                times[(prec, mode, b)].append((time.perf_counter() - t) / loops[b])
    return {c: statistics.median(v) for c, v in times.items()}


def table(rows: list[dict], header: str) -> str:
    cols = ["precision", "mode", "views", "val accuracy", "95% Wilson", "differs from none",
            "differs from fp32",
            *(f"img/s @ b={b}" for b in BATCHES), "ms per b=1 call"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lo, hi = r["ci"]
        cells = [r["precision"], f"`{r['mode']}`", str(r["views"]), f"{100 * r['acc']:.2f}%",
                 f"{100 * lo:.2f}-{100 * hi:.2f}%", f"{r['differs']:,}", f"{r['vs_fp32']:,}",
                 *(f"{b / r['s'][b]:.0f}" for b in BATCHES), f"{1e3 * r['s'][1]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def accuracy_rows(models: dict[str, Precision], loader: TensorLoader) -> list[dict]:
    """One row per (precision, mode): accuracy, its interval and the changed predictions."""
    rows, preds = [], {}
    for prec, model in models.items():
        for mode in MODES:
            model.set_tta(mode)
            t = time.perf_counter()
            pred, labels = predictions(model, loader)
            preds[(prec, mode)] = pred
            k, n = int((pred == labels).sum()), len(labels)
            fp32 = preds.get(("fp32", mode), pred)
            rows.append({"precision": prec, "mode": mode, "views": {"none": 1, "flip": 2}.get(mode, 6),
                         "acc": k / n, "ci": wilson(k, n), "n": n,
                         "differs": int((pred != preds[(prec, "none")]).sum()),
                         "vs_fp32": int((pred != fp32).sum())})
            print(f"{prec} {mode}: {k}/{n} correct ({time.perf_counter() - t:.1f} s)",
                  file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / "models" / "cifar10-classifier"))
    p.add_argument("--data",
                   default=str(ROOT.parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"))
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=7, help="timed loops per cell (median; >= 5)")
    p.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                   help="serving precisions to compare (fp32 always runs first)")
    p.add_argument("--as-loaded", action="store_true", help="time the model as load_checkpoint "
                   "returns it (default: as mve serves it, mve.inference.for_inference)")
    p.add_argument("--out", help="also write the Markdown table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt, loader = load(args.checkpoint, args.data)
    model, shipped_mode = ckpt.model, ckpt.model.config.tta
    if not args.as_loaded:
        for_inference(model)
    precisions = ["fp32", *(x for x in args.precisions if x != "fp32")]
    models = {prec: Precision(model, prec).eval() for prec in precisions}
    rows = accuracy_rows(models, loader)
    images = next(iter(loader))[0][:max(BATCHES)]
    s = speed(models, images, max(5, args.repeats))
    for r in rows:
        r["s"] = {b: s[(r["precision"], r["mode"], b)] for b in BATCHES}
    recorded = ckpt.metrics.get("val_accuracy")
    header = (f"### TTA modes of `{ckpt.checkpoint_id}` ({time.strftime('%Y-%m-%d')})\n\n"
              f"`python bench/bench_tta.py {' '.join(sys.argv[1:] if argv is None else argv)}` - "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU. "
              f"Validation split of {rows[0]['n']:,} images (n=1: one checkpoint, deterministic "
              f"eval); shipped mode `{shipped_mode}`, recorded val accuracy "
              f"{'?' if recorded is None else f'{100 * recorded:.2f}%'}. Speed: model only "
              f"({'as loaded' if args.as_loaded else 'as served: channels-last weights'}), "
              f"median of {max(5, args.repeats)} interleaved timed loops.")
    text = table(rows, header)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
