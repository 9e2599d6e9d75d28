"""The README's runnable Python example (the block after the ``python-example`` marker), for the
tests that run it as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def python_example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- python-example[^>]*-->\n```python\n(.*?)```", text, re.S)
    if m is None:
        raise AssertionError("README.md lost its Python example (the python-example marker)")
    return m.group(1)
