"""CUPTI attached ahead (``kernels.prepare_ahead``): the tracer's preparing thread attaches as soon as a
request is selected, the engine thread only enables, flushes and detaches; a pass that comes before
the attach is done is not held up, and an attach no capture used is undone on the engine thread."""

from __future__ import annotations

import threading
import time

from inference.tracing import StepInfo
from otel.config import KernelTraceConfig
from otel.kernels.cupti_capture import CuptiCapture
from otel.kernels.tracer import KernelTracer
from otel.names import FORWARD_SPAN
from tests.otel.fake_cupti import GEMM, FakeCupti, fake_demangle

PREPARER = "kernelgate-kernel-prepare"


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def step_of(index: int, request) -> StepInfo:
    return StepInfo(index, "prefill" if index == 0 else "decode", 1, 4, ("r",), time.time_ns(),
                    (request.get_span_context(),))


def run_pass(tracer: KernelTracer, cupti: FakeCupti, step: StepInfo, kernels: int = 5) -> None:
    tracer.start(step)
    for _ in range(kernels):
        cupti.launch(GEMM)
        time.sleep(0.0001)
    tracer.finish(step, None)


def test_cupti_attaches_on_the_preparing_thread_and_the_engine_thread_only_records(sdk) -> None:
    provider, exporter = sdk
    cupti = FakeCupti()
    cupti.delays["register"] = 0.03  # attaching is the slow part (13-17 ms on the H100)
    capture = CuptiCapture(cupti, demangle=fake_demangle, prepare_ahead=True)
    tracer = KernelTracer(KernelTraceConfig(ratio=1.0, stall_budget_pct=0, derive=False), provider.get_tracer("k"),
                          capture)
    request = provider.get_tracer("api").start_span("POST /v1/completions")
    assert tracer.on_request(request, {}) == "ratio"
    wait_until(capture.ready)
    run_pass(tracer, cupti, step_of(0, request))
    run_pass(tracer, cupti, step_of(1, request))  # steps_per_request=1: not captured again
    tracer.close()
    request.end()
    engine = threading.current_thread().name
    assert list(zip(cupti.calls, cupti.threads)) == [
        ("register", PREPARER), ("enable", engine), ("disable", engine), ("flush", engine), ("finalize", engine)]
    assert tracer.stats.captures == 1 and tracer.stats.prepares == 1 and tracer.stats.failures == 0
    assert tracer.stats.engine_thread_ns < 30_000_000 <= tracer.stats.prepare_ns, \
        "the attach is paid off the engine thread"
    (forward,) = [s for s in exporter.get_finished_spans() if s.name == FORWARD_SPAN]
    assert forward.attributes["kernelgate.kernels.count"] == 5
    assert forward.attributes["kernelgate.step.index"] == 0
    assert not capture.ready(), "detached after the capture"
    timings = capture.timings
    assert timings["captures"] == 1 and timings["register_ns"] == 0, "no attach on the engine thread"
    assert all(timings[k] > 0 for k in ("enable_ns", "disable_ns", "flush_ns", "callback_ns", "finalize_ns"))


def test_a_pass_before_the_attach_is_done_runs_unrecorded_and_a_later_one_is_captured(sdk) -> None:
    provider, exporter = sdk
    cupti = FakeCupti()
    cupti.delays["register"] = 0.5
    capture = CuptiCapture(cupti, demangle=fake_demangle, prepare_ahead=True)
    tracer = KernelTracer(KernelTraceConfig(ratio=1.0, stall_budget_pct=0, derive=False), provider.get_tracer("k"),
                          capture)
    request = provider.get_tracer("api").start_span("POST /v1/completions")
    tracer.on_request(request, {})
    began = time.perf_counter()
    run_pass(tracer, cupti, step_of(0, request))  # the prefill: CUPTI still attaching
    assert time.perf_counter() - began < 0.4, "the engine thread did not wait for the attach"
    assert "enable" not in cupti.calls
    wait_until(capture.ready)
    run_pass(tracer, cupti, step_of(1, request))
    tracer.close()
    request.end()
    (forward,) = [s for s in exporter.get_finished_spans() if s.name == FORWARD_SPAN]
    assert forward.attributes["kernelgate.step.index"] == 1 and forward.attributes["kernelgate.step.phase"] == "decode"
    assert forward.attributes["kernelgate.kernels.count"] == 5


def test_an_attach_no_capture_used_is_undone_on_the_engine_thread(sdk) -> None:
    provider, _ = sdk
    cupti = FakeCupti()
    capture = CuptiCapture(cupti, prepare_ahead=True)
    tracer = KernelTracer(KernelTraceConfig(ratio=1.0, stall_budget_pct=0, derive=False), provider.get_tracer("k"),
                          capture)
    request = provider.get_tracer("api").start_span("POST /v1/completions")
    tracer.on_request(request, {})
    wait_until(capture.ready)
    tracer.on_request_end(request, time.time_ns())  # it finished before any pass of it ran
    other = provider.get_tracer("api").start_span("POST /v1/completions")
    run_pass(tracer, cupti, step_of(0, other))
    tracer.close()
    assert cupti.calls == ["register", "finalize"] and cupti.threads[1] == threading.current_thread().name
    assert tracer.stats.releases == 1 and tracer.stats.captures == 0 and not capture.ready()


def test_a_failed_attach_ahead_is_counted_and_the_next_request_attaches_again(sdk) -> None:
    provider, exporter = sdk
    cupti = FakeCupti()
    cupti.fail["register"] = RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")
    capture = CuptiCapture(cupti, demangle=fake_demangle, prepare_ahead=True)
    tracer = KernelTracer(KernelTraceConfig(ratio=1.0, stall_budget_pct=0, derive=False), provider.get_tracer("k"),
                          capture)
    first = provider.get_tracer("api").start_span("POST /v1/completions")
    tracer.on_request(first, {})
    wait_until(lambda: tracer.stats.failures == 1)
    assert cupti.calls == ["register", "finalize"], "a failed attach leaves CUPTI detached"
    tracer.on_request_end(first, time.time_ns())
    second = provider.get_tracer("api").start_span("POST /v1/completions")
    tracer.on_request(second, {})
    wait_until(capture.ready)
    run_pass(tracer, cupti, step_of(0, second))
    tracer.close()
    assert tracer.stats.captures == 1
    assert [s.name for s in exporter.get_finished_spans()].count(FORWARD_SPAN) == 1



def test_the_tracer_is_idle_until_a_request_is_selected_and_again_once_its_passes_are_taken(sdk) -> None:
    """``idle()`` lets the engine pipeline decode steps: only while a selected request waits for a
    pass, or a pass is being captured, must steps run one at a time."""
    provider, _ = sdk
    cupti = FakeCupti()
    capture = CuptiCapture(cupti, demangle=fake_demangle, prepare_ahead=False)
    tracer = KernelTracer(KernelTraceConfig(ratio=1.0, stall_budget_pct=0, derive=False), provider.get_tracer("k"),
                          capture)
    try:
        assert tracer.idle()
        request = provider.get_tracer("api").start_span("POST /v1/completions")
        tracer.on_request(request, {})
        assert not tracer.idle(), "a selected request waits for its pass"
        step = step_of(1, request)
        tracer.start(step)
        assert not tracer.idle(), "a pass is being captured"
        tracer.finish(step, None)
        assert tracer.idle(), "steps_per_request=1: nothing left to capture"
        request.end()
    finally:
        tracer.close()
