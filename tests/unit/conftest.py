"""Unit tests exercise pure `mve`: importing `ray` anywhere under them is an error."""

from __future__ import annotations

import importlib.abc
import sys

import pytest


class _BlockRay(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "ray" or fullname.startswith("ray."):
            raise ImportError(f"unit tests must not import ray (tried {fullname!r})")
        return None


@pytest.fixture(autouse=True)
def _no_ray():
    if "ray" in sys.modules:
        pytest.fail("ray was imported before a unit test ran")
    blocker = _BlockRay()
    sys.meta_path.insert(0, blocker)
    try:
        yield
    finally:
        sys.meta_path.remove(blocker)
