"""Each captured request's share of a pass's GPU time: divided by tokens, summing to the pass's kernel time.

End to end on CPU: the real engine, kernel capture through torch's profiler (CPU operators
stand in for kernels), every request captured, spans into the SDK's in-memory exporter.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import aiohttp
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from inference.config import BatchingConfig
from inference.tracing import Tracing
from otel.config import KernelTraceConfig
from otel.kernels.plan import gpu_shares
from otel.kernels.torch_capture import TorchProfilerCapture
from otel.kernels.tracer import KernelTracer
from otel.names import FORWARD_SPAN
from tests.inference.conftest import serve  # noqa: F401 - the in-process server fixture
from tests.inference.helpers import make_engine, tiny_config

MODEL = "tiny-gpt2"


def test_shares_follow_tokens_and_sum_exactly() -> None:
    assert gpu_shares(1000, [3, 1]) == [750, 250]
    assert sum(gpu_shares(1001, [1, 1, 1])) == 1001
    assert gpu_shares(10, [0, 5]) == [0, 10]
    assert gpu_shares(7, [0, 0]) == [4, 3] or gpu_shares(7, [0, 0]) == [3, 4]
    for total in (0, 1, 999, 123456789):
        for tokens in ([1], [5, 7, 11], [100, 1, 1, 1], [2] * 16):
            shares = gpu_shares(total, tokens)
            assert sum(shares) == total
            assert all(abs(s - total * t / sum(tokens)) < 1 for s, t in zip(shares, tokens))


async def test_request_shares_of_each_captured_pass_sum_to_its_kernel_time(serve) -> None:  # noqa: F811
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    kernels = KernelTracer(KernelTraceConfig(ratio=1.0, steps_per_request=100, max_captures_per_minute=1000,
                                             max_spans_per_trace=100000, activities="cpu", capture="torch",
                                                 derive=False),
                           provider.get_tracer("k"), TorchProfilerCapture("cpu"))
    tracing = Tracing(provider.get_tracer("inference"), request_observer=kernels)
    # The idle engine holds a lone request up to max_wait_ms, so the three arrive in one prefill.
    config = tiny_config(batching=BatchingConfig(max_batch_size=8, max_wait_ms=500.0, max_queue=64))
    engine = make_engine(config, observer=kernels, tracing=tracing)
    served = await serve(config, engine=engine, tracing=tracing)
    try:
        async with aiohttp.ClientSession() as s:
            await asyncio.sleep(0)
            while not engine.ready:
                await asyncio.sleep(0.05)
            bodies = [{"model": MODEL, "prompt": "a" * length, "max_tokens": 3, "ignore_eos": True, "n": n}
                      for length, n in ((5, 1), (40, 1), (17, 2))]
            responses = await asyncio.gather(*(s.post(f"{served.url}/v1/completions", json=b) for b in bodies))
            assert [r.status for r in responses] == [200, 200, 200]
    finally:
        engine.shutdown(10)
        kernels.close()
        provider.shutdown()
    finished = exporter.get_finished_spans()
    forwards = [s for s in finished if s.name == FORWARD_SPAN]
    assert forwards, "every request was selected for capture"
    by_step: dict[int, list] = defaultdict(list)
    for span in forwards:
        by_step[span.attributes["kernelgate.step.index"]].append(span)
    checked = 0
    for spans in by_step.values():
        total = spans[0].attributes["kernelgate.kernels.gpu_time_ns"]
        assert {s.attributes["kernelgate.kernels.gpu_time_ns"] for s in spans} == {total}
        assert total > 0
        shares = [s.attributes["kernelgate.gpu.request_share_ns"] for s in spans]
        assert sum(shares) == total, (shares, total)
        checked += 1
    prefill = [spans for spans in by_step.values() if spans[0].attributes["kernelgate.step.phase"] == "prefill"
               and len(spans) == 3]
    for spans in prefill:  # the prompts were prefilled together: shares follow their lengths (17 counted once)
        total = spans[0].attributes["kernelgate.kernels.gpu_time_ns"]
        share = sorted(s.attributes["kernelgate.gpu.request_share_ns"] for s in spans)
        assert share == sorted(gpu_shares(total, [5, 40, 17]))
    assert len(prefill) == 1 and checked >= 3
    # Each request's server span carries the sum of its passes' shares (it waited for their export).
    requests = [s for s in finished if s.name == "POST /v1/completions"]
    assert len(requests) == 3
    for request in requests:
        mine = [f for f in forwards if f.context.trace_id == request.context.trace_id]
        assert mine and request.attributes["kernelgate.gpu.request_share_ns"] == sum(
            f.attributes["kernelgate.gpu.request_share_ns"] for f in mine)
