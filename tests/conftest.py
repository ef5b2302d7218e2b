"""Shared fixtures: real programs on loopback, started per test (or module) and stopped after;
and ``sdk``, an OpenTelemetry SDK tracer provider whose spans land in memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests import procs


@pytest.fixture
def sdk():
    """A tracer provider of its own (not the global one) and the in-memory exporter its spans go to."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[procs.Proc]:
    proc = procs.start_redis(tmp_path / "redis")
    yield proc
    proc.stop()


@pytest.fixture
def redis_url(redis_server: procs.Proc) -> str:
    return f"redis://127.0.0.1:{redis_server.ports['port']}/0"
