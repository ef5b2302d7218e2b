"""Kernel capture (otel/kernels/) without a GPU: the pure parts on synthetic events, the
capture on CPU operators, and the observer end to end into the SDK's in-memory exporter."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags

from otel.config import KernelTraceConfig
from otel.kernels.cupti_capture import CuptiCapture
from otel.kernels.plan import ClockAnchor, KernelEvent, plan_kernel_spans, short_kernel_name
from otel.kernels.selection import CaptureSampler, in_ratio, is_forced
from otel.kernels.torch_capture import TorchProfilerCapture
from otel.kernels.tracer import KernelTracer
from otel.names import FORWARD_SPAN
from tests.otel.fake_cupti import GEMM, FakeCupti, fake_demangle

MS = 1_000_000


def ev(name: str, start_ms: float, end_ms: float) -> KernelEvent:
    return KernelEvent(name, int(start_ms * MS), int(end_ms * MS), device=0, stream=7)


# --- clock mapping, folding, caps ----------------------------------------------------------------------
def test_anchor_maps_profiler_time_onto_wall_clock() -> None:
    anchor = ClockAnchor(profiler_ns=5 * MS, wall_ns=1_700_000_000_000 * MS, uncertainty_ns=1000)
    assert anchor.to_wall(5 * MS) == 1_700_000_000_000 * MS
    assert anchor.to_wall(7 * MS) - anchor.to_wall(5 * MS) == 2 * MS


def test_plan_maps_into_parent_window_with_real_times() -> None:
    wall0 = 1_000_000 * MS
    anchor = ClockAnchor(profiler_ns=0, wall_ns=wall0)
    plan = plan_kernel_spans([ev("gemm", 1, 2), ev("softmax", 2.5, 3)], anchor, (wall0, wall0 + 10 * MS),
                             fold_after=8, max_spans=100)
    assert [(s.name, s.start_ns - wall0, s.end_ns - wall0, s.count) for s in plan.spans] == [
        ("gemm", 1 * MS, 2 * MS, 1), ("softmax", int(2.5 * MS), 3 * MS, 1)]
    assert plan.kernels == 2 and plan.clamped == 0 and plan.dropped == 0
    assert plan.gpu_time_ns == int(1.5 * MS)


def test_plan_clamps_kernels_outside_the_window_and_counts_them() -> None:
    anchor = ClockAnchor(profiler_ns=0, wall_ns=0)
    plan = plan_kernel_spans([ev("early", -1, 1), ev("late", 9, 12), ev("ok", 2, 3)], anchor, (0, 10 * MS),
                             fold_after=8, max_spans=100)
    assert plan.clamped == 2
    for span in plan.spans:
        assert 0 <= span.start_ns <= span.end_ns <= 10 * MS


def test_plan_folds_launches_beyond_fold_after_into_one_counted_span() -> None:
    anchor = ClockAnchor(profiler_ns=0, wall_ns=0)
    events = [ev("void at::native::gemm<float, 4>(float*, int)", i, i + 0.5) for i in range(10)] + [ev("norm", 20, 21)]
    plan = plan_kernel_spans(events, anchor, (0, 100 * MS), fold_after=3, max_spans=100)
    gemm = [s for s in plan.spans if s.name == "at::native::gemm"]
    assert [s.count for s in gemm] == [1, 1, 1, 7]
    folded = gemm[-1]
    assert (folded.start_ns, folded.end_ns) == (3 * MS, int(9.5 * MS))
    assert folded.gpu_time_ns == 7 * MS // 2
    assert folded.kernel_name.startswith("void at::native::gemm<float, 4>")
    assert plan.folded == 7 and plan.kernels == 11
    assert sum(s.count for s in plan.spans) == 11


def test_plan_caps_spans_keeping_the_most_gpu_time() -> None:
    anchor = ClockAnchor(profiler_ns=0, wall_ns=0)
    events = [ev(f"k{i}", i, i + 0.1 * (i + 1)) for i in range(6)]
    plan = plan_kernel_spans(events, anchor, (0, 100 * MS), fold_after=8, max_spans=2)
    assert [s.name for s in plan.spans] == ["k4", "k5"]
    assert plan.dropped == 4
    assert [s.start_ns for s in plan.spans] == sorted(s.start_ns for s in plan.spans)


def test_short_kernel_names() -> None:
    assert short_kernel_name("void cutlass::Kernel2<cutlass_80_tensorop>(Params)") == "cutlass::Kernel2"
    assert short_kernel_name("ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_tn") == \
        "ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_tn"
    assert short_kernel_name("Memcpy HtoD (Pageable -> Device)") == "Memcpy HtoD"
    assert short_kernel_name("void at::native::(anonymous namespace)::cunn_SoftMaxForward<8, c10::Half>(c10::Half*)") \
        == "at::native::cunn_SoftMaxForward"
    assert short_kernel_name("void (anonymous namespace)::elementwise_kernel_with_index<int>(int)") == \
        "elementwise_kernel_with_index"
    assert len(short_kernel_name("x" * 500)) == 96


# --- selection ----------------------------------------------------------------------------------------------
def test_ratio_is_decided_by_trace_id_like_head_sampling() -> None:
    low = 0x0000_0000_0000_0000_0000_0000_0000_0001
    high = 0x0000_0000_0000_0000_ffff_ffff_ffff_fff0
    assert in_ratio(low, 0.01) and not in_ratio(high, 0.01)
    assert not in_ratio(low, 0.0) and in_ratio(high, 1.0)
    import random

    rng = random.Random(7)
    hits = sum(in_ratio(rng.getrandbits(128), 0.1) for _ in range(20000))
    assert 1700 < hits < 2300


def test_forced_header_values() -> None:
    assert is_forced({"x-kernelgate-trace-kernels": "1"}, "x-kernelgate-trace-kernels")
    assert is_forced({"x-kernelgate-trace-kernels": "true"}, "x-kernelgate-trace-kernels")
    assert not is_forced({"x-kernelgate-trace-kernels": "0"}, "x-kernelgate-trace-kernels")
    assert not is_forced({}, "x-kernelgate-trace-kernels")


def test_sampler_needs_a_sampled_trace_and_caps_captures_per_minute() -> None:
    now = [0.0]
    sampler = CaptureSampler(ratio=1.0, max_per_minute=2, clock=lambda: now[0])
    assert sampler.decide(1, sampled=False, forced=True) is None
    assert sampler.decide(1, sampled=True, forced=True) == "forced"
    assert sampler.decide(2, sampled=True, forced=False) == "ratio"
    assert sampler.decide(3, sampled=True, forced=True) is None, "forced captures are rate-limited too"
    assert sampler.rate_limited == 1
    now[0] = 59.9
    assert sampler.decide(4, sampled=True, forced=False) is None
    now[0] = 60.0
    assert sampler.decide(5, sampled=True, forced=False) == "ratio"
    never = CaptureSampler(ratio=0.0, max_per_minute=100)
    assert never.decide(1, sampled=True, forced=False) is None
    assert never.decide(1, sampled=True, forced=True) == "forced"


# --- the capture on CPU --------------------------------------------------------------------------------------
def test_torch_profiler_capture_on_cpu_maps_operators_into_the_wall_window() -> None:
    import torch

    capture = TorchProfilerCapture("cpu")
    x = torch.randn(32, 32)
    before = time.time_ns()
    capture.start()
    for _ in range(3):
        x = torch.mm(x, x).relu()
    raw = capture.stop()
    after = time.time_ns()
    events, anchor = capture.events(raw)
    names = [e.name for e in events]
    assert names.count("aten::mm") == 3 and "aten::relu" in names
    assert 0 <= anchor.uncertainty_ns < 50 * MS
    for e in events:
        assert before - anchor.uncertainty_ns <= anchor.to_wall(e.start_ns) <= anchor.to_wall(e.end_ns) \
            <= after + anchor.uncertainty_ns, e


def test_cpu_capture_keeps_only_the_capturing_thread() -> None:

    import torch

    capture = TorchProfilerCapture("cpu")
    capture.start()
    other = threading.Thread(target=lambda: torch.ones(4).add_(1))
    other.start()
    other.join()
    torch.zeros(4).sub_(1)
    events, _ = capture.events(capture.stop())
    names = {e.name for e in events}
    assert "aten::sub_" in names and "aten::add_" not in names


# --- the observer end to end ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """Shape of inference.tracing.StepInfo (what the engine passes)."""

    index: int
    phase: str
    batch_size: int
    num_tokens: int
    request_ids: tuple[str, ...]
    start_time_ns: int
    trace_contexts: tuple = ()


def run_steps(tracer: KernelTracer, provider: TracerProvider, contexts: tuple, steps: int,
              step_parent: SpanContext | None = None) -> list[SpanContext]:
    import torch

    step_tracer = provider.get_tracer("engine")
    step_spans = []
    for index in range(steps):
        step = Step(index, "prefill" if index == 0 else "decode", len(contexts), 4, tuple(f"r{i}" for i in
                    range(len(contexts))), time.time_ns(), contexts)
        tracer.start(step)
        x = torch.randn(16, 16)
        for _ in range(12):
            x = torch.tanh(x @ x)
        ctx = trace.set_span_in_context(trace.NonRecordingSpan(step_parent)) if step_parent else None
        span = step_tracer.start_span("engine.step", context=ctx, start_time=step.start_time_ns)
        span.end()
        tracer.finish(step, span.get_span_context())
        step_spans.append(span.get_span_context())
    return step_spans


def test_forced_request_gets_forward_and_kernel_spans_with_real_times_and_folding(sdk) -> None:
    provider, exporter = sdk
    config = KernelTraceConfig(ratio=0.0, fold_after=4, steps_per_request=2, max_spans_per_trace=200)
    tracer = KernelTracer(config, provider.get_tracer("k"), TorchProfilerCapture("cpu"))
    request = provider.get_tracer("api").start_span("POST /v1/completions")
    assert tracer.on_request(request, {"x-kernelgate-trace-kernels": "1"}) == "forced"
    other = provider.get_tracer("api").start_span("POST /v1/completions")
    assert tracer.on_request(other, {}) is None
    contexts = (request.get_span_context(), other.get_span_context())
    step_spans = run_steps(tracer, provider, contexts, steps=3)
    tracer.close()
    request.end()
    other.end()
    spans = exporter.get_finished_spans()
    forwards = [s for s in spans if s.name == FORWARD_SPAN]
    assert len(forwards) == 2, "steps_per_request limits the profiled passes"
    req_ctx = request.get_span_context()
    total = 0
    for forward, step_ctx in zip(sorted(forwards, key=lambda s: s.start_time), step_spans):
        # the step span is in another trace here: the forward span hangs off the request, linked to the step
        assert forward.parent.span_id == req_ctx.span_id and forward.context.trace_id == req_ctx.trace_id
        assert [link.context.span_id for link in forward.links] == [step_ctx.span_id]
        assert forward.attributes["kernelgate.kernels.capture"] == "forced"
        assert forward.attributes["kernelgate.kernels.recorder"] == "torch.profiler"
        kernels = [s for s in spans if s.parent is not None and s.parent.span_id == forward.context.span_id]
        assert kernels, "CPU operators stand in for kernels"
        total += 1 + len(kernels)
        for k in kernels:
            assert forward.start_time <= k.start_time <= k.end_time <= forward.end_time
        tanh = [k for k in kernels if k.attributes["gpu.kernel.name"] == "aten::tanh"]
        assert [k.attributes["kernelgate.kernel.count"] for k in tanh] == [1, 1, 1, 1, 8]
        assert tanh[-1].attributes["kernelgate.kernel.folded"] is True
        assert forward.attributes["kernelgate.kernels.count"] >= 24
    assert total <= config.max_spans_per_trace
    assert not any(s.context.trace_id == other.get_span_context().trace_id and s.name == FORWARD_SPAN
                   for s in spans)


def test_spans_per_trace_are_capped_across_the_captured_passes(sdk) -> None:
    provider, exporter = sdk
    config = KernelTraceConfig(ratio=1.0, fold_after=4, steps_per_request=3, max_spans_per_trace=30)
    tracer = KernelTracer(config, provider.get_tracer("k"), TorchProfilerCapture("cpu"))
    request = provider.get_tracer("api").start_span("POST /v1/completions")
    assert tracer.on_request(request, {}) == "ratio"
    run_steps(tracer, provider, (request.get_span_context(),), steps=3)
    tracer.close()
    request.end()
    in_trace = [s for s in exporter.get_finished_spans()
                if s.context.trace_id == request.get_span_context().trace_id and s.name != "POST /v1/completions"]
    assert len(in_trace) == config.max_spans_per_trace
    forwards = sorted((s for s in in_trace if s.name == FORWARD_SPAN), key=lambda s: s.start_time)
    assert len(forwards) == 2, "the third pass finds the budget spent"
    assert forwards[0].attributes["kernelgate.kernels.dropped"] == 0
    assert forwards[1].attributes["kernelgate.kernels.dropped"] > 0


def test_forward_span_goes_under_the_step_span_when_the_step_is_in_the_request_trace(sdk) -> None:
    provider, exporter = sdk
    tracer = KernelTracer(KernelTraceConfig(ratio=1.0, steps_per_request=1), provider.get_tracer("k"),
                          TorchProfilerCapture("cpu"))
    request = provider.get_tracer("api").start_span("POST /v1/completions")
    assert tracer.on_request(request, {}) == "ratio"
    step_spans = run_steps(tracer, provider, (request.get_span_context(),), steps=2,
                           step_parent=request.get_span_context())
    tracer.close()
    request.end()
    spans = exporter.get_finished_spans()
    (forward,) = [s for s in spans if s.name == FORWARD_SPAN]
    assert forward.parent.span_id == step_spans[0].span_id and not forward.links
    assert dict(request.attributes)["kernelgate.kernels.capture"] == "ratio"


def test_unsampled_or_unselected_requests_cost_no_capture(sdk) -> None:
    provider, exporter = sdk

    class Counting(TorchProfilerCapture):
        starts = 0

        def start(self) -> None:
            Counting.starts += 1
            super().start()

    tracer = KernelTracer(KernelTraceConfig(ratio=1.0), provider.get_tracer("k"), Counting("cpu"))
    unsampled = trace.NonRecordingSpan(SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(0)))
    assert tracer.on_request(unsampled, {"x-kernelgate-trace-kernels": "1"}) is None
    run_steps(tracer, provider, (unsampled.get_span_context(), None), steps=2)
    tracer.close()
    assert Counting.starts == 0
    assert not [s for s in exporter.get_finished_spans() if s.name == FORWARD_SPAN]


def test_clock_anchor_takes_the_tightest_reading() -> None:
    import torch

    ticks = iter([0, 9 * MS, 10 * MS, 10 * MS + 2000, 11 * MS, 14 * MS])  # gaps: 9 ms, 2 us, 3 ms

    def clock() -> int:
        return next(ticks, 20 * MS)

    capture = TorchProfilerCapture("cpu", clock=clock)
    capture.start()
    torch.ones(2).add_(1)
    raw = capture.stop()
    assert [after - before for before, after in raw.readings] == [9 * MS, 2000, 3 * MS]
    _, anchor = capture.events(raw)
    assert anchor.uncertainty_ns == 1000 and anchor.wall_ns == 10 * MS + 1000


def test_clock_anchor_needs_one_marker_per_reading() -> None:
    anchor = ClockAnchor.pick([(30, 40), (10, 20)], [(100, 110), (200, 204)])
    assert (anchor.profiler_ns, anchor.wall_ns, anchor.uncertainty_ns) == (35, 202, 2), "markers in time order"
    with pytest.raises(ValueError):
        ClockAnchor.pick([(10, 20)], [(100, 110), (200, 204)])
    with pytest.raises(ValueError):
        ClockAnchor.pick([], [])


def test_a_pass_waits_until_the_capture_is_ready_and_keeps_its_budget(sdk) -> None:
    provider, exporter = sdk

    class NotReadyTwice(TorchProfilerCapture):
        asked = 0

        def ready(self) -> bool:
            NotReadyTwice.asked += 1
            return NotReadyTwice.asked > 2

    config = KernelTraceConfig(ratio=1.0, steps_per_request=2)
    tracer = KernelTracer(config, provider.get_tracer("k"), NotReadyTwice("cpu"))
    request = provider.get_tracer("api").start_span("POST /v1/completions")
    assert tracer.on_request(request, {}) == "ratio"
    run_steps(tracer, provider, (request.get_span_context(),), steps=5)
    tracer.close()
    request.end()
    forwards = sorted((s for s in exporter.get_finished_spans() if s.name == FORWARD_SPAN), key=lambda s: s.start_time)
    assert [f.attributes["kernelgate.step.index"] for f in forwards] == [2, 3]


def test_cpu_capture_does_not_detach_cupti_or_wait(monkeypatch) -> None:
    monkeypatch.delenv("TEARDOWN_CUPTI", raising=False)
    capture = TorchProfilerCapture("cpu")
    capture.start()
    capture.stop()
    assert capture.ready() and "TEARDOWN_CUPTI" not in os.environ


# --- thinning the engine's step spans -------------------------------------------------------------------
def test_step_thinning_keeps_prefill_and_every_nth_decode_step() -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision, ParentBased

    from otel.sampling import StepThinningSampler

    sampler = StepThinningSampler(ParentBased(ALWAYS_ON), decode_every=4)

    def decide(name: str, phase: str, index: int) -> Decision:
        return sampler.should_sample(None, 1, name, attributes={"kernelgate.step.phase": phase,
                                                                "kernelgate.step.index": index}).decision

    assert decide("engine.step", "decode", 5) == Decision.DROP
    assert decide("engine.step", "decode", 8) == Decision.RECORD_AND_SAMPLE
    assert decide("engine.step", "prefill", 5) == Decision.RECORD_AND_SAMPLE
    assert decide("queue", "decode", 5) == Decision.RECORD_AND_SAMPLE
    assert StepThinningSampler(ParentBased(ALWAYS_ON), 1).should_sample(
        None, 1, "engine.step", attributes={"kernelgate.step.phase": "decode",
                                            "kernelgate.step.index": 5}).decision == Decision.RECORD_AND_SAMPLE


def test_kernels_of_a_thinned_step_hang_off_the_request() -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    from inference.tracing import StepInfo, Tracing
    from otel.sampling import StepThinningSampler

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=StepThinningSampler(ParentBased(ALWAYS_ON), decode_every=100))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    kernels = KernelTracer(KernelTraceConfig(ratio=1.0, steps_per_request=2), provider.get_tracer("k"),
                           TorchProfilerCapture("cpu"))
    tracing = Tracing(provider.get_tracer("inference"), request_observer=kernels)
    import torch

    with tracing.request_span("POST /v1/completions", {}, {}) as request:
        ctx = request.get_span_context()
        for index, phase in enumerate(["prefill", "decode", "decode"]):
            step = StepInfo(index, phase, 1, 1, ("r",), time.time_ns(), (ctx,))
            kernels.start(step)
            torch.ones(8).mul_(2)
            step_ctx = tracing.record_step(step, time.time_ns(), [ctx], {"kernelgate.step.phase": phase,
                                                                          "kernelgate.step.index": index})
            kernels.finish(step, step_ctx)
    kernels.close()
    tracing.close()
    provider.shutdown()
    spans = exporter.get_finished_spans()
    steps = [s for s in spans if s.name == "engine.step"]
    assert [s.attributes["kernelgate.step.index"] for s in steps] == [0], "decode steps 1, 2 thinned out"
    forwards = sorted((s for s in spans if s.name == FORWARD_SPAN), key=lambda s: s.start_time)
    assert [f.attributes["kernelgate.step.phase"] for f in forwards] == ["prefill", "decode"]
    assert forwards[0].parent.span_id == steps[0].context.span_id
    assert forwards[1].parent.span_id == ctx.span_id and not forwards[1].links
    assert all(f.context.trace_id == ctx.trace_id for f in forwards)


# --- CUPTI's Activity API, through a fake of cupti-python's module ---------------------------------------------
def run_fake_steps(tracer: KernelTracer, cupti: FakeCupti, context: SpanContext, steps: int,
                   kernels: tuple[str, ...] = (GEMM,) * 6 + ("softmax",)) -> list[int]:
    """Engine steps whose pass launches ``kernels`` (and a copy); returns the wall time of each launch."""
    launched = []
    for index in range(steps):
        step = Step(index, "prefill" if index == 0 else "decode", 1, 4, ("r",), time.time_ns(), (context,))
        tracer.start(step)
        for name in kernels:
            launched.append(cupti.launch(name))
            time.sleep(0.0001)
        cupti.launch("memcpy HtoD", kind=FakeCupti.ActivityKind.MEMCPY)
        tracer.finish(step, None)
    return launched


def test_cupti_capture_exports_the_pass_kernels_on_the_wall_clock_and_detaches_after_each(sdk) -> None:
    provider, exporter = sdk
    cupti = FakeCupti()
    capture = CuptiCapture(cupti, demangle=fake_demangle)
    tracer = KernelTracer(KernelTraceConfig(ratio=1.0, steps_per_request=2, fold_after=4), provider.get_tracer("k"),
                          capture)
    request = provider.get_tracer("api").start_span("POST /v1/completions")
    assert tracer.on_request(request, {}) == "ratio"
    launched = run_fake_steps(tracer, cupti, request.get_span_context(), steps=3)
    tracer.close()
    request.end()
    assert tracer.stats.captures == 2 and tracer.stats.failures == 0
    per_pass = ["register", "enable", "disable", "flush", "finalize"]
    assert cupti.calls == per_pass * 2, "callbacks registered again after every finalize, CUPTI never left attached"
    spans = exporter.get_finished_spans()
    forwards = sorted((s for s in spans if s.name == FORWARD_SPAN), key=lambda s: s.start_time)
    assert len(forwards) == 2
    for forward, first in zip(forwards, (0, 7)):
        assert forward.attributes["kernelgate.kernels.activities"] == "cuda"
        assert forward.attributes["kernelgate.kernels.recorder"] == "cupti"
        assert forward.attributes["kernelgate.kernels.count"] == 7, "kernels only: the copy is not a kernel"
        kernels = sorted((s for s in spans if s.parent is not None and s.parent.span_id == forward.context.span_id),
                         key=lambda s: s.start_time)
        assert [(k.name, k.attributes["kernelgate.kernel.count"]) for k in kernels] == [
            ("at::native::gemm", 1)] * 4 + [("at::native::gemm", 2), ("softmax", 1)]
        assert kernels[0].attributes["gpu.kernel.name"] == "void at::native::gemm<float, 4>(float*, int)"
        uncertainty = forward.attributes["kernelgate.clock.uncertainty_ns"]
        for k, wall in zip(kernels[:4], launched[first:first + 4]):
            assert abs(k.start_time - wall) <= uncertainty + 1, "CUPTI's clock mapped onto the wall clock"
            assert k.end_time - k.start_time == 20_000
        for k in kernels:
            assert forward.start_time <= k.start_time <= k.end_time <= forward.end_time


def test_cupti_records_handed_back_early_on_another_thread_are_kept() -> None:
    cupti = FakeCupti()
    capture = CuptiCapture(cupti)
    capture.start()
    cupti.launch("early")
    cupti.deliver_full_buffer()
    cupti.launch("late")
    events, anchor = capture.events(capture.stop())
    assert [e.name for e in events] == ["early", "late"]
    assert abs(anchor.to_wall(events[0].start_ns) - (events[0].start_ns + cupti.OFFSET)) <= anchor.uncertainty_ns + 1


def test_cupti_capture_that_fails_to_start_detaches_and_the_next_pass_is_captured(sdk) -> None:
    provider, exporter = sdk
    cupti = FakeCupti()
    cupti.fail["enable"] = RuntimeError("CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED")
    tracer = KernelTracer(KernelTraceConfig(ratio=1.0, steps_per_request=2), provider.get_tracer("k"),
                          CuptiCapture(cupti))
    request = provider.get_tracer("api").start_span("POST /v1/completions")
    tracer.on_request(request, {})
    run_fake_steps(tracer, cupti, request.get_span_context(), steps=2)
    tracer.close()
    assert cupti.calls[:3] == ["register", "enable", "finalize"], "a failed start leaves CUPTI detached"
    assert tracer.stats.failures == 1 and tracer.stats.captures == 1
    (forward,) = [s for s in exporter.get_finished_spans() if s.name == FORWARD_SPAN]
    assert forward.attributes["kernelgate.step.index"] == 1 and forward.attributes["kernelgate.kernels.count"] == 7


def test_cupti_capture_whose_flush_fails_still_detaches_and_leaks_nothing_into_the_next() -> None:
    cupti = FakeCupti()
    capture = CuptiCapture(cupti)
    capture.start()
    cupti.launch("first")
    cupti.deliver_full_buffer()
    cupti.fail["flush"] = RuntimeError("CUPTI_ERROR_UNKNOWN")
    with pytest.raises(RuntimeError):
        capture.stop()
    assert cupti.calls[-1] == "finalize" and cupti.callbacks is None
    capture.start()
    cupti.launch("second")
    events, _ = capture.events(capture.stop())
    assert [e.name for e in events] == ["second"]


def test_capture_choice_follows_the_config(monkeypatch) -> None:
    import importlib.util

    from otel.kernels import factory as kernels

    assert isinstance(kernels.make_capture(KernelTraceConfig(activities="cpu")), TorchProfilerCapture)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "cupti" else None)
    assert isinstance(kernels.make_capture(KernelTraceConfig(activities="cpu")), TorchProfilerCapture), \
        "auto: CUPTI records CUDA kernels only"
    with pytest.raises(ValueError, match="cupti"):
        KernelTraceConfig(activities="cpu", capture="cupti")
    with pytest.raises(ValueError, match="CUDA"):
        kernels.make_capture(KernelTraceConfig(capture="cupti"))  # auto activities: no GPU here
    monkeypatch.setattr(kernels, "resolve_activities", lambda config: "cuda")
    monkeypatch.setenv("TEARDOWN_CUPTI", "1")  # what the cuda TorchProfilerCapture sets; undone after the test
    assert isinstance(kernels.make_capture(KernelTraceConfig(capture="torch")), TorchProfilerCapture)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="cupti-python"):
        kernels.make_capture(KernelTraceConfig(capture="cupti"))


def test_cupti_capture_whose_detach_fails_keeps_its_records_and_says_so(caplog) -> None:
    cupti = FakeCupti()
    capture = CuptiCapture(cupti)
    capture.start()
    cupti.launch("kept")
    cupti.fail["finalize"] = RuntimeError("CUPTI_ERROR_UNKNOWN")
    with caplog.at_level("ERROR", logger="kernelgate.otel.kernels"):
        events, _ = capture.events(capture.stop())
    assert [e.name for e in events] == ["kept"]
    assert "could not detach CUPTI" in caplog.text
