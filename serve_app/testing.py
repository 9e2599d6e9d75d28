"""Helpers for the serving tests and the benchmark: small checkpoints, images, free ports.

No Ray here. ``make_classifier`` builds an untrained (seeded) classifier and saves it as an mve
checkpoint with CIFAR-10 class names and preprocessing, in well under a second.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mve.checkpoint import save_checkpoint
from mve.models import build_model, make_config
from serve_app.dataplane import free_port  # one definition; re-exported for tests

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "SMALL_CLASSIFIER", "free_port",
           "make_classifier", "make_vae", "png_bytes", "random_images", "archive_images",
           "haproxy_servers", "ServedApp"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]


@dataclass
class ServedApp:
    """A deployed test app: its URL, the Serve config it runs and its checkpoints by name."""

    url: str
    config: dict[str, Any]
    ckpts: dict[str, Path] = field(default_factory=dict)


SMALL_CLASSIFIER = {"cnn_layers": 3, "final_channels": 32, "fcn_layers": 2, "num_classes": 10}


def make_classifier(path: str | Path, *, seed: int = 0, values: dict[str, Any] | None = None,
                    metrics: dict[str, Any] | None = None) -> Path:
    """Saves a seeded, untrained classifier checkpoint (small by default)."""
    torch.manual_seed(seed)
    cfg = make_config("classifier", SMALL_CLASSIFIER if values is None else values)
    model = build_model("classifier", cfg).eval()
    return save_checkpoint(path, model, model_name="classifier", model_config=cfg,
                           preprocessing={"input_size": [32, 32], "mean": CIFAR10_MEAN,
                                          "std": CIFAR10_STD},
                           class_names=CIFAR10_CLASSES, metrics=metrics or {"seed": seed})


def make_vae(path: str | Path, *, seed: int = 0) -> Path:
    """Saves a seeded, untrained tiny VAE checkpoint (model space [-1, 1])."""
    torch.manual_seed(seed)
    cfg = make_config("vae", {}, preset="tiny")
    model = build_model("vae", cfg).eval()
    return save_checkpoint(path, model, model_name="vae", model_config=cfg,
                           preprocessing={"input_size": [32, 32], "mean": [0.5] * 3,
                                          "std": [0.5] * 3}, metrics={"seed": seed})


def png_bytes(image: np.ndarray, fmt: str = "PNG") -> bytes:
    """Encodes ``uint8 [H, W, 3]`` as PNG (or JPEG)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def random_images(n: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """``n`` random RGB ``uint8`` images."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def archive_images(archive: str | Path, per_class: int) -> list[tuple[str, bytes]]:
    """Up to ``per_class`` encoded images of each class directory of a ``.tar.gz`` archive.

    Returns ``(class name, bytes)`` pairs; the class is the image's parent directory.
    """
    out: list[tuple[str, bytes]] = []
    counts: dict[str, int] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not (member.isfile() and member.name.lower().endswith((".png", ".jpg", ".jpeg"))):
                continue
            label = Path(member.name).parent.name
            if counts.get(label, 0) >= per_class:
                continue
            f = tar.extractfile(member)
            if f is not None:
                out.append((label, f.read()))
                counts[label] = counts.get(label, 0) + 1
    return out


def haproxy_servers(stats_port: int, host: str = "127.0.0.1") -> dict[str, dict[str, str]]:
    """HAProxy's per-server statistics (``/stats;csv`` on its stats port), by server name.

    Ray names the servers ``SERVE_REPLICA_<app>-<deployment>-<replica>`` for replicas reached
    directly and ``SERVE_PROXY_ACTOR-fallback-...`` for the Python proxy it falls back to;
    ``stot`` counts the requests each received.
    """
    import csv
    import urllib.request

    with urllib.request.urlopen(f"http://{host}:{stats_port}/stats;csv", timeout=10) as r:
        text = r.read().decode()
    rows = csv.DictReader(text.lstrip("# ").splitlines())
    return {row["svname"]: row for row in rows if row["svname"] not in ("FRONTEND", "BACKEND")}


def replica_address(app: str, deployment: str, stats_port: int, *,
                    timeout_s: float = 60.0) -> str:
    """``host:port`` of the direct-ingress HTTP server of ``app``'s ``deployment`` replica
    on this node, once HAProxy routes to it.

    ``serve.run`` returns when the application is RUNNING, but the controller hands the
    replica's port to HAProxy a moment later: waiting for HAProxy's config line and its
    health check avoids that race. The address is read from the config HAProxy runs (its
    stats leave ``addr`` empty for servers Ray writes there).
    """
    import time

    import ray

    prefix = f"SERVE_REPLICA_{app}-{deployment}-"
    cfg = Path(f"/tmp/haproxy-serve/{ray.get_runtime_context().get_node_id()}/haproxy.cfg")
    deadline = time.monotonic() + timeout_s
    while True:
        lines = cfg.read_text().splitlines() if cfg.exists() else []
        found = {f[1]: f[2] for f in (line.split() for line in lines)
                 if len(f) > 2 and f[0] == "server" and f[1].startswith(prefix)}
        up = {n for n, row in haproxy_servers(stats_port).items() if row["status"] == "UP"}
        ready = sorted(addr for name, addr in found.items() if name in up)
        if ready:
            return ready[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {prefix}* server UP in {cfg} after {timeout_s:.0f} s")
        time.sleep(0.25)
