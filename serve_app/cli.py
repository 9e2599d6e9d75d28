"""``mve serve``, ``mve predict`` and ``mve generate``.

    mve serve --classifier runs/clf --vae runs/vae --port 8000 --metrics-port 8080
    mve predict cat.png dog.jpg --top-k 3                    # in this process, no server
    mve predict cat.png dog.jpg --top-k 3 --url http://127.0.0.1:8000
    mve generate --n 16 --temperature 0.8 --seed 0 --out grid.png          # via a server
    mve generate --vae models/cifar10-vae --mode variations --image cat.png --out var.png

Also runnable without the ``mve`` command: ``python -m serve_app.cli serve --classifier runs/clf``.
The ``*_parent`` functions (argparse parent parsers) use argparse only; ``serve_command`` imports Ray when it
runs, ``predict_command``/``generate_command`` never do: they run the model in this process
(:mod:`mve.api`) or ask a server (:mod:`serve_app.client`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mve.atomic import write_bytes
from mve.errors import UserError, run_command
from mve.inference import SERVING_TTA
from serve_app.embedded import apply_default_models, serve_command, serve_parent

__all__ = ["serve_parent", "predict_parent", "generate_parent",
           "apply_default_models", "serve_command", "predict_command", "generate_command",
           "generate_local", "main"]


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="server URL (default $MVE_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key-file", help="file with the API key (default $MVE_API_KEY)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (60)")


def predict_parent() -> argparse.ArgumentParser:
    """Options of ``mve predict``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="print the JSON answer (the server's "
                   "/v1/classify shape, also when run locally)")
    p.add_argument("--classifier", metavar="DIR|NAME",
                   help="classify in this process with this checkpoint (a directory, URI or "
                        "shipped name; 'default' means cifar10-classifier). The default when "
                        "neither --url nor $MVE_URL is given")
    p.add_argument("--tta", choices=["none", "flip", "flip_translate"],
                   help=f"local only: test-time augmentation (default {SERVING_TTA}, as the "
                        "server's)")
    p.add_argument("--device", default="cpu", help="local only: cpu, cuda, ... (default cpu)")
    _client_options(p)
    return p


_MODES = ("sample", "variations", "interpolate")
_DEFAULT_N = {"sample": 16, "variations": 8, "interpolate": 8}


