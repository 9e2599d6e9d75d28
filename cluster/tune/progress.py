"""A search's console: a compact table of the trials, at most 100 columns wide.

Ray Tune's own status table shows every searched param under its full dotted name next to
Ray's columns (about 400 columns for the default space) and is printed every 5 seconds. This
one shows the trial id, its status, its epoch, the metric and the searched params under short
names (``optim.lr`` -> ``lr``), drops the params that do not fit, and is printed when
something changed, at most every ``interval`` seconds (and once at the end). ``results.md``
keeps the full table.

:class:`CompactReporter` implements Ray Tune's ``ProgressReporter`` interface (``setup``,
``should_report``, ``report``: the three calls ``tune.run`` makes, in Ray 2.60
``ray/tune/tune.py``) without inheriting from it, so that this module imports no Ray: the unit
tests drive it with stand-in trials, and the command line loads it without Ray. Tune only uses
a passed-in reporter with its legacy output engine (``RAY_AIR_NEW_OUTPUT=0``; the new engine
ignores it with a warning), which :mod:`cluster.tune.runner` selects for the search.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["WIDTH", "CompactReporter", "short_names", "fit_columns", "format_value",
           "format_metric", "trial_rows", "table_lines"]

WIDTH = 100  # columns: the table never prints a longer line
MAX_CELL = 12  # a longer header or value is cut to this many characters
# mve's long config keys, shortened for the table (results.md keeps the full names)
ALIASES = {"starting_channels": "start_ch", "final_channels": "final_ch",
           "base_channels": "base_ch", "latent_channels": "latent_ch",
           "convs_per_group": "convs", "label_smoothing": "smoothing", "weight_decay": "wd",
           "crop_padding": "crop", "whiten_kernel": "whiten"}
_VAGUE = {"name", "type", "kind", "mode"}  # alone they say nothing: `optim.name` stays
_WORDS = {"TERMINATED": "done", "ERROR": "errored"}  # in the status line
_STATUS_ORDER = {"RUNNING": 0, "PAUSED": 1, "PENDING": 2, "TERMINATED": 3, "ERROR": 4}


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """A short, unique column name per dotted key: the last component (or its alias), with
    more of the key's components wherever two names would collide (``model.lr`` and
    ``optim.lr`` stay whole), and the full key when even that does not separate them."""
    def name(key: str, depth: int) -> str:
        parts = key.split(".")
        if depth > len(parts):
            return key
        return ".".join([*parts[len(parts) - depth:-1], ALIASES.get(parts[-1], parts[-1])])

    depth = {k: 2 if k.split(".")[-1] in _VAGUE else 1 for k in keys}
    while True:
        names = {k: name(k, depth[k]) for k in keys}
        counts: dict[str, int] = {}
        for n in names.values():
            counts[n] = counts.get(n, 0) + 1
        clash = [k for k in keys if counts[names[k]] > 1 and names[k] != k]
        if not clash:
            return names
        for k in clash:
            depth[k] += 1


def format_value(v: Any) -> str:
    """A param or metric as a table cell: 4 significant digits for floats."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def format_metric(v: Any) -> str:
    """A metric as a table cell: 4 decimals (``1.0000``, not ``1``), like the summary's."""
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) \
            and abs(v) < 1e4:
        return f"{v:.4f}"
    return format_value(v)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "~"


def fit_columns(headers: Sequence[str], rows: Sequence[Sequence[str]], *, fixed: int,
                width: int = WIDTH) -> tuple[list[str], int]:
    """The table's lines, at most ``width`` columns: cells are cut to :data:`MAX_CELL`
    characters, then columns after the first ``fixed`` are dropped from the right until the
    rest fits. Returns the lines and how many columns were dropped."""
    cols = [[_cut(h, MAX_CELL), *(_cut(r[i], MAX_CELL) for r in rows)]
            for i, h in enumerate(headers)]
    widths = [max(len(c) for c in col) for col in cols]
    n = len(cols)
    while n > fixed and sum(widths[:n]) + 2 * (n - 1) > width:
        n -= 1
    lines = ["  ".join(col[j].ljust(widths[i]) for i, col in enumerate(cols[:n])).rstrip()
             for j in range(len(rows) + 1)]
    return [line[:width] for line in lines], len(cols) - n


def trial_rows(trials: Sequence[Any], *, metric: str, mode: str) -> list[dict[str, Any]]:
    """Plain rows from Tune's trials (``trial_id``, ``status``, ``config``, ``last_result``,
    ``metric_analysis``), running trials first, then the best finished ones."""
    rows = []
    for t in trials:
        result = getattr(t, "last_result", None) or {}
        analysis = (getattr(t, "metric_analysis", None) or {}).get(metric) or {}
        value = result.get(metric)
        rows.append({"trial_id": str(t.trial_id), "status": str(t.status),
                     "epoch": result.get("epoch", result.get("training_iteration")),
                     "value": value, "best": analysis.get(mode, value),
                     "params": dict(getattr(t, "config", None) or {})})
    sign = -1.0 if mode == "max" else 1.0

    def key(r: dict[str, Any]) -> tuple:
        v = r["best"]
        scored = isinstance(v, int | float) and math.isfinite(v)
        return (_STATUS_ORDER.get(r["status"], 5), not scored, sign * v if scored else 0.0,
                r["trial_id"])

    return sorted(rows, key=key)


