"""Derived kernel spans on a GPU: the real runner's CUDA-graph decode, timed with CUDA events, and the
real CUPTI recording one replay per graph (``cupti-python``, the ``gpu`` extra); skipped elsewhere.
Run on the device: ``python3 -m pytest -q tests/inference/test_tracing_gpu.py``. The CPU form of the
same flow (eager decode, torch's profiler): tests/inference/test_tracing.py."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest

from tests.inference.helpers import TINY, kernel_traced_completion, tiny_config

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("cupti") is None, reason="needs cupti-python (the gpu extra)"),
]


async def test_graph_replays_are_recorded_once_then_derived_inside_their_step(serve) -> None:
    from otel.config import KernelTraceConfig
    from otel.kernels.factory import make_capture
    from otel.names import FORWARD_SPAN

    config = KernelTraceConfig(ratio=1.0, steps_per_request=12, max_captures_per_minute=1000,
                               max_spans_per_trace=100_000, stall_budget_pct=0, activities="cuda", capture="cupti")
    capture = make_capture(config)
    # Attached before the request, as the tracer's preparing thread attaches it for a waiting one: a
    # fresh process's first attach (CUPTI's own start-up) outlasts this tiny model's whole 48-token
    # request, which then ends with no pass recorded (the tracer attaches only on demand).
    capture.prepare()
    spans, kernels = await kernel_traced_completion(serve, tiny_config(model=replace(TINY, device="cuda")), config,
                                                    capture, 48)
    by_id = {s.context.span_id: s for s in spans}
    forwards = sorted((s for s in spans if s.name == FORWARD_SPAN), key=lambda s: s.start_time)
    recorded = [f for f in forwards if f.attributes["kernelgate.kernels.source"] == "recorded"
                and "kernelgate.kernels.graph_key" in f.attributes]
    derived = [f for f in forwards if f.attributes["kernelgate.kernels.source"] == "derived"]
    assert recorded and derived, [(f.attributes["kernelgate.step.index"], f.attributes["kernelgate.kernels.source"])
                                  for f in forwards]
    assert kernels.stats.templates >= 1 and kernels.stats.failures == 0
    template_kernels = recorded[0].attributes["kernelgate.kernels.count"]
    for forward in derived:
        a = forward.attributes
        # the graph's kernels only (the recorded pass also has the sampling kernels launched after it)
        assert 0 < a["kernelgate.kernels.count"] < template_kernels
        assert a["kernelgate.kernels.replay_ns"] > 0
        step = by_id[forward.parent.span_id]
        assert step.name == "engine.step" and step.start_time <= forward.start_time <= forward.end_time <= step.end_time
        children = [s for s in spans if s.parent is not None and s.parent.span_id == forward.context.span_id]
        assert children and all(k.attributes["kernelgate.kernel.derived"] is True for k in children)
        assert all(forward.start_time <= k.start_time <= k.end_time <= forward.end_time for k in children)
        # placed inside the replay's measured time: they end by its end mark
        assert max(k.end_time for k in children) - min(k.start_time for k in children) <= a["kernelgate.kernels.replay_ns"]
