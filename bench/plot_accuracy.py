"""Validation accuracy against epochs for the classifier presets, from run histories.

    python bench/plot_accuracy.py bench/results/h200-2026-11-28 --out FILE.png

Reads ``<run>.json`` (a run's ``history.json``) for the runs named on the command line (default:
seed, fast, best) and draws one curve per run; prints a Markdown table of the same numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--runs", nargs="+", default=["seed", "fast", "best"])
    p.add_argument("--out", default=None, help="PNG to write")
    args = p.parse_args(argv)
    hist = {r: json.loads((Path(args.folder) / f"{r}.json").read_text()) for r in args.runs}
    epochs = sorted({h["epoch"] for rows in hist.values() for h in rows})
    marks = [e for e in epochs if e <= 10 or e % 10 == 0]
    print("| epoch | " + " | ".join(args.runs) + " |")
    print("|---" * (len(args.runs) + 1) + "|")
    for e in marks:
        cells = []
        for r in args.runs:
            row = next((h for h in hist[r] if h["epoch"] == e), None)
            cells.append(f"{100 * row['val_accuracy']:.2f}" if row else "")
        print(f"| {e} | " + " | ".join(cells) + " |")
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in args.runs:
            ax.plot([h["epoch"] for h in hist[r]], [100 * h["val_accuracy"] for h in hist[r]],
                    marker=".", label=r)
        ax.axhline(90, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title("CIFAR-10 classifier presets (5,000 held-out JPEG images)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
