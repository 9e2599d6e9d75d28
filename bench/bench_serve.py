"""Serving benchmark: mve against what users would run instead, side by side in one run.

    python bench/bench_serve.py                                   # ~30 min on 2 cores
    python bench/bench_serve.py --tta flip_translate none --out bench-serve.md
    python bench/bench_serve.py --setups mve bare-batched --rounds 1 --duration 3   # a smoke run

Every setup of :mod:`serve_setups` serves the shipped classifier (``models/cifar10-classifier``)
with the same test-time augmentation; ``wrk`` (C, closed loop, one thread) sends single-image
requests in three formats: ``raw`` (``POST /v1/classify``, image/jpeg), ``json`` (the same, base64
JSON) and ``oip`` (``POST /v2/models/classifier/infer``, the Open Inference Protocol with Triton's
binary extension, as ``tritonclient`` sends it), at each concurrency. The image is a real
CIFAR-10 JPEG from the shared archive.

Interleaved: each round starts the setups one at a time in a new random order, measures every
format and concurrency (1 s warm-up, then ``--duration`` s), and stops it; the table gives the
median over rounds of req/s, p50/p99 latency, errors, the mean batch size the server reported
and the server's CPU-ms per request (all its processes, from /proc), and each mve figure's ratio
to the fastest peer. The run aborts when the machine is busy: before it starts (load average)
and during each measurement (CPU used by processes that are neither the server nor wrk).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))

import serve_setups as S  # noqa: E402
from proc_cpu import CpuMeter  # noqa: E402
from wrk import run_wrk  # noqa: E402

REPO = S.REPO
PEERS = ("bare", "bare-batched", "litserve", "triton")
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"


@dataclass
class Point:
    setup: str
    fmt: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    mean_batch: float | None
    cpu_ms_per_request: float
    cpu_by_process: dict[str, float]  # ms per request
    foreign_cores: float


class MachineBusy(RuntimeError):
    pass


# -- inputs ------------------------------------------------------------------------------------

def tta_checkpoint(src: Path, mode: str, out: Path) -> Path:
    """A copy of the checkpoint with ``tta`` set in its config (what every setup loads)."""
    sys.path.insert(0, str(REPO))
    from mve.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(src)
    ckpt.model.set_tta(mode)
    return save_checkpoint(out, ckpt.model, model_name=ckpt.model_name,
                           model_config=ckpt.model.config, preprocessing=ckpt.preprocessing,
                           class_names=ckpt.class_names, metrics=ckpt.metrics)


def request_bodies(work: Path) -> dict[str, tuple[Path, str, int | None]]:
    """``{format: (body file, content type, Inference-Header-Content-Length)}``."""
    import common

    if ARCHIVE.exists():
        from serve_app.testing import archive_images

        jpeg = archive_images(ARCHIVE, per_class=1)[3][1]  # a cat, as a user would send it
    else:
        jpeg = common.cifar_like_jpeg()
    # BYTES [1, 1]: what Triton's batching model takes; mve and the other peers take [N] too
    oip, hlen = common.oip_binary_body(jpeg, two_d=True)
    files = {"raw": jpeg, "json": json.dumps({"images": [base64.b64encode(jpeg).decode()]})
             .encode(), "oip": oip}
    for name, data in files.items():
        (work / f"body.{name}").write_bytes(data)
    return {"raw": (work / "body.raw", "image/jpeg", None),
            "json": (work / "body.json", "application/json", None),
            "oip": (work / "body.oip", "application/octet-stream", hlen)}


# -- measuring ---------------------------------------------------------------------------------

def measure(server: S.Server, fmt: str, body: tuple[Path, str, int | None], c: int,
            args: argparse.Namespace) -> Point:
    """One load run (after a 1 s warm-up); raises :class:`MachineBusy`."""
    path = "/v2/models/classifier/infer" if fmt == "oip" else "/v1/classify"
    url, (file, ctype, hlen) = server.base + path, body
    run_wrk(url, file, ctype, concurrency=c, duration_s=1, header_length=hlen)
    time.sleep(server.metrics_lag_s)
    before = server.stats()
    meter = CpuMeter(server.proc.pid)
    meter.start()
    w = run_wrk(url, file, ctype, concurrency=c, duration_s=args.duration, header_length=hlen)
    cpu = meter.stop(w.client_cpu_s)
    foreign = cpu.foreign_s / args.duration
    if foreign > args.max_foreign_cores:
        raise MachineBusy(f"{foreign:.2f} cores used by other processes during "
                          f"{server.name}/{fmt}/c={c}: {meter.others()}")
    time.sleep(server.metrics_lag_s)
    after = server.stats()
    batch = None
    if before and after and after[0] > before[0]:
        batch = (after[1] - before[1]) / (after[0] - before[0])
    n = max(w.requests, 1)
    return Point(server.name, fmt, c, w.rps, w.p50_ms, w.p99_ms, w.errors, batch,
                 1000 * cpu.server_s / n,
                 {k: round(1000 * v / n, 3) for k, v in cpu.by_label.items() if v > 0},
                 round(foreign, 3))


def settle(server: S.Server, args: argparse.Namespace, timeout_s: float = 60.0) -> None:
    """Waits until the machine is quiet apart from the idle server (the previous server's
    teardown, this one's start-up), measured over 2 s windows."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        meter = CpuMeter(server.proc.pid)
        meter.start()
        time.sleep(2.0)
        if meter.stop(0.0).foreign_s / 2.0 <= args.max_foreign_cores / 2:
            return
    print(f"  the machine did not settle within {timeout_s:.0f}s; measuring anyway", flush=True)


def measure_setup(name: str, ctx: S.Context, bodies: dict, args: argparse.Namespace
                  ) -> list[Point]:
    """Starts ``name``, measures each of its formats at each concurrency, stops it."""
    server = S.start(name, ctx)
    points = []
    try:
        settle(server, args)
        for fmt in (f for f in args.formats if f in server.formats):
            for c in args.concurrency:
                for attempt in (1, 2, 3):
                    try:
                        points.append(measure(server, fmt, bodies[fmt], c, args))
                        break
                    except MachineBusy as exc:
                        if attempt == 3:
                            raise
                        print(f"  busy ({exc}); measuring again", flush=True)
                        settle(server, args)
                p = points[-1]
                print(f"  {name:12s} {fmt:4s} c={c:<3d} {p.rps:7.1f} req/s  p50 {p.p50_ms:7.1f}"
                      f"  p99 {p.p99_ms:7.1f} ms  errors {p.errors}  batch "
                      f"{p.mean_batch or 0:4.1f}  {p.cpu_ms_per_request:6.1f} CPU-ms/req  "
                      f"(other processes: {p.foreign_cores:.2f} cores)",
                      flush=True)
    finally:
        server.stop()
    return points


def check_idle(max_load: float) -> float:
    """Waits up to a minute for the 1-minute load average to fall below ``max_load``."""
    for _ in range(12):
        load = os.getloadavg()[0]
        if load <= max_load:
            return load
        time.sleep(5)
    raise MachineBusy(f"load average {load:.2f} > {max_load}: the machine is busy")


def run_mode(mode: str, args: argparse.Namespace, work: Path
             ) -> tuple[list[Point], dict[str, str]]:
    """Every round of one TTA mode; returns the points and why a setup did not run."""
    ctx = S.Context(tta_checkpoint(Path(args.checkpoint), mode, work / f"ckpt-{mode}"), mode,
                    args.threads, work, S.extract_old_tree(args.old_rev, work))
    bodies = request_bodies(work)
    points: list[Point] = []
    failed: dict[str, str] = {}
    rng = random.Random(args.seed)
    for r in range(args.rounds):
        order = list(args.setups)
        rng.shuffle(order)
        print(f"TTA {mode}, round {r + 1}/{args.rounds}: {', '.join(order)}", flush=True)
        for name in order:
            if name in failed:
                continue
            try:
                points += measure_setup(name, ctx, bodies, args)
            except RuntimeError as exc:
                if isinstance(exc, MachineBusy):
                    raise
                failed[name] = " ".join(str(exc).split())[-400:]
                print(f"  {name} did not run: {failed[name]}", flush=True)
    return points, failed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setups", nargs="+", default=list(S.SETUPS), choices=S.SETUPS)
    p.add_argument("--tta", nargs="+", default=["flip_translate"],
                   choices=["none", "flip", "flip_translate"],
                   help="TTA modes, each a full comparison (default: the shipped model's)")
    p.add_argument("--formats", nargs="+", default=list(S.ALL_FORMATS), choices=S.ALL_FORMATS)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the table gives medians (3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of the peers (default: the machine's CPUs, as torch)")
    p.add_argument("--checkpoint", default=str(REPO / "models" / "cifar10-classifier"))
    p.add_argument("--old-rev", default="43b76df",
                   help="git revision of the old data plane (mve-old; default: the last commit "
                        "before the one-hop change)")
    p.add_argument("--max-load", type=float, default=1.0,
                   help="refuse to start above this 1-minute load average (1.0)")
    p.add_argument("--max-foreign-cores", type=float, default=0.3, help="abort when other "
                   "processes use more than this many cores during a measurement (0.3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the setup order")
    p.add_argument("--out", help="also write the markdown report to this file")
    p.add_argument("--json", help="also write every measurement to this JSON file")
    args = p.parse_args()
    from serve_report import report

    load = check_idle(args.max_load)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    results = {}
    for mode in args.tta:
        results[mode] = run_mode(mode, args, work)
    text = report(results, args, machine=f"{platform.platform()}, {os.cpu_count()} CPUs, "
                  f"load average {load:.2f} at the start")
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {m: {"points": [asdict(x) for x in pts], "did_not_run": failed}
             for m, (pts, failed) in results.items()}, indent=1))


if __name__ == "__main__":
    main()
