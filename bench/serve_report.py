"""The markdown report of ``bench/bench_serve.py``: medians over rounds, ratios, targets."""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from typing import Any

__all__ = ["report", "summarize"]

PEERS = ("bare", "bare-batched", "litserve", "triton")  # as their users would run them
REFERENCE = "bare-batched-opt"  # the one-process ceiling given mve's model optimization
MVE = ("mve", "mve-fp32", "mve-old", "mve-allthreads")


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(points: list[Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """``{(setup, format, concurrency): medians over rounds}`` (errors are summed)."""
    groups: dict[tuple[str, str, int], list[Any]] = defaultdict(list)
    for p in points:
        groups[(p.setup, p.fmt, p.concurrency)].append(p)
    out = {}
    for key, ps in groups.items():
        procs: dict[str, list[float]] = defaultdict(list)
        for p in ps:
            for name, ms in p.cpu_by_process.items():
                procs[name].append(ms)
        out[key] = {"n": len(ps), "rps": _median([p.rps for p in ps]),
                    "p50": _median([p.p50_ms for p in ps]), "p99": _median([p.p99_ms for p in ps]),
                    "errors": sum(p.errors for p in ps),
                    "batch": _median([p.mean_batch for p in ps]),
                    "cpu": _median([p.cpu_ms_per_request for p in ps]),
                    "procs": {k: statistics.median(v) for k, v in procs.items()}}
    return out


def _cell(s: dict[str, Any] | None, lat: str) -> str:
    return "-" if s is None else f"{s['rps']:.0f} ({s[lat]:.0f} ms)"


def _best_peer(summary: dict, fmt: str, c: int) -> tuple[str, float] | None:
    peers = [(name, summary[(name, fmt, c)]["rps"]) for name in PEERS
             if (name, fmt, c) in summary]
    return max(peers, key=lambda x: x[1]) if peers else None


def _table(summary: dict, formats: list[str], conc: list[int]) -> list[str]:
    head = " | ".join(f"c={c} req/s ({'p50' if c == 1 else 'p99'})" for c in conc)
    lines = [f"| server | format | {head} | errors | mean batch (c={conc[-1]}) | "
             f"CPU-ms/req (c={conc[-1]}) |", "|---" * (len(conc) + 5) + "|"]
    setups = [s for s in (*PEERS, REFERENCE, *MVE[::-1]) if any(k[0] == s for k in summary)]
    for fmt in formats:
        for name in setups:
            cells = [summary.get((name, fmt, c)) for c in conc]
            if not any(cells):
                continue
            last = cells[-1] or {}
            # the old plane only had a histogram: its bucket bounds give an upper bound
            approx = "<= " if name == "mve-old" else ""
            batch = f"{approx}{last['batch']:.1f}" if last.get("batch") else "-"
            cpu = f"{last['cpu']:.1f}" if last.get("cpu") is not None else "-"
            errors = sum(x["errors"] for x in cells if x)
            row = " | ".join(_cell(x, "p50" if c == 1 else "p99") for x, c in zip(
                cells, conc, strict=True))
            bold = "**" if name == "mve" else ""
            lines.append(f"| {bold}{name}{bold} | {fmt} | {row} | {errors} | {batch} | {cpu} |")
    return lines


def _ratios(summary: dict, formats: list[str], conc: list[int]) -> list[str]:
    lines = ["| format | c | fastest peer | its req/s | mve req/s | mve / fastest peer | "
             f"mve-fp32 / fastest peer | mve-old / fastest peer | mve / {REFERENCE} |",
             "|---|---|---|---|---|---|---|---|---|"]

    def ratio(a: dict | None, b: float | None) -> str:
        return f"{a['rps'] / b:.2f}x" if a and b else "-"
    for fmt in formats:
        for c in conc:
            best = _best_peer(summary, fmt, c)
            if best is None:
                continue
            mve, old = summary.get(("mve", fmt, c)), summary.get(("mve-old", fmt, c))
            fp32, ref = summary.get(("mve-fp32", fmt, c)), summary.get((REFERENCE, fmt, c))
            lines.append(f"| {fmt} | {c} | {best[0]} | {best[1]:.0f} | "
                         f"{mve['rps'] if mve else 0:.0f} | {ratio(mve, best[1])} | "
                         f"{ratio(fp32, best[1])} | {ratio(old, best[1])} | "
                         f"{ratio(mve, ref and ref['rps'])} |")
    return lines


def _targets(summary: dict, formats: list[str], tta: str) -> list[str]:
    out = []
    for fmt in formats:
        for c in (8, 32):
            best, mve = _best_peer(summary, fmt, c), summary.get(("mve", fmt, c))
            if best and mve:
                ratio = mve["rps"] / best[1]
                out.append(f"- {fmt}, c={c}: mve {ratio:.2f}x the fastest peer ({best[0]}) "
                           f"(target >= 1.0x): {'met' if ratio >= 1.0 else 'MISSED'}")
        bare, mve = summary.get(("bare", fmt, 1)), summary.get(("mve", fmt, 1))
        if bare and mve:
            ratio = mve["p50"] / bare["p50"]
            out.append(f"- {fmt}, c=1: mve p50 {mve['p50']:.1f} ms = {ratio:.2f}x the bare "
                       f"server's (target <= 1.3x): {'met' if ratio <= 1.3 else 'MISSED'}")
        mve8 = summary.get(("mve", fmt, 8))
        if tta == "none" and mve8:
            ok = mve8["p99"] <= 100
            out.append(f"- {fmt}, TTA none, c=8: mve p99 {mve8['p99']:.0f} ms (target <= 100 ms): "
                       f"{'met' if ok else 'MISSED'}")
    errors = sum(s["errors"] for k, s in summary.items() if k[0] in ("mve", "mve-fp32"))
    out.append(f"- errors of mve and mve-fp32 in all runs: {errors} (target 0): "
               f"{'met' if errors == 0 else 'MISSED'}")
    return out


def _processes(summary: dict, fmt: str, c: int) -> list[str]:
    lines = [f"Server CPU-ms per request by process ({fmt}, c={c}; processes above 0.05 ms):",
             "", "| server | process | CPU-ms/req |", "|---|---|---|"]
    for name in (*MVE, *PEERS, REFERENCE):
        s = summary.get((name, fmt, c))
        if s:
            for proc, ms in sorted(s["procs"].items(), key=lambda x: -x[1]):
                if ms >= 0.05:
                    lines.append(f"| {name} | `{proc}` | {ms:.2f} |")
    return lines


def report(results: dict[str, tuple[list[Any], dict[str, str]]], args: argparse.Namespace,
           machine: str) -> str:
    """The markdown section for BENCHMARKS.md."""
    cmd = (f"python bench/bench_serve.py --tta {' '.join(args.tta)} --rounds {args.rounds} "
           f"--duration {args.duration:g}")
    lines = ["## Serving: mve against the peers (`bench/bench_serve.py`)", "",
             f"Command: `{cmd}`", "",
             f"Machine: {machine}. Client and servers share the cores (wrk: 1 thread). "
             f"Medians over {args.rounds} interleaved rounds of {args.duration:g} s per point; "
             f"peers with {args.threads} torch threads; every server 1 replica/process.", ""]
    for tta, (points, failed) in results.items():
        summary = summarize(points)
        conc = sorted(args.concurrency)
        lines += [f"### TTA `{tta}`", "", *_table(summary, args.formats, conc), ""]
        for name, why in failed.items():
            lines.append(f"- **{name} did not run**: {why}")
        lines += ["", *_ratios(summary, args.formats, conc), "", "Targets:", "",
                  *_targets(summary, args.formats, tta), ""]
        mid = conc[len(conc) // 2]
        lines += [*_processes(summary, "raw", mid), ""]
    return "\n".join(lines) + "\n"
