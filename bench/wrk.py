"""One closed-loop load run with ``wrk`` (the C load generator, Debian package ``wrk``).

``wrk -t1 -cC -dD --latency`` with ``bench/peers/post.lua`` POSTing one body file: C
connections each send the next request as soon as the previous answer arrived. Returns
requests/s, p50/p99 latency, the number of failed requests (non-2xx answers and socket errors)
and the CPU seconds wrk itself used (from its rusage, so that the benchmark can tell its own
load from a busy machine).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WrkResult", "run_wrk", "parse_wrk", "WRK"]

WRK = shutil.which("wrk")
LUA = Path(__file__).with_name("peers") / "post.lua"
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    client_cpu_s: float = 0.0


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"cannot read the latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    """Reads wrk's ``--latency`` report."""
    pct = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)[ \t]*$", out, re.M))
    total = re.search(r"^\s+(\d+) requests in", out, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if not (total and rps and "50" in pct and "99" in pct):
        raise ValueError(f"not a wrk --latency report:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (
        sum(int(g) for g in sock.groups()) if sock else 0)
    return WrkResult(int(total.group(1)), float(rps.group(1)), _ms(pct["50"]), _ms(pct["99"]),
                     errors)


def run_wrk(url: str, body: Path, content_type: str, *, concurrency: int, duration_s: float,
            header_length: int | None = None, timeout_s: float = 30.0) -> WrkResult:
    """Runs wrk against ``url`` and returns its figures (raises if wrk fails)."""
    if WRK is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    env = {**os.environ, "BODY": str(body), "CTYPE": content_type,
           "HLEN": "" if header_length is None else str(header_length)}
    cmd = [WRK, "-t1", f"-c{concurrency}", f"-d{duration_s:g}s", "--latency",
           f"--timeout={timeout_s:g}s", "-s", str(LUA), url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}:\n{out}")
    result = parse_wrk(out)
    result.client_cpu_s = usage.ru_utime + usage.ru_stime
    return result
