"""One fault lab for the suite (its own Redis with AOF, S3 behind a fault proxy, a worker)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # lab, scenarios

from lab import Lab


@pytest.fixture(scope="session")
def lab(parents, tmp_path_factory):
    lab = Lab(parents, tmp_path_factory.mktemp("faults")).start()
    try:
        yield lab
    finally:
        lab.close()
