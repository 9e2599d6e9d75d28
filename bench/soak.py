"""Soak: mixed traffic for a fixed time against mve's serving data plane, with one hot swap and
one replica kill in the middle; checks that nothing fails, leaks or grows.

    python bench/soak.py                          # 10 minutes (make soak), figures as JSON
    python bench/soak.py --duration 90 --json out.json

It starts its own embedded Ray with ``mve serve``'s data plane (HAProxy, one hop per request;
serve_app/dataplane.py), deploys a small classifier (2 replicas) and VAE (1 replica) made for
the run, and drives ``--clients`` closed-loop clients on loopback. Every 20th request is bad
(not an image, bad base64, a wrong content type, an unknown option, a model not deployed); the
other 19 rotate through every input form: raw PNG and JPEG, multipart, JSON base64, OIP v2
BYTES and FP32, VAE sample and reconstruct. Clients retry as README's "Client retries" says
(connection failures and 503, back-off from 0.1 s, 90 s in all), and every retry is counted.
At 40% of the run the classifier's checkpoint is hot-swapped; at 60% one classifier replica's
process is SIGKILLed. Every 2 s the RSS and open file descriptors of every Serve process
(replicas, controller, HAProxy and its manager, the Python proxy) are sampled from ``/proc``.

Pass: no valid request failed, every bad one got a 4xx, and over the second half of the run
no Serve process alive throughout grew its RSS by more than ``--max-rss-growth-mb`` or its
descriptors by more than ``--max-fd-growth``. The result is printed as JSON.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SERVE_TITLES = ("ray::ServeReplica", "ray::ServeController", "ray::HAProxyManager",
                "ray::ProxyActor", "haproxy")
MARKER_ENV = "MVE_SOAK_RUN"  # inherited by every process of the soak's Ray: finds them


@dataclass(frozen=True)
class Kind:
    """One form of request: where it goes, its body, and whether it is valid."""

    name: str
    path: str
    body: bytes | None
    headers: dict[str, str] = field(default_factory=dict)
    files: dict[str, Any] | None = None
    valid: bool = True


def request_kinds(png: bytes, jpeg: bytes) -> tuple[list[Kind], list[Kind]]:
    """The 8 valid forms and the 5 bad ones."""
    b64 = base64.b64encode(png).decode()
    js = {"Content-Type": "application/json"}
    oip_bytes = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]}
    oip_fp32 = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                            "data": [0.1] * (3 * 32 * 32)}]}
    valid = [
        Kind("classify_png", "/v1/classify", png, {"Content-Type": "image/png"}),
        Kind("classify_jpeg", "/v1/classify", jpeg, {"Content-Type": "image/jpeg"}),
        Kind("classify_multipart", "/v1/classify", None,
             files={"file": ("x.png", png, "image/png")}),
        Kind("classify_json", "/v1/classify", json.dumps({"images": [b64]}).encode(), js),
        Kind("oip_bytes", "/v2/models/classifier/infer", json.dumps(oip_bytes).encode(), js),
        Kind("oip_fp32", "/v2/models/classifier/infer", json.dumps(oip_fp32).encode(), js),
        Kind("vae_sample", "/v1/vae/sample?n=4&seed=1", b"", {}),
        Kind("vae_reconstruct", "/v1/vae/reconstruct", png, {"Content-Type": "image/png"}),
    ]
    bad = [
        Kind("bad_not_an_image", "/v1/classify", b"hello", {"Content-Type": "image/png"}, valid=False),
        Kind("bad_base64", "/v1/classify", b'{"images": ["%%%"]}', js, valid=False),
        Kind("bad_content_type", "/v1/classify", b"x", {"Content-Type": "text/plain"}, valid=False),
        Kind("bad_option", "/v1/vae/sample?n=4&bogus=1", b"", {}, valid=False),
        Kind("bad_model", "/v2/models/nope/infer", json.dumps(oip_bytes).encode(), js, valid=False),
    ]
    return valid, bad


def schedule(valid: list[Kind], bad: list[Kind]) -> itertools.cycle:
    """19 valid requests (rotating through the forms), then 1 bad one (rotating), forever."""
    seq, v, b = [], itertools.cycle(valid), itertools.cycle(bad)
    for _ in range(len(valid) * len(bad)):
        seq.extend(next(v) for _ in range(19))
        seq.append(next(b))
    return itertools.cycle(seq)


# -- the clients -------------------------------------------------------------------------------

@dataclass
class Record:
    kind: str
    valid: bool
    status: int | None
    started: float
    latency_ms: float
    retries: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        if self.status is None:
            return False
        return self.status == 200 if self.valid else 400 <= self.status < 500


def send(session: Any, base: str, kind: Kind, deadline_s: float = 90.0) -> Record:
    """One request under the README's client retry policy."""
    import requests

    t0, retries, delay = time.monotonic(), 0, 0.1
    while True:
        status, error = None, None
        try:
            r = session.post(base + kind.path, data=kind.body, headers=kind.headers,
                             files=kind.files, timeout=60)
            status = r.status_code
        except requests.ConnectionError as exc:
            error = type(exc).__name__
        except requests.RequestException as exc:  # a timeout: never retried
            return Record(kind.name, kind.valid, None, t0, (time.monotonic() - t0) * 1e3,
                          retries, type(exc).__name__)
        retry = error is not None or status == 503
        if not retry or time.monotonic() - t0 + delay > deadline_s:
            return Record(kind.name, kind.valid, status, t0, (time.monotonic() - t0) * 1e3,
                          retries, error)
        retries += 1
        time.sleep(delay)
        delay = min(2.0, delay * 2)