def generate_parent() -> argparse.ArgumentParser:
    """Options of ``mve generate``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--vae", metavar="DIR", help="run this VAE checkpoint locally (no server); "
                   "'default' means models/cifar10-vae")
    p.add_argument("--mode", choices=_MODES, default="sample",
                   help="sample: a grid of prior samples; variations: a grid of decodes around "
                        "one --image; interpolate: a strip between two --image files")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="input image (PNG/JPEG): one for variations, two for interpolate")
    p.add_argument("--n", type=int, help="samples / variations / interpolation steps "
                   "(default 16 / 8 / 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="prior temperature (1.0)")
    p.add_argument("--seed", type=int, help="seed for reproducible samples")
    p.add_argument("--prior", choices=["standard", "gmm", "diffusion"],
                   help="--vae only: sample from N(0, I), the fitted GMM or the diffusion prior "
                        "(default: the diffusion prior in the VAE's prior/ folder if any, else "
                        "the checkpoint's prior)")
    p.add_argument("--steps", type=int, help="diffusion sampler steps (default 16)")
    p.add_argument("--method", choices=["slerp", "lerp"], default="slerp",
                   help="interpolation path (default slerp)")
    p.add_argument("--device", default="cpu", help="--vae only: cpu, cuda, ... (default cpu)")
    p.add_argument("--out", default="grid.png", help="output PNG grid (default grid.png)")
    _client_options(p)
    return p


def _client(args: argparse.Namespace) -> Any:
    from serve_app.client import MveClient

    key = None
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).expanduser().read_text().strip()
        except OSError as exc:
            raise UserError(f"cannot read the API key file: {exc}") from None
    return MveClient(args.url, api_key=key, timeout=args.timeout)


def _predict_local(args: argparse.Namespace) -> dict[str, Any]:
    from mve.api import Classifier, load

    name = "cifar10-classifier" if args.classifier in (None, "default") else args.classifier
    clf = load(name, device=args.device, tta=args.tta or SERVING_TTA)
    if not isinstance(clf, Classifier):
        raise UserError(f"{name} is a {clf.kind} checkpoint, not a classifier")
    return {"model": "classifier", "checkpoint_id": clf.checkpoint_id,
            "predictions": clf.top_k_dicts(list(args.images), args.top_k)}


def _predict_remote(args: argparse.Namespace) -> dict[str, Any]:
    blobs = []
    for name in args.images:
        try:
            blobs.append(Path(name).read_bytes())
        except OSError as exc:
            raise UserError(f"cannot read {name}: {exc}") from None
    return _client(args).classify(blobs, top_k=args.top_k)  # a ClientError is a UserError


def predict_command(args: argparse.Namespace) -> int:
    """Prints the top-k classes of each image: in this process, or from a server with --url."""
    remote = bool(args.url or os.environ.get("MVE_URL"))
    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    if args.classifier and args.url:
        raise UserError("--classifier runs the model here and --url asks a server: pass one")
    if remote and not args.classifier:
        if args.tta or args.device != "cpu":
            raise UserError("--tta and --device apply to a local model; a server uses its own "
                            "(mve serve --tta)")
        out = _predict_remote(args)
    else:
        out = _predict_local(args)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for name, pred in zip(args.images, out["predictions"], strict=True):
        scores = "  ".join(f"{s['label']} {100 * s['probability']:.1f}%" for s in pred["top_k"])
        print(f"{name}: {scores}")
    print(f"(model {out['checkpoint_id']})", file=sys.stderr)
    return 0


def _generate_inputs(args: argparse.Namespace) -> tuple[str, int, list[bytes]]:
    mode = getattr(args, "mode", None) or "sample"
    n = args.n if args.n is not None else _DEFAULT_N[mode]
    images = list(getattr(args, "image", None) or [])
    need = {"sample": 0, "variations": 1, "interpolate": 2}[mode]
    if len(images) != need:
        raise UserError(f"--mode {mode} needs {need} --image file(s), got {len(images)}")
    if n < (2 if mode == "interpolate" else 1):
        raise UserError(f"--n must be >= {2 if mode == 'interpolate' else 1}, got {n}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    blobs = []
    for name in images:
        try:
            blobs.append(Path(name).read_bytes())
        except OSError as exc:
            raise UserError(f"cannot read {name}: {exc}") from None
    return mode, n, blobs


def generate_local(vae: str, mode: str, n: int, blobs: list[bytes], *, temperature: float = 1.0,
                   seed: int | None = None, prior: str | None = None, method: str = "slerp",
                   device: str = "cpu", steps: int | None = None) -> bytes:
    """PNG bytes of a sample/variations grid or an interpolation strip from a local VAE."""
    import math

    from mve.api import Generator, load
    from mve.images import encode_png, make_grid

    model = load("cifar10-vae" if vae == "default" else vae, device=device)
    if not isinstance(model, Generator):
        raise UserError(f"{vae} is a {model.kind} checkpoint, not a VAE")
    if mode == "sample":
        y = model.sample(n, temperature=temperature, seed=seed, prior=prior, steps=steps)
    elif mode == "variations":
        y = model.variations(blobs[0], n, temperature=temperature, seed=seed)
    else:
        y = model.interpolate(blobs[0], blobs[1], n, method=method)
    nrow = n if mode == "interpolate" else math.ceil(math.sqrt(n))
    return encode_png(make_grid(y.permute(0, 2, 3, 1).numpy(), nrow=nrow))


def generate_command(args: argparse.Namespace) -> int:
    """Writes a PNG grid of VAE samples or variations, or an interpolation strip."""
    mode, n, blobs = _generate_inputs(args)
    if getattr(args, "vae", None):
        png = generate_local(args.vae, mode, n, blobs, temperature=args.temperature,
                             seed=args.seed, prior=args.prior, method=args.method,
                             device=args.device, steps=args.steps)
    else:
        if getattr(args, "prior", None):
            raise UserError("--prior needs --vae (the server samples from its checkpoint's "
                            "prior)")
        client = _client(args)  # its ClientError is a UserError: one line, exit code 2
        if mode == "sample":
            png = client.sample(n=n, temperature=args.temperature, seed=args.seed,
                                steps=args.steps)
        elif mode == "variations":
            png = client.variations(blobs[0], n=n, temperature=args.temperature, seed=args.seed)
        else:
            png = client.interpolate(blobs[0], blobs[1], steps=n)
    out = write_bytes(args.out, png)
    what = {"sample": "samples", "variations": "variations", "interpolate": "steps"}[mode]
    print(f"wrote {out} ({n} {what})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m serve_app.cli {serve,predict,generate} ...`` (same as the ``mve`` commands)."""
    parser = argparse.ArgumentParser(prog="python -m serve_app.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[serve_parent()], help="serve checkpoints over HTTP")
    sub.add_parser("predict", parents=[predict_parent()], help="classify images (locally or "
                   "via a server)")
    sub.add_parser("generate", parents=[generate_parent()], help="VAE samples via a server")
    args = parser.parse_args(argv)
    commands = {"serve": serve_command, "predict": predict_command, "generate": generate_command}
    return run_command(commands[args.command], args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
