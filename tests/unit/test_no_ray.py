"""`mve` never imports `ray`: import every module in a fresh interpreter and check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mve

SCRIPT = r"""
import importlib, pkgutil, sys
import mve
names = [m.name for m in pkgutil.walk_packages(mve.__path__, "mve.")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
print(len(names), "modules;", "leaked:", leaked)
sys.exit(1 if leaked else 0)
"""


def test_importing_every_mve_module_leaves_ray_unimported():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          cwd=Path(mve.__file__).parent.parent, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "leaked: []" in proc.stdout
    count = int(proc.stdout.split()[0])
    assert count >= 10  # the walk really found the package's modules