def table_lines(rows: Sequence[Mapping[str, Any]], *, names: Mapping[str, str], metric: str,
                max_epochs: int, width: int = WIDTH, max_rows: int = 20
                ) -> tuple[list[str], int]:
    """The table of ``rows`` (from :func:`trial_rows`), ``max_rows`` at most; returns the
    lines and how many param columns did not fit."""
    headers = ["trial", "status", "epoch", metric, *names.values()]
    cells = [[r["trial_id"], r["status"],
              f"{r['epoch']}/{max_epochs}" if r["epoch"] is not None else "",
              format_metric(r["value"]), *(format_value(r["params"].get(k)) for k in names)]
             for r in rows[:max_rows]]
    lines, dropped = fit_columns(headers, cells, fixed=4, width=width)
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more trials (all in results.md at the end)")
    return lines, dropped


def _say(text: str) -> None:
    print(text, flush=True)  # flushed: through a pipe (| tee) the table must not lag behind


def _elapsed(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class CompactReporter:
    """Ray Tune's ``ProgressReporter`` interface, printing the compact table.

    ``level`` 1: the table when a trial started, finished or reported an epoch, at most every
    ``interval`` seconds, and at the end; ``level`` 2: also one line per reported result.
    Picklable (Tune stores it with the experiment's run config): no stream is kept, lines go
    to stdout through ``print`` when written.
    """

    def __init__(self, *, name: str, metric: str, mode: str, param_keys: Sequence[str],
                 max_epochs: int, level: int = 1, interval: float = 30.0, width: int = WIDTH,
                 max_rows: int = 20):
        self.name, self.metric, self.mode = name, metric, mode
        self.names = short_names(list(param_keys))
        self.max_epochs, self.level, self.interval = max_epochs, level, interval
        self.width, self.max_rows = width, max_rows
        self._start = time.time()
        self._total: int | None = None
        self._last_table = -math.inf
        self._shown: tuple = ()
        self._seen: dict[str, Any] = {}  # trial id -> last epoch printed as a result line
        self._due: tuple[bool, list[str]] = (False, [])

    def setup(self, start_time: float | None = None, total_samples: int | None = None,
              metric: str | None = None, mode: str | None = None, **kwargs: Any) -> None:
        """Called by Tune before the first report (metric and mode are this search's)."""
        self._start = start_time or time.time()
        self._total = total_samples

    def should_report(self, trials: Sequence[Any], done: bool = False) -> bool:
        rows = trial_rows(trials, metric=self.metric, mode=self.mode)
        state = tuple((r["trial_id"], r["status"], r["epoch"]) for r in rows)
        started = any(r["status"] != "PENDING" for r in rows)
        table = done or (started and state != self._shown
                         and time.monotonic() - self._last_table >= self.interval)
        lines = self._result_lines(rows) if self.level >= 2 else []
        if table:
            self._shown = state
        self._due = (table, lines)
        return table or bool(lines)

    def report(self, trials: Sequence[Any], done: bool, *sys_info: str,
               write: Callable[[str], None] | None = None) -> None:
        write = write or _say
        table, lines = self._due
        self._due = (False, [])
        for line in lines:
            write(line)
        if table:
            self._last_table = time.monotonic()
            write("\n".join(["", *self.render(trials)]))

    def render(self, trials: Sequence[Any]) -> list[str]:
        """The status line, the table, and which params did not fit."""
        rows = trial_rows(trials, metric=self.metric, mode=self.mode)
        lines, dropped = table_lines(rows, names=self.names, metric=self.metric,
                                     max_epochs=self.max_epochs, width=self.width,
                                     max_rows=self.max_rows)
        if dropped:
            hidden = ", ".join(list(self.names.values())[-dropped:])
            lines.append(_cut(f"not shown: {hidden} (see results.md)", self.width))
        return [self._status(rows), *lines]

    def _status(self, rows: Sequence[Mapping[str, Any]]) -> str:
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        states = ", ".join(f"{n} {_WORDS.get(s, s.lower())}" for s, n in sorted(
            counts.items(), key=lambda sn: _STATUS_ORDER.get(sn[0], 5)))
        parts = [f"{self.name} {_elapsed(time.time() - self._start)}",
                 f"{len(rows)}/{self._total or len(rows)} trials: {states}"]
        scored = [r for r in rows if isinstance(r["best"], int | float)
                  and math.isfinite(r["best"])]
        if scored:
            best = (max if self.mode == "max" else min)(scored, key=lambda r: r["best"])
            parts.append(f"best {best['trial_id']} {format_metric(best['best'])}")
        return _cut(" | ".join(parts), self.width)

    def _result_lines(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """One line per result not printed yet (``level`` 2)."""
        out = []
        for r in rows:
            if r["epoch"] is None or self._seen.get(r["trial_id"]) == r["epoch"]:
                continue
            self._seen[r["trial_id"]] = r["epoch"]
            params = " ".join(f"{n}={format_value(r['params'].get(k))}"
                              for k, n in self.names.items())
            out.append(_cut(f"{r['trial_id']} epoch {r['epoch']}/{self.max_epochs} "
                            f"{self.metric} {format_metric(r['value'])}  {params}", self.width))
        return out
