"""What `mve tune` prints, as a newcomer's terminal (or a pipe) gets it: a compact table of the
trials, at most 100 columns wide, and one summary at the end, also with -q and on a resume.

    .venv/bin/python -m pytest tests/integration/test_tune_console.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _archives import TINY_SPACE, colour_archive

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
WIDTH = 100
# a record in mve's log format (mve.logs.LOG_FORMAT): its prefix (time, level, module and
# function, about 55 columns) is that format's business; the message after it must fit
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - [A-Z]+ - \[[\w.]+:\w+\] (.*)$")


def _tune(root: Path, *extra: str) -> list[str]:
    """``python -m cluster.tune`` in a subprocess with stdout and stderr on one pipe (what a
    terminal shows, in that order); its lines, once the exit code is checked. Relative
    --storage/--out from ``root``: the printed paths stay short, as in a project."""
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.tune", "classifier", "--data", "data/d.tar.gz",
         "--space", "space.yaml", "--samples", "2", "--max-epochs", "1", "--val-size", "30",
         "--storage", "storage", "--out", "out", *extra],
        cwd=root, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout.splitlines()


def _too_wide(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        record = LOG_RECORD.match(line)
        if len(record.group(1) if record else line) > WIDTH:
            out.append(line)
    return out


def test_a_search_prints_a_compact_table_and_one_summary(tmp_path):
    colour_archive(tmp_path / "data")
    (tmp_path / "space.yaml").write_text(TINY_SPACE)
    lines = _tune(tmp_path)
    text = "\n".join(lines)
    assert not _too_wide(lines), "\n".join(_too_wide(lines))
    assert len(lines) <= 60, text
    # the compact table: id, status, epoch, metric and the searched param by its short name
    headers = [line for line in lines if line.split()[:5] == ["trial", "status", "epoch",
                                                              "val_accuracy", "lr"]]
    assert headers, text
    assert "optim.lr" not in "\n".join(headers) and "Trial name" not in text
    finals = [line for line in lines if " | 2/2 trials: 2 done | best " in line]
    assert finals, text
    # the summary, last: metric, checkpoint, report, the serve command
    summary = lines[lines.index(next(x for x in lines if x.startswith("mve tune classifier: "))):]
    assert summary[0] == ("mve tune classifier: 2 trials, 2 finished (0 stopped early by ASHA), "
                          "0 errored")
    assert re.fullmatch(r"  result +val_accuracy \d\.\d{4} \(\d+\.\d%\) at epoch 1", summary[2])
    assert "  checkpoint    out/best" in summary and "  report        out/best/REPORT.md" in summary
    assert summary[-1] == "  serve it      mve serve --classifier out/best"
    assert (tmp_path / "out" / "best" / "REPORT.md").is_file()
    assert (tmp_path / "out" / "results.md").is_file()  # the full table

    # The same search again, quiet: it restores the finished experiment (whose recorded console
    # is verbose) and prints only the resume note and the summary.
    quiet = _tune(tmp_path, "-q")
    assert quiet[0].startswith("resuming the search: experiment tune-classifier (2 of 2 trials")
    assert not [line for line in quiet if len(line) > WIDTH], "\n".join(quiet)
    assert not [line for line in quiet if line.startswith("trial ")], "\n".join(quiet)
    assert quiet[-1] == summary[-1] and len(quiet) <= 20, "\n".join(quiet)
