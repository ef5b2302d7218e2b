"""Helpers shared by the inference tests: configs, engines, direct generation, metric reads."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from inference.api import STATE, ServerState
from inference.config import BatchingConfig, InferenceConfig, LimitsConfig, ModelConfig
from inference.engine import Engine
from inference.generation import GenerationRequest, SamplingParams
from inference.metrics import InferenceMetrics
from inference.tracing import StepInfo, Tracing

TINY = ModelConfig(name="tiny-gpt2", random_config="tiny-gpt2", device="cpu", use_deepspeed=False)


def tiny_config(**sections: Any) -> InferenceConfig:
    """The default test config (tiny model, port chosen at bind time) with sections replaced."""
    base = InferenceConfig(model=TINY, batching=BatchingConfig(max_batch_size=8, max_wait_ms=2.0, max_queue=64),
                           limits=LimitsConfig(request_timeout_s=60.0, drain_timeout_s=10.0))
    return replace(base, **sections)


class SlowSteps:
    """A forward observer that makes each engine step take at least ``delay_s`` (and records steps)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.started: list[StepInfo] = []
        self.finished: list[tuple[StepInfo, Any]] = []

    def start(self, step: StepInfo) -> None:
        self.started.append(step)
        if self.delay_s:
            time.sleep(self.delay_s)

    def finish(self, step: StepInfo, span_context: Any) -> None:
        self.finished.append((step, span_context))

    def idle(self) -> bool:
        return False  # it watches every step: one at a time


def make_engine(config: InferenceConfig, observer: Any = None, tracing: Tracing | None = None,
                load: Callable[..., Any] | None = None) -> Engine:
    kwargs = {"load": load} if load is not None else {}
    return Engine(config.model, config.batching, InferenceMetrics(CollectorRegistry()), tracing or Tracing(),
                  forward_observer=observer, **kwargs)


def started_engine(config: InferenceConfig, **kwargs: Any) -> Engine:
    engine = make_engine(config, **kwargs)
    engine.start()
    deadline = time.monotonic() + 60
    while not engine.ready:
        assert engine.failure is None, f"engine failed: {engine.failure!r}"
        assert time.monotonic() < deadline, "engine did not become ready"
        time.sleep(0.05)
    return engine


@dataclass
class Served:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def state(self) -> ServerState:
        return self.app[STATE]


@dataclass
class Generated:
    token_ids: list[int]
    text: str
    finish_reason: str | None


async def generate(engine: Engine, prompt: list[int], max_tokens: int, temperature: float = 0.0,
                   seed: int | None = None, stop: tuple[str, ...] = (), delay_s: float = 0.0) -> Generated:
    """Run one request straight on the engine (no HTTP) and collect its tokens."""
    if delay_s:
        await asyncio.sleep(delay_s)
    stream = engine.submit(GenerationRequest(
        request_id=uuid.uuid4().hex, prompt_token_ids=tuple(prompt),
        params=SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, stop=stop)))
    result = Generated([], "", None)
    async for output in stream:
        result.token_ids.extend(output.token_ids)
        result.text += output.text
        if output.finished:
            result.finish_reason = output.finish_reason
    return result


def metric_value(served_or_registry: Any, name: str, **labels: str) -> float:
    registry = served_or_registry.state.metrics.registry if isinstance(served_or_registry, Served) \
        else served_or_registry
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


class Gate:
    """A model loader that waits for ``open()`` before loading (to observe not-ready states)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def open(self) -> None:
        self._event.set()

    def __call__(self, config: ModelConfig, max_batch_size: int) -> Any:
        from inference.model_loader import load_model

        self._event.wait(30)
        return load_model(config, max_batch_size)


async def kernel_traced_completion(serve: Callable[..., Any], config: InferenceConfig, kernels_config: Any,
                                   capture: Any, max_tokens: int) -> tuple[list[Any], Any]:
    """One completion through the real server and engine with the real kernel tracer on ``capture``:
    every finished span (in memory) and the tracer (its counters)."""
    import aiohttp
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from inference.tracing import TRACER_NAME
    from otel.kernels.tracer import KernelTracer

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    kernels = KernelTracer(kernels_config, provider.get_tracer("k"), capture)
    tracing = Tracing(provider.get_tracer(TRACER_NAME), request_observer=kernels)
    engine = started_engine(config, observer=kernels, tracing=tracing)
    try:
        served = await serve(engine=engine, tracing=tracing)
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{served.url}/v1/completions",
                              json={"model": config.model.name, "prompt": "trace my kernels", "max_tokens": max_tokens,
                                    "ignore_eos": True},
                              headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
                              ) as resp:
                assert resp.status == 200, await resp.text()
    finally:
        engine.shutdown(10)
        kernels.close()
        provider.shutdown()
    return list(exporter.get_finished_spans()), kernels
