"""A bounded, closed-loop async load generator for ``POST /v1/classify`` (loopback only).

    python bench/load.py http://127.0.0.1:8000/v1/classify --concurrency 4 --duration 20
    python bench/load.py URL --image cat.png --requests 500 --no-retry --json out.json

``concurrency`` clients (``aiohttp``, one keep-alive connection each) send the same body back to
back until ``duration_s`` has passed or ``max_requests`` have been sent (at least one bound is
required, and every run stops after ``hard_limit_s`` whatever happens). Every request is
recorded: when it started and ended, its final status, how many attempts it took and why each
retry happened. The caller marks phases (``mark("during")`` when it injects a fault,
``mark("after")`` once the service has recovered). A request counts in the phase in force when
it started, except that one still in flight when the first mark is set counts in that mark's
phase: the fault hit it. :meth:`Load.summary` reports, per phase and overall: requests sent,
succeeded, failed, retried, total retries, p50/p99/max latency and the status and error counts.

**Client retry policy** (:class:`RetryPolicy`, the contract README.md documents for clients):
an *idempotent* request (every mve inference route is) is retried when the connection fails
before a response arrives (refused, reset, closed mid-request) or when the server answers
``503``; nothing else is retried (no 4xx, no other 5xx, no timeouts). Back-off is exponential,
0.1 s doubling up to 2 s, and a request gives up once ``deadline_s`` (default 90 s) has passed
since its first attempt. Latency is measured from the first attempt to the final answer, back-off
included, so retries show up in the percentiles; :data:`NO_RETRY` turns retries off.

The URL must point at the local machine (the loopback range 127.0.0.0/8, ::1 or localhost;
the head-failure test gives its two Ray nodes 127.0.0.1 and 127.0.0.2): this is a test tool,
not a way to load someone else's service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

__all__ = ["RetryPolicy", "NO_RETRY", "Sample", "Load", "percentile", "summarize"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str | None) -> bool:
    """``localhost`` or an address of the loopback range (127.0.0.0/8, ::1)."""
    import ipaddress

    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class RetryPolicy:
    """When and how a client retries an idempotent request (see the module docstring)."""

    # What is retried: only what an idempotent request may safely send again.
    retry_statuses: tuple[int, ...] = (503,)
    retry_connection_errors: bool = True
    # When: exponential back-off, and no attempt after the deadline (from the first attempt).
    initial_backoff_s: float = 0.1
    multiplier: float = 2.0
    max_backoff_s: float = 2.0
    deadline_s: float = 90.0

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))


NO_RETRY = RetryPolicy(deadline_s=0.0, retry_statuses=(), retry_connection_errors=False)


@dataclass
class Sample:
    """One logical request: its final outcome after any retries."""

    start: float  # time.monotonic() at the first attempt
    end: float  # time.monotonic() at the final answer (or give-up)
    status: int  # final HTTP status; 0: no response (connection error or timeout)
    attempts: int
    ok: bool  # status 200 and the body passed the check
    error: str | None = None  # why it failed (the last attempt), when it did
    retry_reasons: list[str] = field(default_factory=list)
    tag: str | None = None  # what ``tag(body)`` extracted, e.g. the checkpoint id

    @property
    def latency_ms(self) -> float:
        return 1000.0 * (self.end - self.start)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of an ascending list (NaN when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(samples: list[Sample], duration_s: float | None = None) -> dict[str, Any]:
    """Counts and latency percentiles of ``samples``."""
    lat = sorted(s.latency_ms for s in samples)
    out: dict[str, Any] = {
        "sent": len(samples),
        "ok": sum(s.ok for s in samples),
        "failed": sum(not s.ok for s in samples),
        "retried": sum(s.attempts > 1 for s in samples),
        "retries": sum(s.attempts - 1 for s in samples),
        "p50_ms": round(percentile(lat, 50), 2),
        "p99_ms": round(percentile(lat, 99), 2),
        "max_ms": round(lat[-1], 2) if lat else float("nan"),
        "statuses": dict(sorted(Counter(str(s.status) for s in samples).items())),
    }
    reasons = Counter(r for s in samples for r in s.retry_reasons)
    errors = Counter(s.error for s in samples if s.error)
    if reasons:
        out["retry_reasons"] = dict(reasons.most_common())
    if errors:
        out["errors"] = dict(errors.most_common())
    tags = Counter(s.tag for s in samples if s.tag is not None)
    if tags:
        out["tags"] = dict(tags.most_common())
    if duration_s:
        out["duration_s"] = round(duration_s, 2)
        out["rps"] = round(len(samples) / duration_s, 1)
    return out


class Load:
    """Closed-loop load on one URL, run in the foreground (:meth:`run`) or a background thread.

    Args:
        url: the target, on the loopback interface.
        body: the request body sent every time.
        headers: request headers (e.g. ``Content-Type: image/png``).
        concurrency: clients sending back to back.
        duration_s: stop starting requests after this many seconds (None: until :meth:`stop`).
        max_requests: stop after this many requests in total (None: no count bound).
        retry: the client retry policy.
        timeout_s: per-attempt timeout (a timed-out attempt fails the request).
        check: extra validation of a 200 body (False: the request failed with ``bad_body``).
        tag: a label extracted from a 200 body and counted per phase.
        phase: the name of the first phase.
        hard_limit_s: an upper bound on the whole run, whatever the other settings.
    """

    def __init__(self, url: str, body: bytes, headers: dict[str, str] | None = None, *,
                 concurrency: int = 4, duration_s: float | None = None,
                 max_requests: int | None = None, retry: RetryPolicy = RetryPolicy(),
                 timeout_s: float = 30.0, check: Callable[[bytes], bool] | None = None,
                 tag: Callable[[bytes], str | None] | None = None, phase: str = "before",
                 hard_limit_s: float = 900.0) -> None:
        host = urlparse(url).hostname
        if not is_loopback(host):
            raise ValueError(f"bench/load.py only loads the local machine, not {host!r}")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.url, self.body, self.headers = url, body, dict(headers or {})
        self.concurrency, self.duration_s, self.max_requests = concurrency, duration_s, \
            max_requests
        self.retry, self.timeout_s, self.check, self.tag = retry, timeout_s, check, tag
        self.hard_limit_s = hard_limit_s
        self.samples: list[Sample] = []
        self.marks: list[tuple[float, str]] = [(float("-inf"), phase)]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._started = self._finished = None

    # -- phases ------------------------------------------------------------------------------

    def mark(self, phase: str) -> float:
        """Starts phase ``phase`` now (requests starting from now on belong to it)."""
        t = time.monotonic()
        self.marks.append((t, phase))
        return t

    def phase_of(self, sample: Sample) -> str:
        """The phase ``sample`` counts in (see the module docstring)."""
        marks = list(self.marks)
        i = max(k for k, (at, _) in enumerate(marks) if sample.start >= at)
        if i == 0 and len(marks) > 1 and sample.end >= marks[1][0]:
            i = 1  # in flight when the fault came
        return marks[i][1]

    def count(self, phase: str | None = None) -> int:
        """Requests finished so far (in ``phase``, if given)."""
        samples = list(self.samples)
        return len(samples) if phase is None else sum(
            self.phase_of(s) == phase for s in samples)

    # -- running -----------------------------------------------------------------------------

    async def _attempt(self, session: Any) -> tuple[int, bytes | None, str | None]:
        import aiohttp

        try:
            async with session.post(self.url, data=self.body, headers=self.headers) as r:
                return r.status, await r.read(), None
        except TimeoutError:  # before ClientConnectionError: ServerTimeoutError is both
            return 0, None, "timeout"
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            return 0, None, f"connection:{type(exc).__name__}"

    async def _one(self, session: Any) -> Sample:
        start = time.monotonic()
        reasons: list[str] = []
        while True:
            status, body, err = await self._attempt(session)
            retryable = (err is not None and err.startswith("connection:")
                         and self.retry.retry_connection_errors) or \
                status in self.retry.retry_statuses
            now = time.monotonic()
            wait = self.retry.backoff(len(reasons) + 1)
            if retryable and now + wait - start <= self.retry.deadline_s \
                    and not self._stop.is_set():
                reasons.append(err or f"status:{status}")
                await asyncio.sleep(wait)
                continue
            break
        sample = Sample(start=start, end=time.monotonic(), status=status,
                        attempts=len(reasons) + 1, ok=False, retry_reasons=reasons)
        if status == 200 and body is not None:
            sample.ok = self.check(body) if self.check else True
            if not sample.ok:
                sample.error = "bad_body"
            elif self.tag is not None:
                sample.tag = self.tag(body)
        else:
            sample.error = err or f"status:{status}"
        return sample

    def _more(self, t0: float) -> bool:
        now = time.monotonic()
        if self._stop.is_set() or now - t0 > self.hard_limit_s:
            return False
        if self.duration_s is not None and now - t0 >= self.duration_s:
            return False
        return self.max_requests is None or self._issued < self.max_requests

    async def run(self) -> list[Sample]:
        """Runs the load to its bound (or :meth:`stop`) and returns every request's sample."""
        import aiohttp

        if self.duration_s is None and self.max_requests is None and self._thread is None:
            raise ValueError("give duration_s or max_requests (or run it with start/stop)")
        self._issued = 0
        t0 = self._started = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        connector = aiohttp.TCPConnector(limit=self.concurrency, force_close=False)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

            async def client() -> None:
                while self._more(t0):
                    self._issued += 1
                    self.samples.append(await self._one(session))

            await asyncio.gather(*(client() for _ in range(self.concurrency)))
        self._finished = time.monotonic()
        return self.samples

    def start(self) -> Load:
        """Runs :meth:`run` in a background thread (its own event loop)."""

        def target() -> None:
            try:
                asyncio.run(self.run())
            except BaseException as exc:  # noqa: BLE001 - re-raised by stop()
                self._error = exc

        self._thread = threading.Thread(target=target, name="mve-load", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 120.0) -> list[Sample]:
        """Stops starting requests, waits for those in flight, and returns all samples."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"the load did not stop within {timeout_s:.0f}s")
        if self._error is not None:
            raise self._error
        return self.samples

    def wait_for(self, n: int, phase: str | None = None, timeout_s: float = 120.0) -> None:
        """Blocks until ``n`` requests (of ``phase``) have finished."""
        deadline = time.monotonic() + timeout_s
        while self.count(phase) < n:
            if self._error is not None:
                raise self._error
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.count(phase)} of {n} requests "
                                   f"({phase or 'all'}) finished in {timeout_s:.0f}s")
            time.sleep(0.1)

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(120.0)

    # -- results -----------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Per-phase and overall figures: sent, ok, failed, retried, retries, p50/p99 (ms)."""
        samples = list(self.samples)
        end = self._finished or time.monotonic()
        phases: dict[str, Any] = {}
        bounds = self.marks[1:] + [(end, "")]
        for (at, name), (until, _) in zip(self.marks, bounds, strict=True):
            mine = [s for s in samples if self.phase_of(s) == name]
            begin = max(at, self._started or at)
            phases[name] = summarize(mine, max(until - begin, 1e-9))
        return {"concurrency": self.concurrency,
                "retry_policy": asdict(self.retry),
                "phases": phases,
                "all": summarize(samples, end - (self._started or end) or None)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="e.g. http://127.0.0.1:8000/v1/classify")
    p.add_argument("--image", help="a PNG/JPEG to send (default: a random 32x32 PNG)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--duration", type=float, help="seconds (default 10 without --requests)")
    p.add_argument("--requests", type=int, help="stop after this many requests")
    p.add_argument("--timeout", type=float, default=30.0, help="per-attempt timeout (s)")
    p.add_argument("--no-retry", action="store_true", help="no client retries at all")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--json", help="also write the summary to this file")
    a = p.parse_args(argv)
    if a.image:
        with open(a.image, "rb") as f:
            body = f.read()
        ctype = "image/jpeg" if body[:2] == b"\xff\xd8" else "image/png"
    else:
        import io

        import numpy as np
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(
            buf, format="PNG")
        body, ctype = buf.getvalue(), "image/png"
    headers = {"Content-Type": ctype}
    if a.api_key:
        headers["Authorization"] = f"Bearer {a.api_key}"
    duration = a.duration if a.duration is not None or a.requests else 10.0
    load = Load(a.url, body, headers, concurrency=a.concurrency, duration_s=duration,
                max_requests=a.requests, timeout_s=a.timeout,
                retry=NO_RETRY if a.no_retry else RetryPolicy())
    asyncio.run(load.run())
    out = json.dumps(load.summary(), indent=2)
    print(out)
    if a.json:
        with open(a.json, "w") as f:
            f.write(out + "\n")
    return 0 if load.summary()["all"]["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
