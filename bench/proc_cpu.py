"""CPU time of process groups from ``/proc`` (Linux), for the serving benchmark.

Every server of ``bench/bench_serve.py`` runs in a session of its own (``setsid``), so its
processes are the ones whose session id is the server's pid: Ray's raylet, GCS, workers,
HAProxy and all. :class:`CpuMeter` measures, over one load run, the CPU seconds of each of
those processes (labelled by what they are), of the load generator, and of everything else on
the machine ("foreign": a busy machine makes the run worthless).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CpuMeter", "CpuReport", "session_cpu", "machine_busy_seconds"]

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: str) -> tuple[int, float] | None:
    """(session id, CPU seconds) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[3]), (int(fields[11]) + int(fields[12])) / TICK


def _label(pid: str) -> str:
    """What a process is: Ray's process title (``ray::ServeReplica:classifier:Classifier``),
    else the executable's name (``haproxy``, ``raylet``, ``python``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split()[0]
    if not first.startswith("/") and " " in first:  # a process title that is not a path
        return first.split()[0][:40]
    name = Path(first).name
    if name.startswith("python") and len(argv) > 1:
        script = next((a.decode() for a in argv[1:] if a.endswith(b".py")), "")
        return f"python {Path(script).name}" if script else "python"
    return name


def session_cpu(sid: int | None) -> dict[int, tuple[str, float]]:
    """``{pid: (label, cpu seconds)}`` of the live processes of session ``sid`` (None: all)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(entry)
            if st is not None and (sid is None or st[0] == sid):
                out[int(entry)] = (_label(entry), st[1])
    return out


def top_others(before: dict[int, tuple[str, float]], sid: int, n: int = 3) -> str:
    """The processes outside session ``sid`` that used the most CPU since ``before``."""
    used = []
    for pid, (label, cpu) in session_cpu(None).items():
        st = _stat(str(pid))
        if st is not None and st[0] != sid:
            used.append((cpu - before.get(pid, (label, 0.0))[1], f"{label}[{pid}]"))
    return ", ".join(f"{name} {s:.1f}s" for s, name in sorted(used, reverse=True)[:n])


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent running processes since boot (``/proc/stat``: user, nice and
    system). Interrupt and softirq time is left out: no process is charged for it, and the
    loopback traffic of the benchmark itself causes most of it; so is steal (the hypervisor)."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system = (int(v) for v in parts[:3])
    return (user + nice + system) / TICK


@dataclass
class CpuReport:
    """CPU seconds of one run: the server's processes by label, the load generator, the rest."""

    by_label: dict[str, float] = field(default_factory=dict)
    client_s: float = 0.0
    foreign_s: float = 0.0

    @property
    def server_s(self) -> float:
        return sum(self.by_label.values())


class CpuMeter:
    """``start()`` before a run, ``stop(client_s)`` after it (``client_s``: the load
    generator's own CPU seconds, from its rusage)."""

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self._before: dict[int, tuple[str, float]] = {}
        self._busy = 0.0

    def start(self) -> None:
        self._all = session_cpu(None)
        self._before = {p: v for p, v in self._all.items() if _stat(str(p)) and
                        _stat(str(p))[0] == self.sid}
        self._busy = machine_busy_seconds()

    def others(self) -> str:
        """Who else used the CPU since ``start()`` (for a "machine busy" message)."""
        return top_others(self._all, self.sid)

    def stop(self, client_s: float) -> CpuReport:
        after = session_cpu(self.sid)
        busy = machine_busy_seconds() - self._busy
        by_label: dict[str, float] = defaultdict(float)
        for pid, (label, cpu) in after.items():
            by_label[label] += cpu - self._before.get(pid, (label, 0.0))[1]
        report = CpuReport(dict(by_label), client_s)
        report.foreign_s = max(0.0, busy - report.server_s - client_s)
        return report
