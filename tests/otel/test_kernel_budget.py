"""The stall budget (otel/kernels/budget.py): captures admitted while the engine-thread stall they
measure stays under a share of wall-clock time, alone and inside the sampler and the tracer."""

from __future__ import annotations

import time

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanContext, TraceFlags

from otel.config import KernelTraceConfig
from otel.kernels.budget import StallBudget
from otel.kernels.cupti_capture import CuptiCapture
from otel.kernels.selection import CaptureSampler
from otel.kernels.tracer import KernelTracer
from tests.otel.fake_cupti import FakeCupti

MS = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def test_budget_admits_while_the_expected_stall_fits_and_refills_with_time() -> None:
    clock = Clock()
    budget = StallBudget(0.01, burst_s=2.0, initial_cost_ns=5 * MS, clock=clock)  # 20 ms of stall at most
    taken = [budget.admit() for _ in range(5)]
    assert taken == [5 * MS] * 4 + [None] and budget.refused == 1
    clock.ns += 500 * MS  # 1 % of 500 ms: 5 ms of stall earned back
    assert budget.admit() == 5 * MS
    assert budget.admit() is None
    clock.ns += 100_000 * MS  # a long idle spell refills to the burst, not beyond
    assert [budget.admit() for _ in range(5)].count(None) == 1


def test_budget_learns_what_a_capture_costs_from_the_measured_stall() -> None:
    clock = Clock()
    budget = StallBudget(0.01, burst_s=10.0, initial_cost_ns=5 * MS, clock=clock)  # 100 ms of stall
    admitted = 0
    while (taken := budget.admit()) is not None:
        budget.spent(taken, 20 * MS)  # each capture really stalls 20 ms
        admitted += 1
    assert admitted <= 6, "dearer captures than expected: fewer admitted than 100 ms / 5 ms"
    assert 10 * MS < budget.cost_ns <= 20 * MS
    clock.ns += 1000 * MS  # 10 ms earned back: less than a capture now costs
    assert budget.admit() is None


def test_budget_refund_gives_back_what_a_capture_that_never_ran_took() -> None:
    budget = StallBudget(0.01, burst_s=1.0, initial_cost_ns=10 * MS, clock=Clock())
    taken = budget.admit()
    assert taken == 10 * MS and budget.admit() is None
    budget.refund(taken)
    assert budget.admit() == 10 * MS
    assert budget.cost_ns == 10 * MS, "a refund teaches nothing about the cost"


def test_budget_zero_is_no_cap() -> None:
    budget = StallBudget(0.0, clock=Clock())
    assert not budget.enabled and all(budget.admit() == 0 for _ in range(1000))


def test_sampler_refused_by_the_budget_spends_no_capture_of_the_minute() -> None:
    clock = Clock()
    budget = StallBudget(0.01, burst_s=1.0, initial_cost_ns=10 * MS, clock=clock)
    sampler = CaptureSampler(1.0, max_per_minute=2, clock=lambda: 0.0, budget=budget)
    assert sampler.admit(1, True, False) == ("ratio", 10 * MS)
    assert sampler.admit(2, True, False) == (None, 0), "budget spent"
    assert sampler.rate_limited == 0 and budget.refused == 1
    clock.ns += 1000 * MS
    assert sampler.decide(3, True, True) == "forced", "the refusal took no place in the per-minute cap"
    assert sampler.decide(4, True, True) is None and sampler.rate_limited == 1


def test_stall_budget_is_validated() -> None:
    with pytest.raises(ValueError, match="kernels.stall_budget_pct"):
        KernelTraceConfig(stall_budget_pct=-1)


def _context(i: int) -> SpanContext:
    return SpanContext(trace_id=i, span_id=i, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))


class _Span:
    def __init__(self, ctx: SpanContext) -> None:
        self.ctx = ctx

    def get_span_context(self) -> SpanContext:
        return self.ctx

    def set_attribute(self, key, value) -> None:
        pass

    def end(self, end_time: int | None = None) -> None:
        pass


class _Step:
    def __init__(self, index: int, ctx: SpanContext) -> None:
        self.index, self.phase, self.batch_size = index, "decode", 1
        self.start_time_ns, self.trace_contexts = time.time_ns(), (ctx,)


def test_tracer_admits_captures_by_the_stall_they_measured() -> None:
    """Captures that stall the engine thread 20 ms each, under a 1 % budget of a 4 s burst (40 ms):
    the budget learns the cost from the first ones, then refuses until wall time earns it back."""
    clock, timer = Clock(), Clock()
    budget = StallBudget(0.01, burst_s=4.0, initial_cost_ns=1 * MS, clock=clock)

    class SlowEnable(FakeCupti):
        def activity_enable(self, kind: int) -> None:
            timer.ns += 20 * MS  # what the engine thread measures this capture to have cost it
            super().activity_enable(kind)

    tracer = KernelTracer(KernelTraceConfig(ratio=1.0), TracerProvider().get_tracer("k"), CuptiCapture(SlowEnable()),
                          budget=budget, timer=timer)
    admitted = []
    for i in range(1, 6):
        ctx = _context(i)
        reason = tracer.on_request(_Span(ctx), {})
        admitted.append(reason is not None)
        if reason:
            step = _Step(i, ctx)
            tracer.start(step)
            tracer.finish(step, None)
        tracer.on_request_end(_Span(ctx), time.time_ns())
    assert admitted == [True, True, False, False, False]
    assert tracer.stats.captures == 2 and tracer.stats.budget_refused == 3
    assert tracer.stats.engine_thread_ns == 40 * MS
    assert budget.cost_ns == pytest.approx(1 * MS + 0.2 * 19 * MS + 0.2 * (20 * MS - (1 + 0.2 * 19) * MS))
    clock.ns += 1000 * MS  # 10 ms of stall earned back: more than the ~7.8 ms a capture is now expected to cost
    assert tracer.on_request(_Span(_context(9)), {}) == "ratio"
    tracer.close()


def test_a_selected_request_that_ends_uncaptured_gives_its_share_back() -> None:
    budget = StallBudget(0.01, burst_s=1.0, initial_cost_ns=10 * MS, clock=Clock())
    tracer = KernelTracer(KernelTraceConfig(ratio=1.0), TracerProvider().get_tracer("k"), CuptiCapture(FakeCupti()),
                          budget=budget)
    assert tracer.on_request(_Span(_context(1)), {}) == "ratio"
    assert tracer.on_request(_Span(_context(2)), {}) is None
    tracer.on_request_end(_Span(_context(1)), time.time_ns())
    assert tracer.on_request(_Span(_context(3)), {}) == "ratio"
    tracer.close()
