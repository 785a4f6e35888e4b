"""Fixtures shared by the Duplex tests: every test runs over tcp:// and unix://."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterator

import pytest

Endpoints = Callable[[], str]


@pytest.fixture(params=["tcp", "unix"])
def endpoints(request: pytest.FixtureRequest) -> Iterator[Endpoints]:
    """Fresh endpoints: loopback port 0, or a socket in a short temp dir."""
    if request.param == "tcp":
        yield lambda: "tcp://127.0.0.1:0"
        return
    folder = tempfile.mkdtemp(prefix="dpx-", dir="/tmp")  # sun_path is short
    numbers = itertools.count()
    yield lambda: f"unix://{folder}/{next(numbers)}.sock"
    shutil.rmtree(folder, ignore_errors=True)
