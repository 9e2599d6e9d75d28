"""The short soak (``make soak`` runs the same for 10 minutes): mixed traffic in every input form
with 1 bad request in 20, a hot swap and a replica kill in the middle; no valid request fails,
every bad one gets a 4xx, and no Serve process grows or leaks descriptors over the second half.
bench/soak.py has the details; its figures go to RELIABILITY.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
DURATION_S = 60.0


@pytest.fixture(scope="module")
def soak_tools():
    name = "mve_bench_soak"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "soak.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_the_schedule_is_one_bad_request_in_twenty(soak_tools):
    valid, bad = soak_tools.request_kinds(b"png", b"jpeg")
    seq = soak_tools.schedule(valid, bad)
    first = [next(seq) for _ in range(20 * len(valid) * len(bad))]
    assert sum(not k.valid for k in first) == len(first) // 20
    assert {k.name for k in first} == {k.name for k in valid + bad}  # every form, every error


def test_growth_is_measured_over_processes_alive_throughout(soak_tools):
    series = {1: {"title": "a", "t": [0, 10, 20, 30], "rss_mb": [100, 100, 150, 160],
                  "fds": [10, 10, 12, 30]},
              2: {"title": "late", "t": [25, 30], "rss_mb": [1, 900], "fds": [1, 1]}}
    (row,) = soak_tools.growth(series, 10, 30)
    assert row["title"] == "a" and row["rss_growth_mb"] == 60 and row["fds_end"] == 30
    problems = soak_tools.verdict({"failed_valid": 0, "bad_not_4xx": 0, "second_half": [row]},
                                  max_rss_growth_mb=64, max_fd_growth=8)
    assert problems == ["a (pid 1) descriptors 10 -> 30"]


def test_short_soak_fails_nothing_and_leaks_nothing(soak_tools, record_figures):
    figures = soak_tools.soak(DURATION_S, clients=4)
    figures["problems"] = soak_tools.verdict(figures, max_rss_growth_mb=64, max_fd_growth=8)
    record_figures("soak_short", figures)
    assert [e["event"] for e in figures["events"]] == ["hot swap", "replica kill"]
    assert figures["valid"] > 100 and figures["bad"] > 5
    assert set(figures["by_kind"]) == {k.name for k in sum(
        soak_tools.request_kinds(b"", b""), [])}
    assert figures["problems"] == []
    titles = {p["title"] for p in figures["second_half"]}
    assert "ray::ServeController" in titles and any(t.startswith("ray::ServeReplica")
                                                    for t in titles)
