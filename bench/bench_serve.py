"""Serving benchmark: mve on Ray Serve (dynamic batching on/off) vs a minimal FastAPI server.

    python bench/bench_serve.py                       # ~3 min on 2 CPUs; prints a markdown table
    python bench/bench_serve.py --out bench-serve.md --duration 8

Closed-loop load (``aiohttp``, N concurrent clients sending back to back) on loopback against:

- **serve, batched**: ``serve_app/config.yaml`` with 1 ingress + 1 classifier replica,
  ``@serve.batch`` (``max_batch_size=32``, ``batch_wait_timeout_s=0.005``);
- **serve, unbatched**: the same app after an in-place ``user_config`` update to
  ``max_batch_size=1`` (the live ``set_max_batch_size`` path);
- **fastapi baseline**: one uvicorn process, one ``async`` route decoding the PNG and running the
  same checkpoint with torch (no batching, no Ray), written below.

Each measures single-image ``POST /v1/classify`` (raw PNG) at concurrency 1, 8 and 32, and
images/s for requests of 64 images (base64 JSON). The model is the default-architecture
classifier (untrained weights; compute is what matters). Client and servers share the machine,
so absolute numbers are a lower bound; the comparison is what the table is for.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the (string) annotation here

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# -- the baseline server ---------------------------------------------------------------------

def run_baseline_server(port: int, checkpoint: str, threads: int) -> None:
    """A minimal FastAPI + uvicorn + torch server of the same checkpoint (no Ray, no batching)."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from PIL import Image

    from mve.checkpoint import load_checkpoint
    from mve.data import normalize

    torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    prep, names = ckpt.preprocessing, ckpt.class_names
    app = FastAPI()

    def predict(blobs: list[bytes]) -> list[dict[str, Any]]:
        pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
        x = normalize(torch.from_numpy(pixels).permute(0, 3, 1, 2), prep["mean"], prep["std"])
        with torch.inference_mode():
            probs = ckpt.model(x).softmax(-1)
        top = probs.topk(5, dim=1)
        return [{"label": names[int(i[0])], "top_k": [{"label": names[int(j)], "probability":
                 float(p)} for p, j in zip(v, i, strict=True)]} for v, i in zip(*top, strict=True)]

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict[str, Any]:
        body = await request.body()
        if request.headers.get("content-type", "").startswith("application/json"):
            blobs = [base64.b64decode(s) for s in json.loads(body)["images"]]
        else:
            blobs = [body]
        return {"predictions": predict(blobs)}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- load generation -------------------------------------------------------------------------

async def _load(url: str, body: bytes, ctype: str, concurrency: int, warmup_s: float,
                duration_s: float) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    t_measure, t_end = start + warmup_s, start + warmup_s + duration_s
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(
            limit=concurrency)) as session:

        async def client() -> None:
            nonlocal errors
            while (now := time.perf_counter()) < t_end:
                try:
                    async with session.post(url, data=body,
                                            headers={"Content-Type": ctype}) as r:
                        await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError:
                    ok = False
                done = time.perf_counter()
                if now >= t_measure and ok:
                    latencies.append(done - now)
                elif now >= t_measure:
                    errors += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
    lat = sorted(latencies)
    return {"requests": len(lat), "errors": errors, "rps": len(lat) / duration_s,
            "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else
            float("nan")}


def measure(url: str, body: bytes, ctype: str, concurrency: int, duration_s: float,
            warmup_s: float = 1.0) -> dict[str, Any]:
    """Closed-loop load at ``concurrency`` for ``duration_s`` after a warm-up."""
    return asyncio.run(_load(url, body, ctype, concurrency, warmup_s, duration_s))


