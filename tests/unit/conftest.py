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
    # `make test` runs tests/unit in a pytest process of its own, where nothing has imported
    # ray and any import of it below is an error. In a combined run the integration modules
    # import ray at collection, so only the blocker for new imports applies.
    blocker = _BlockRay()
    sys.meta_path.insert(0, blocker)
    try:
        yield
    finally:
        sys.meta_path.remove(blocker)
