"""Shared fixtures: real programs on loopback, started per test (or module) and stopped after."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import procs


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[procs.Proc]:
    proc = procs.start_redis(tmp_path / "redis")
    yield proc
    proc.stop()


@pytest.fixture
def redis_url(redis_server: procs.Proc) -> str:
    return f"redis://127.0.0.1:{redis_server.ports['port']}/0"
