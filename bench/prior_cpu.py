"""Issue 15 on the CPU: train a small latent diffusion prior for the shipped VAE and compare its
samples with the GMM prior's, by one FID protocol for every row.

    python bench/prior_cpu.py --data ../shared/data/cifar10-train-jpeg.tar.gz \
        --out /tmp/prior-cpu [--preset small --epochs 8 --fid-n 5000]

Protocol (Inception-v3 pool features, ``mve.fid``): every row compares ``--fid-n`` images with
the same ``--fid-n`` seeded training images; the validation rows use a seeded, stratified
sample of ``--fid-n`` validation images. At n = 2,000 FID is biased upwards against the usual 10k/50k (the field's
convention is 50,000 samples against all training images; see the GPU script for that), so
only rows of one table compare. The data is JPEG (quality ~75): no row is comparable with
published CIFAR-10 FIDs.

Rows: real-vs-real (validation vs train: the floor at this n), rFID (reconstructions of the
validation images: the decoder's floor), GMM samples, diffusion samples per step count, and
the diffusion samples against the validation images (far below the train figure would mean
memorisation). Writes ``results.json``, ``summary.md``, sample grids per step count, a grid of
nearest training neighbours and the FID-vs-steps plot under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mve.checkpoint import load_checkpoint  # noqa: E402
from mve.data import denormalize_to_uint8, load_data, showcase  # noqa: E402
from mve.fid import (  # noqa: E402
    InceptionFeatures,
    compute_features,
    feature_stats,
    frechet_distance,
    kernel_inception_distance,
    reference_features,
)
from mve.images import encode_png, make_grid  # noqa: E402
from mve.models import make_config  # noqa: E402
from mve.prior_train import PriorTrainConfig, load_prior, train_prior  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--vae", default="models/cifar10-vae")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--preset", default="small", help="prior architecture preset")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--limit", type=int, help="training images (rehearsal)")
    p.add_argument("--fid-n", type=int, default=2000)
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-training", action="store_true", help="reuse OUT/prior")
    return p.parse_args(argv)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return denormalize_to_uint8(x.float().cpu(), [0.5] * 3, [0.5] * 3)


def _generated(fn, n: int, batch: int = 250) -> torch.Tensor:
    return torch.cat([_to_uint8(fn(min(batch, n - i), i // batch)) for i in range(0, n, batch)])


def _score(name: str, fake: torch.Tensor, ref: dict, extractor, rows: dict) -> None:
    feats = compute_features(extractor, fake, progress=True, desc=name)
    mu, sigma = feature_stats(feats)
    kid, kid_std = kernel_inception_distance(ref["features"], feats, subsets=50,
                                             subset_size=min(1000, len(feats)))
    rows[name] = {"fid": frechet_distance(ref["mu"], ref["sigma"], mu, sigma), "kid": kid,
                  "kid_std": kid_std, "features": feats}
    print(f"{name}: FID {rows[name]['fid']:.2f}, KID {kid:.4f}", flush=True)


def _grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    path.write_bytes(encode_png(make_grid(images.permute(0, 2, 3, 1).numpy(), nrow=nrow)))


def _neighbours(samples: torch.Tensor, train: torch.Tensor, path: Path, k: int = 6) -> None:
    """Each row: a sample, then its ``k`` nearest training images (pixel L2)."""
    flat = train.flatten(1).float()
    rows = []
    for s in samples:
        d = (flat - s.flatten().float()).pow(2).sum(1)
        rows += [s, *train[d.topk(k, largest=False).indices]]
    _grid(torch.stack(rows), path, nrow=k + 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_data(args.data, val_size=5000, seed=0, limit=args.limit, progress=True)
    vae = load_checkpoint(args.vae, device=args.device)
    prior_dir = args.out / "prior"
    t0 = time.perf_counter()
    if not args.skip_training:
        cfg = PriorTrainConfig(epochs=args.epochs, lr=args.lr, warmup_steps=200)
        train_prior(vae, data.train.images, data.val.images, prior_dir,
                    model_config=make_config("prior", {}, preset=args.preset), cfg=cfg,
                    device=args.device, progress=True)
    train_s = time.perf_counter() - t0
    prior = load_prior(prior_dir, vae=vae, device=args.device)
    model = vae.model
    model.set_diffusion_prior(prior.model)
    results = evaluate(args, data, model)
    results.update(train_s=round(train_s, 1), preset=args.preset, epochs=args.epochs,
                   prior_params=sum(p.numel() for p in prior.model.parameters()),
                   history=json.loads((prior_dir / "history.json").read_text()))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "summary.md").write_text(summary(results))
    print(summary(results))
    return 0


@torch.no_grad()
def evaluate(args: argparse.Namespace, data, model) -> dict:
    n = args.fid_n
    extractor = InceptionFeatures(None, device=args.device)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data.train), generator=g)[:n].sort().values
    ref = reference_features(extractor, data.train.images[idx], fingerprint=json.dumps(
        ["prior_cpu", data.provenance.get("sha256"), n]), progress=True)
    rows: dict[str, dict] = {}
    # a stratified sample: the split keeps the class-sorted source's order (its first 1,000
    # images are airplanes and automobiles)
    val = showcase(data.val, n, len(data.class_names)).images
    _score("real (validation) vs train", val, ref, extractor, rows)
    recon = _generated(lambda k, i: model.reconstruct(val[i * 250:i * 250 + k].float()
                                                      / 127.5 - 1), n)
    _score("rFID: reconstructions of validation", recon, ref, extractor, rows)
    _score("GMM prior (10 components), T=1", _generated(
        lambda k, i: model.sample(k, seed=i, prior="gmm"), n), ref, extractor, rows)
    speed = {}
    for steps in args.steps:
        t = time.perf_counter()
        fake = _generated(lambda k, i, s=steps: model.sample(k, seed=i, steps=s), n)
        speed[steps] = n / (time.perf_counter() - t)
        _score(f"diffusion prior, {steps} steps", fake, ref, extractor, rows)
        _grid(fake[:64], args.out / f"samples_{steps}steps.png")
    _neighbours(fake[:8], data.train.images, args.out / "nearest_neighbours.png")
    val_mu, val_sigma = feature_stats(rows["real (validation) vs train"]["features"])
    last = rows[f"diffusion prior, {args.steps[-1]} steps"]
    mu, sigma = feature_stats(last["features"])
    memo = frechet_distance(val_mu, val_sigma, mu, sigma)
    _plot(args, rows)
    return {"fid_n": n, "rows": {k: {m: v for m, v in r.items() if m != "features"}
                                 for k, r in rows.items()},
            f"diffusion {args.steps[-1]} steps vs validation": memo,
            "samples_per_s": {str(k): round(v, 1) for k, v in speed.items()}}


def _plot(args: argparse.Namespace, rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(args.steps, [rows[f"diffusion prior, {s} steps"]["fid"] for s in args.steps],
            "o-", label="diffusion prior")
    ax.axhline(rows["GMM prior (10 components), T=1"]["fid"], color="C1", ls="--", label="GMM")
    ax.axhline(rows["rFID: reconstructions of validation"]["fid"], color="C2", ls=":",
               label="reconstructions")
    ax.set(xlabel="sampler steps (Heun)", ylabel=f"FID (n={args.fid_n})", xscale="log")
    ax.set_xticks(args.steps, [str(s) for s in args.steps])
    ax.minorticks_off()
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "fid_vs_steps.png", dpi=120)


def summary(r: dict) -> str:
    lines = [f"FID and KID against {r['fid_n']} training images (Inception-v3; n={r['fid_n']} "
             "per row, one prior, one run; JPEG data: not comparable with published FIDs)", "",
             "| row | FID | KID |", "|---|---|---|"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {row['fid']:.2f} | {row['kid']:.4f} ± {row['kid_std']:.4f} |")
    memo = next(k for k in r if k.endswith("vs validation"))
    lines += ["", f"{memo}: FID {r[memo]:.2f}",
              f"sampler + decoder speed (samples/s, CPU): {r['samples_per_s']}",
              f"prior: preset {r['preset']}, {r['prior_params']:,} parameters, {r['epochs']} "
              f"epochs; encoding + training {r['train_s']:.0f} s"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