def run_clients(base: str, kinds: itertools.cycle, clients: int, stop: threading.Event
                ) -> list[Record]:
    """``clients`` threads sending back to back until ``stop``; returns every record."""
    import requests

    records: list[Record] = []
    lock = threading.Lock()

    def client() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                with lock:
                    kind = next(kinds)
                rec = send(s, base, kind)
                with lock:
                    records.append(rec)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(120)
    return records


# -- Serve's processes: RSS and descriptors ------------------------------------------------------

def serve_processes(marker: str) -> dict[int, str]:
    """``{pid: title}`` of the soak's Serve processes (found by :data:`MARKER_ENV`)."""
    out = {}
    needle = f"{MARKER_ENV}={marker}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if needle not in (proc / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:
            continue
        name = Path(title.split()[0]).name if title.startswith("/") else title
        if any(name.startswith(t) for t in SERVE_TITLES):
            out[int(proc.name)] = name.split(" ")[0]
    return out


def sample(pid: int) -> tuple[float, int] | None:
    """(RSS in MiB, open descriptors) of ``pid``, or None when it is gone."""
    try:
        rss_kb = next(int(line.split()[1]) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS:"))
        return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


def sample_loop(marker: str, stop: threading.Event, every_s: float = 2.0
                ) -> dict[int, dict[str, Any]]:
    """Samples every Serve process until ``stop``: ``{pid: {title, t, rss_mb, fds}}``."""
    series: dict[int, dict[str, Any]] = {}
    t0 = time.monotonic()
    while not stop.is_set():
        for pid, title in serve_processes(marker).items():
            got = sample(pid)
            if got is None:
                continue
            s = series.setdefault(pid, {"title": title, "t": [], "rss_mb": [], "fds": []})
            s["t"].append(time.monotonic() - t0)
            s["rss_mb"].append(got[0])
            s["fds"].append(got[1])
        stop.wait(every_s)
    return series


def slope_per_min(t: list[float], y: list[float]) -> float:
    """Least-squares slope of ``y`` against ``t`` (seconds), per minute."""
    n = len(t)
    if n < 2:
        return 0.0
    mt, my = sum(t) / n, sum(y) / n
    var = sum((a - mt) ** 2 for a in t)
    return 60 * sum((a - mt) * (b - my) for a, b in zip(t, y, strict=True)) / var if var else 0.0


def growth(series: dict[int, dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    """Per process alive from ``start`` to ``end`` (seconds into the run): RSS and descriptors
    at both ends, the largest RSS increase and the RSS slope over that window."""
    rows = []
    for pid, s in sorted(series.items()):
        idx = [i for i, t in enumerate(s["t"]) if start <= t <= end]
        if not idx or s["t"][idx[0]] > start + 5 or s["t"][idx[-1]] < end - 5:
            continue  # not alive throughout the window (started late, or killed)
        t = [s["t"][i] for i in idx]
        rss = [s["rss_mb"][i] for i in idx]
        fds = [s["fds"][i] for i in idx]
        rows.append({"pid": pid, "title": s["title"], "rss_start_mb": round(rss[0], 1),
                     "rss_end_mb": round(rss[-1], 1),
                     "rss_growth_mb": round(max(rss) - rss[0], 1),
                     "rss_slope_mb_per_min": round(slope_per_min(t, rss), 2),
                     "fds_start": fds[0], "fds_end": fds[-1]})
    return rows


# -- the served app and the events ---------------------------------------------------------------

def start_serving(work: Path, marker: str) -> tuple[str, dict[str, Any], dict[str, Path]]:
    """An embedded Ray with mve serve's data plane, serving a classifier (2 replicas) and a
    VAE; returns the base URL, the deployed config and the checkpoints."""
    import logging

    import ray

    from serve_app.dataplane import applied, embedded_env, free_port
    from serve_app.deploy import app_config, deploy, fixed_replicas, load_config
    from serve_app.testing import make_classifier, make_vae

    ckpts = {"c1": make_classifier(work / "c1", seed=1), "c2": make_classifier(work / "c2", seed=2),
             "vae": make_vae(work / "vae")}
    config = app_config(load_config(), {"classifier": str(ckpts["c1"]), "vae": str(ckpts["vae"])},
                        host="127.0.0.1", port=free_port(), tta="none")
    config = fixed_replicas(fixed_replicas(config, 1), 2, model="classifier")
    env = {**embedded_env(), MARKER_ENV: marker, "RAY_USAGE_STATS_ENABLED": "0"}
    with applied(env):
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False)
    deploy(config, timeout_s=300)
    http = config["http_options"]
    return f"http://{http['host']}:{http['port']}", config, ckpts


def hot_swap(config: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """Deploys the classifier's new checkpoint in place (``reconfigure``); returns the config."""
    from serve_app.deploy import deploy, set_user_config

    new = set_user_config(config, "classifier", checkpoint=str(checkpoint))
    deploy(new, timeout_s=300)
    return new


def kill_a_replica(marker: str) -> int:
    """SIGKILL of one classifier replica's process; returns its pid."""
    victims = sorted(pid for pid, title in serve_processes(marker).items()
                     if title.startswith("ray::ServeReplica:classifier:"))
    if not victims:
        raise RuntimeError("no classifier replica to kill")
    os.kill(victims[0], signal.SIGKILL)
    return victims[0]


# -- the run -------------------------------------------------------------------------------------

def summarize(records: list[Record], duration_s: float) -> dict[str, Any]:
    by_kind: dict[str, dict[str, Any]] = {}
    for r in records:
        k = by_kind.setdefault(r.kind, {"sent": 0, "failed": 0, "retries": 0, "statuses": {},
                                        "lat": []})
        k["sent"] += 1
        k["failed"] += not r.ok
        k["retries"] += r.retries
        key = str(r.status if r.status is not None else r.error)
        k["statuses"][key] = k["statuses"].get(key, 0) + 1
        k["lat"].append(r.latency_ms)
    for k in by_kind.values():
        lat = sorted(k.pop("lat"))
        k["p50_ms"] = round(lat[len(lat) // 2], 1)
        k["p99_ms"] = round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1)
    valid = [r for r in records if r.valid]
    bad = [r for r in records if not r.valid]
    return {"duration_s": round(duration_s, 1), "requests": len(records),
            "rps": round(len(records) / duration_s, 1), "valid": len(valid),
            "failed_valid": sum(not r.ok for r in valid), "bad": len(bad),
            "bad_not_4xx": sum(not r.ok for r in bad),
            "retries": sum(r.retries for r in records), "by_kind": by_kind}


def soak(duration_s: float, clients: int = 4) -> dict[str, Any]:
    """The whole run (see the module docstring); returns the figures."""
    import ray
    from ray import serve

    from serve_app.testing import png_bytes, random_images

    marker = secrets.token_hex(8)
    img = random_images(1, seed=5)[0]
    valid, bad = request_kinds(png_bytes(img), png_bytes(img, "JPEG"))
    with tempfile.TemporaryDirectory(prefix="mve-soak-") as tmp:
        base, config, ckpts = start_serving(Path(tmp), marker)
        try:
            return _drive(base, config, ckpts, marker, schedule(valid, bad), duration_s,
                          clients)
        finally:
            serve.shutdown()
            ray.shutdown()


def _drive(base: str, config: dict[str, Any], ckpts: dict[str, Path], marker: str,
           kinds: itertools.cycle, duration_s: float, clients: int) -> dict[str, Any]:
    stop_clients, stop_sampler = threading.Event(), threading.Event()
    out: dict[str, Any] = {}
    sampler = threading.Thread(target=lambda: out.update(series=sample_loop(marker, stop_sampler)))
    driver = threading.Thread(target=lambda: out.update(
        records=run_clients(base, kinds, clients, stop_clients)))
    t0 = time.monotonic()
    sampler.start()
    driver.start()
    events = []
    try:
        for at, what in ((0.4, "hot swap"), (0.6, "replica kill")):
            time.sleep(max(0.0, t0 + at * duration_s - time.monotonic()))
            t = time.monotonic() - t0
            if what == "hot swap":
                hot_swap(config, ckpts["c2"])
                events.append({"at_s": round(t, 1), "event": what, "to": ckpts["c2"].name})
            else:
                events.append({"at_s": round(t, 1), "event": what,
                               "pid": kill_a_replica(marker)})
        time.sleep(max(0.0, t0 + duration_s - time.monotonic()))
    finally:
        stop_clients.set()
        driver.join(180)
        stop_sampler.set()
        sampler.join(30)
    elapsed = time.monotonic() - t0
    figures = summarize(out.get("records", []), elapsed)
    figures["events"] = events
    figures["second_half"] = growth(out.get("series", {}), elapsed / 2, elapsed)
    return figures


def verdict(figures: dict[str, Any], max_rss_growth_mb: float, max_fd_growth: int) -> list[str]:
    """What failed (empty: the soak passed)."""
    problems = []
    if figures["failed_valid"]:
        problems.append(f"{figures['failed_valid']} valid requests failed")
    if figures["bad_not_4xx"]:
        problems.append(f"{figures['bad_not_4xx']} bad requests got no 4xx")
    if not figures["second_half"]:
        problems.append("no Serve process was sampled through the second half")
    for p in figures["second_half"]:
        if p["rss_growth_mb"] > max_rss_growth_mb:
            problems.append(f"{p['title']} (pid {p['pid']}) grew {p['rss_growth_mb']} MiB")
        if p["fds_end"] - p["fds_start"] > max_fd_growth:
            problems.append(f"{p['title']} (pid {p['pid']}) descriptors "
                            f"{p['fds_start']} -> {p['fds_end']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600, help="seconds of traffic (600)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (4)")
    p.add_argument("--max-rss-growth-mb", type=float, default=64.0,
                   help="largest RSS increase allowed per process over the second half (64)")
    p.add_argument("--max-fd-growth", type=int, default=8,
                   help="most extra descriptors allowed per process over the second half (8)")
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = p.parse_args(argv)
    figures = soak(args.duration, args.clients)
    figures["problems"] = verdict(figures, args.max_rss_growth_mb, args.max_fd_growth)
    text = json.dumps(figures, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 1 if figures["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
