"""Shared test fixtures: a per-session tensor cache and the location of the shared data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# the generated test archives (tests/integration/_archives.py) for every test folder
sys.path.insert(0, str(REPO / "tests" / "integration"))
SHARED_ARCHIVE = Path(os.environ.get(
    "MVE_TEST_ARCHIVE", REPO.parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keeps the decoded-image cache out of ~/.cache during tests."""
    old = os.environ.get("MVE_CACHE_DIR")
    os.environ["MVE_CACHE_DIR"] = str(tmp_path_factory.mktemp("mve-cache"))
    yield
    if old is None:
        os.environ.pop("MVE_CACHE_DIR", None)
    else:
        os.environ["MVE_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def shared_archive() -> Path:
    if not SHARED_ARCHIVE.exists():
        pytest.skip(f"shared CIFAR-10 archive not found at {SHARED_ARCHIVE}")
    return SHARED_ARCHIVE
