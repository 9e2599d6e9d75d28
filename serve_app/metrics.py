"""Application metrics through ``ray.serve.metrics`` (exported beside Ray's ``ray_serve_*``).

Ray prefixes custom metrics with ``ray_`` and suffixes counters with ``_total``, and Serve
adds the ``application``, ``deployment`` and ``replica`` tags. Scrape them from each node's
metrics export port (``mve serve --metrics-port P`` -> ``http://127.0.0.1:P/metrics``):

- ``ray_mve_http_requests_total{route,method,status}``: ingress requests by route template
- ``ray_mve_http_request_latency_ms_bucket{route,method}``: ingress latency histogram
- ``ray_mve_rejected_requests_total{route,code}``: 4xx rejections by error code
- ``ray_mve_batch_size_bucket{model}``: images per forward pass (dynamic batching); Ray 2.60
  exports the histogram's ``_sum`` from bucket midpoints, so take the mean batch size from
- ``ray_mve_forward_passes_total{model}`` and ``ray_mve_forward_images_total{model}``: exact
  counters (mean batch = ``rate(images) / rate(passes)``)
- ``ray_mve_model_forward_latency_ms_bucket{model,method}``: model time per call/batch
- ``ray_mve_predictions_total{model,class}``: top-1 predictions by class
- ``ray_mve_model_swaps_total{model,outcome}``: checkpoint loads (``success``/``failure``)
- ``ray_mve_model_info{model,checkpoint_id}``: 1 for the checkpoint a replica serves

Objects are created inside replicas (``__init__``), never at import.
"""

from __future__ import annotations

import collections
import time

from ray.serve.metrics import Counter, Gauge, Histogram

__all__ = ["IngressMetrics", "ModelMetrics", "LATENCY_MS", "BATCH_SIZES"]

LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
PREDICTIONS_FLUSH_S = 1.0  # how stale ray_mve_predictions_total may be (besides Ray's export)


class IngressMetrics:
    """Request counters and latency of the replica that answers the HTTP request (every mve
    application is its own HTTP ingress)."""

    def __init__(self) -> None:
        self.requests = Counter("mve_http_requests", description="HTTP requests by route and "
                                "status", tag_keys=("route", "method", "status"))
        self.latency = Histogram("mve_http_request_latency_ms", description="HTTP request "
                                 "latency in the ingress (ms)", boundaries=LATENCY_MS,
                                 tag_keys=("route", "method"))
        self.rejected = Counter("mve_rejected_requests", description="Rejected (4xx) requests "
                                "by error code", tag_keys=("route", "code"))

    def record(self, route: str, method: str, status: int, latency_ms: float) -> None:
        """Counts one finished request."""
        self.requests.inc(tags={"route": route, "method": method, "status": str(status)})
        self.latency.observe(latency_ms, tags={"route": route, "method": method})

    def reject(self, route: str, code: str) -> None:
        """Counts one rejected request by its error code."""
        self.rejected.inc(tags={"route": route, "code": code})


class ModelMetrics:
    """Batch sizes, forward latency, predictions and swaps of one model deployment."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._pending: collections.Counter[str] = collections.Counter()
        self._flushed = float("-inf")  # the first predictions are counted at once
        self.batch_size = Histogram("mve_batch_size", description="Images per forward pass",
                                    boundaries=BATCH_SIZES, tag_keys=("model",))
        self.passes = Counter("mve_forward_passes", description="Batched forward passes",
                              tag_keys=("model",))
        self.images = Counter("mve_forward_images", description="Images in batched forward "
                              "passes", tag_keys=("model",))
        self.forward = Histogram("mve_model_forward_latency_ms", description="Model compute "
                                 "time per batch or call (ms)", boundaries=LATENCY_MS,
                                 tag_keys=("model", "method"))
        self.predictions = Counter("mve_predictions", description="Top-1 predictions by class",
                                   tag_keys=("model", "class"))
        self.swaps = Counter("mve_model_swaps", description="Checkpoint loads by outcome",
                             tag_keys=("model", "outcome"))
        self.info = Gauge("mve_model_info", description="1 for the checkpoint being served",
                          tag_keys=("model", "checkpoint_id"))

    def batch(self, size: int, latency_ms: float, method: str) -> None:
        """Records one forward pass."""
        self.batch_size.observe(size, tags={"model": self.model})
        if method == "batch":
            self.passes.inc(tags={"model": self.model})
            self.images.inc(size, tags={"model": self.model})
        self.forward.observe(latency_ms, tags={"model": self.model, "method": method})

    def predicted(self, labels: list[str]) -> None:
        """Counts top-1 labels. A Ray metric update costs ~0.1 ms, as much as a tenth of a
        request's whole CPU, so counts gather here and reach Ray at most once a second per
        class (and on every health check: :meth:`serving`)."""
        self._pending.update(labels)
        if time.monotonic() - self._flushed >= PREDICTIONS_FLUSH_S:
            self.flush_predictions()

    def flush_predictions(self) -> None:
        for label, n in self._pending.items():
            self.predictions.inc(n, tags={"model": self.model, "class": label})
        self._pending.clear()
        self._flushed = time.monotonic()

    def serving(self, checkpoint_id: str) -> None:
        """Re-asserts ``ray_mve_model_info`` for the checkpoint being served. Ray 2.60's metrics
        agent drops a gauge value that was not set again within two export intervals (20 s by
        default), so a value set once at load vanished from Prometheus soon after: the replica
        calls this on every health check (every 10 s; not per batch, off the request path)."""
        self.info.set(1, tags={"model": self.model, "checkpoint_id": checkpoint_id})
        self.flush_predictions()

    def swapped(self, ok: bool, old_id: str | None = None, new_id: str | None = None) -> None:
        """Counts a load attempt and moves the info gauge to the new checkpoint."""
        self.swaps.inc(tags={"model": self.model, "outcome": "success" if ok else "failure"})
        if ok and old_id != new_id:
            if old_id is not None:
                self.info.set(0, tags={"model": self.model, "checkpoint_id": old_id})
            if new_id is not None:
                self.info.set(1, tags={"model": self.model, "checkpoint_id": new_id})