def _wait_http(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


# -- the run ---------------------------------------------------------------------------------

def _serve_config(checkpoint: str, port: int, threads: int) -> dict[str, Any]:
    from serve_app.deploy import app_config, load_config

    cfg = app_config(load_config(), classifier=checkpoint, vae=None, host="127.0.0.1",
                     port=port, torch_threads=threads)
    for dep in cfg["applications"][0]["deployments"]:
        dep["autoscaling_config"].update(min_replicas=1, max_replicas=1)
        if dep["name"] == "Classifier":
            dep["ray_actor_options"]["num_cpus"] = 1
    return cfg


def run(args: argparse.Namespace) -> str:
    import ray
    import torch
    from ray import serve

    from serve_app.deploy import deploy, set_user_config
    from serve_app.testing import free_port, make_classifier, png_bytes, random_images

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    ckpt = args.classifier or str(make_classifier(tmp / "clf", values={}))
    img = png_bytes(random_images(1, seed=0)[0])
    batch = json.dumps({"images": [base64.b64encode(png_bytes(i)).decode()
                                   for i in random_images(64, seed=1)]}).encode()
    rows: list[tuple[str, str, int, dict[str, Any]]] = []
    big_rows: list[tuple[str, int, dict[str, Any]]] = []

    def scenario(name: str, batching: str, url: str) -> None:
        for c in args.concurrency:
            r = measure(url + "/v1/classify", img, "image/png", c, args.duration)
            rows.append((name, batching, c, r))
            print(f"{name:17s} {batching:9s} c={c:<3d} {r['rps']:7.1f} req/s  p50 "
                  f"{r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  errors {r['errors']}",
                  flush=True)
        r = measure(url + "/v1/classify", batch, "application/json", args.big_concurrency,
                    args.duration)
        big_rows.append((f"{name} ({batching})", args.big_concurrency, r))
        print(f"{name:17s} {batching:9s} 64-image requests: {64 * r['rps']:7.1f} images/s",
              flush=True)

    bport = free_port()
    baseline = subprocess.Popen([sys.executable, __file__, "--baseline-server", str(bport),
                                 "--classifier", ckpt, "--threads", str(args.threads)])
    try:
        _wait_http(f"http://127.0.0.1:{bport}/health")
        scenario("fastapi baseline", "none", f"http://127.0.0.1:{bport}")
    finally:
        baseline.terminate()
        baseline.wait(timeout=30)
    port = free_port()
    cfg = _serve_config(ckpt, port, args.threads)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        deploy(cfg)
        url = f"http://127.0.0.1:{port}"
        scenario("ray serve", "batch 32", url)
        deploy(set_user_config(cfg, "classifier", max_batch_size=1))
        scenario("ray serve", "none", url)
    finally:
        serve.shutdown()
        ray.shutdown()
    return report(rows, big_rows, args, torch.__version__, ray.__version__)


def report(rows: list, big_rows: list, args: argparse.Namespace, torch_version: str,
           ray_version: str) -> str:
    """The markdown section."""
    lines = [
        "## Serving (`bench/bench_serve.py`)", "",
        f"Command: `python bench/bench_serve.py --duration {args.duration}`", "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs (clients and servers share "
        f"them), torch {torch_version} ({args.threads} threads per model process), "
        f"ray {ray_version}. Default-architecture classifier; closed-loop clients on loopback, "
        f"{args.duration:g} s per point after 1 s warm-up. Ray Serve: 1 ingress + 1 classifier "
        "replica from `serve_app/config.yaml`; unbatched = in-place `max_batch_size=1`.", "",
        "Single-image `POST /v1/classify` (raw PNG):", "",
        "| server | dynamic batching | concurrency | req/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, batching, c, r in rows:
        lines.append(f"| {name} | {batching} | {c} | {r['rps']:.0f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['errors']} |")
    lines += ["", f"Requests of 64 images (base64 JSON), concurrency {args.big_concurrency}:", "",
              "| server | images/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|"]
    for name, _, r in big_rows:
        lines.append(f"| {name} | {64 * r['rps']:.0f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{r['errors']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classifier", help="checkpoint to serve (default: a fresh default-size one)")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per point (6)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--big-concurrency", type=int, default=4,
                   help="concurrency of the 64-image requests (4)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per model process (2)")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--baseline-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline_server:
        run_baseline_server(args.baseline_server, args.classifier, args.threads)
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    text = run(args)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
