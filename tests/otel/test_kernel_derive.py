"""Derived kernel spans (otel/kernels/derive.py and the tracer's derived path).

The pure part: which kernels of a recorded pass are its graph replay, how a later replay's kernels
are placed inside its measured time. The tracer: one recorded pass per graph key (CUPTI attached
ahead only for it), later passes of that key derived with no recorder call on the engine thread,
their spans marked and inside their parents. The runner's timing is the real
``inference.runner.DecodeTiming`` (its CPU form: host clock readings); CUPTI is the fake of
tests/otel/fake_cupti.py. The real CUDA path: tests/otel/test_cupti_gpu.py.
"""

from __future__ import annotations

import threading
import time

from inference.runner import DecodeTiming
from inference.tracing import StepInfo
from otel.config import KernelTraceConfig
from otel.kernels.cupti_capture import CuptiCapture
from otel.kernels.derive import ReplayTemplate, TemplateKernel, build_template, is_fresh, place, replay_events
from otel.kernels.plan import ClockAnchor, KernelEvent
from otel.kernels.tracer import KernelTracer
from otel.names import FORWARD_SPAN
from tests.otel.fake_cupti import GEMM, FakeCupti, fake_demangle

MS = 1_000_000
KEY = (7, 16, 64)


def test_the_replay_is_the_kernels_of_its_graph() -> None:
    anchor = ClockAnchor(profiler_ns=0, wall_ns=1_000 * MS)
    events = [KernelEvent("copy", 0, MS), KernelEvent("gemm", 2 * MS, 3 * MS, graph_id=5),
              KernelEvent("norm", 3 * MS, 4 * MS, graph_id=5), KernelEvent("sample", 5 * MS, 6 * MS)]
    assert [e.name for e in replay_events(events, anchor, 0, 1)] == ["gemm", "norm"]


def test_without_graph_ids_the_replay_is_what_started_inside_its_timed_interval() -> None:
    anchor = ClockAnchor(profiler_ns=0, wall_ns=1_000 * MS)  # profiler t -> wall t + 1000 ms
    events = [KernelEvent("embed", 0, MS), KernelEvent("addmm", 2 * MS, 3 * MS), KernelEvent("softmax", 4 * MS, 5 * MS),
              KernelEvent("sample", 7 * MS, 8 * MS)]
    kept = replay_events(events, anchor, wall_start_ns=1_001 * MS, replay_ns=5 * MS)
    assert [e.name for e in kept] == ["addmm", "softmax"]


def test_template_keeps_offsets_and_lead_and_placing_scales_them_into_the_replay() -> None:
    anchor = ClockAnchor(profiler_ns=0, wall_ns=0)
    recorded = [KernelEvent("b", 30, 70, graph_id=1), KernelEvent("a", 10, 20, graph_id=1)]
    template = build_template(recorded, anchor, KEY, wall_start_ns=5, replay_ns=100, step_index=3, recorded_at_s=1.0)
    assert template is not None
    assert template.kernels == (TemplateKernel("a", 0, 10), TemplateKernel("b", 20, 40))
    assert (template.lead_ns, template.replay_ns, template.step_index, template.key) == (5, 100, 3, KEY)
    placed = place(template, wall_start_ns=1_000, replay_ns=200)  # this replay ran twice as long
    assert [(e.name, e.start_ns, e.end_ns) for e in placed] == [("a", 1_010, 1_030), ("b", 1_050, 1_130)]
    assert all(1_000 <= e.start_ns <= e.end_ns <= 1_200 for e in placed)


def test_placed_kernels_never_pass_the_replay_end_mark() -> None:
    template = ReplayTemplate(KEY, (TemplateKernel("a", 0, 90), TemplateKernel("b", 95, 50)), lead_ns=10,
                              replay_ns=100, step_index=0, recorded_at_s=0.0)
    placed = place(template, wall_start_ns=0, replay_ns=100)
    assert max(e.end_ns for e in placed) == 100 and placed[1].start_ns == 100


def test_no_template_from_a_pass_without_the_replay_kernels() -> None:
    assert build_template([KernelEvent("x", 0, 1)], ClockAnchor(0, 0), KEY, 10, 5, 0, 0.0) is None
    assert build_template([KernelEvent("x", 0, 1, graph_id=2)], ClockAnchor(0, 0), KEY, 0, 0, 0, 0.0) is None


def test_templates_go_stale_after_the_refresh_time() -> None:
    template = ReplayTemplate(KEY, (), 0, 1, 0, recorded_at_s=100.0)
    assert is_fresh(template, 150.0, 60.0) and not is_fresh(template, 161.0, 60.0)
    assert is_fresh(template, 1e9, 0.0) and not is_fresh(None, 0.0, 60.0)


# -- the tracer --------------------------------------------------------------------------------------------------

def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


class Replaying:
    """Stands in for the engine and runner around a decode step replaying graph ``KEY``: the kernels
    run (on the fake CUPTI's clock, tagged with the graph id) between the runner's two timing marks."""

    def __init__(self, tracer: KernelTracer, cupti: FakeCupti) -> None:
        self.tracer, self.cupti = tracer, cupti

    def step(self, index: int, request, phase: str = "decode", key: tuple[int, ...] | None = KEY) -> StepInfo:
        step = StepInfo(index, phase, 1, 1, ("r",), time.time_ns(), (request.get_span_context(),), (1,), key)
        timed = self.tracer.start(step)
        replay = None
        if timed and key is not None:
            wall, began = time.time_ns(), time.perf_counter_ns()
            self.launch()
            replay = DecodeTiming(key, wall, 0, 7, began, time.perf_counter_ns())
        else:
            self.launch()
        self.cupti.launch("sample_kernel")  # the sampling after the replay: not part of the graph
        time.sleep(0.0002)
        step = StepInfo(step.index, step.phase, 1, 1, ("r",), step.start_time_ns, step.trace_contexts, (1,), key,
                        replay)
        self.tracer.finish(step, None)
        return step

    def launch(self) -> None:
        for name in (GEMM, "layer_norm", GEMM):
            self.cupti.launch(name, duration_ns=50_000, graph_id=3)
            time.sleep(0.0003)


def _selected_request(provider, steps_per_request: int):
    """A deriving tracer on the fake CUPTI (attached ahead), its engine, and one selected request."""
    cupti = FakeCupti()
    capture = CuptiCapture(cupti, demangle=fake_demangle, prepare_ahead=True)
    tracer = KernelTracer(KernelTraceConfig(ratio=1.0, stall_budget_pct=0, steps_per_request=steps_per_request),
                          provider.get_tracer("k"), capture)
    engine = Replaying(tracer, cupti)
    request = provider.get_tracer("api").start_span("POST /v1/completions")
    assert tracer.on_request(request, {}) == "ratio"
    return cupti, capture, tracer, engine, request


def test_one_recorded_replay_per_graph_then_derived_passes_without_the_recorder(sdk) -> None:
    provider, exporter = sdk
    cupti, capture, tracer, engine, request = _selected_request(provider, 4)
    time.sleep(0.05)
    assert cupti.calls == [], "no attach ahead until a pass needs recording"
    engine.step(0, request, phase="prefill", key=None)  # a prefill does not ask for the recorder
    assert cupti.calls == [] and tracer.stats.captures == 0
    engine.step(1, request)  # a decode of a graph with no template yet: asks for the recorder
    wait_until(capture.ready)
    assert cupti.calls == ["register"] and threading.current_thread().name not in cupti.threads
    engine.step(2, request)  # recorded
    wait_until(lambda: tracer.stats.templates == 1)
    calls = list(cupti.calls)
    for index in (3, 4, 5):
        engine.step(index, request)  # derived: no recorder call at all
    engine.step(6, request)  # the request's 4 passes are spent
    tracer.close()
    tracer.on_request_end(request, time.time_ns())
    assert cupti.calls == calls == ["register", "enable", "disable", "flush", "finalize"]
    assert (tracer.stats.captures, tracer.stats.derived, tracer.stats.failures) == (1, 3, 0)

    spans = exporter.get_finished_spans()
    forwards = sorted((s for s in spans if s.name == FORWARD_SPAN), key=lambda s: s.start_time)
    assert [f.attributes["kernelgate.step.index"] for f in forwards] == [2, 3, 4, 5]
    recorded, *derived = forwards
    assert recorded.attributes["kernelgate.kernels.source"] == "recorded"
    assert recorded.attributes["kernelgate.kernels.count"] == 4  # the graph's 3 kernels and the sampling one
    assert recorded.attributes["kernelgate.kernels.graph_key"] == "7,16,64"
    assert tracer.stats.derived_spans == sum(1 + f.attributes["kernelgate.kernels.spans"] for f in derived)
    for forward in derived:
        a = forward.attributes
        assert a["kernelgate.kernels.source"] == "derived" and a["kernelgate.kernels.count"] == 3
        assert a["kernelgate.kernels.derived_from.step_index"] == 2
        assert a["kernelgate.kernels.replay_ns"] > 0 and a["kernelgate.kernels.graph_key"] == "7,16,64"
        assert [link.context.span_id for link in forward.links] == [recorded.context.span_id]
        kernels = [s for s in spans if s.parent is not None and s.parent.span_id == forward.context.span_id]
        assert [k.name for k in kernels] == ["at::native::gemm", "layer_norm", "at::native::gemm"]
        assert all(k.attributes["kernelgate.kernel.derived"] is True for k in kernels)
        assert all(forward.start_time <= k.start_time <= k.end_time <= forward.end_time for k in kernels)
        assert kernels[0].start_time < kernels[1].start_time < kernels[2].start_time
    kernels_of_recorded = [s for s in spans if s.parent is not None and s.parent.span_id == recorded.context.span_id]
    assert not any("kernelgate.kernel.derived" in k.attributes for k in kernels_of_recorded)


def test_a_pass_of_a_graph_whose_recording_is_on_its_way_waits_and_derivation_off_records_every_pass(sdk) -> None:
    provider, exporter = sdk
    cupti = FakeCupti()
    capture = CuptiCapture(cupti, demangle=fake_demangle)  # attached on the engine thread at the pass
    tracer = KernelTracer(KernelTraceConfig(ratio=1.0, stall_budget_pct=0, steps_per_request=2),
                          provider.get_tracer("k"), capture)
    engine = Replaying(tracer, cupti)
    request = provider.get_tracer("api").start_span("POST /v1/completions")
    tracer.on_request(request, {})
    tracer._recording.add(KEY)  # as while the worker still turns the first recorded replay into its template
    engine.step(1, request)
    assert cupti.calls == [] and tracer.stats.captures == 0, "not recorded twice, and the pass is not spent"
    tracer._recording.discard(KEY)
    engine.step(2, request)
    wait_until(lambda: tracer.stats.templates == 1)
    engine.step(3, request)
    tracer.close()
    assert (tracer.stats.captures, tracer.stats.derived) == (1, 1)

    off = KernelTracer(KernelTraceConfig(ratio=1.0, stall_budget_pct=0, steps_per_request=2, derive=False),
                       provider.get_tracer("k"), CuptiCapture(cupti, demangle=fake_demangle))
    other = provider.get_tracer("api").start_span("POST /v1/completions")
    off.on_request(other, {})
    Replaying(off, cupti).step(1, other)
    Replaying(off, cupti).step(2, other)
    off.close()
    assert (off.stats.captures, off.stats.derived, off.stats.templates) == (2, 0, 0)


def test_derived_passes_cost_the_stall_budget_only_what_they_measure(sdk) -> None:
    provider, _ = sdk
    cupti = FakeCupti()
    tracer = KernelTracer(KernelTraceConfig(ratio=1.0, stall_budget_pct=1, steps_per_request=8),
                          provider.get_tracer("k"), CuptiCapture(cupti, demangle=fake_demangle))
    engine = Replaying(tracer, cupti)
    request = provider.get_tracer("api").start_span("POST /v1/completions")
    tracer.on_request(request, {})
    engine.step(1, request)
    wait_until(lambda: tracer.stats.templates == 1)
    recorded_cost = tracer.budget.cost_ns
    for index in range(2, 8):
        engine.step(index, request)
    tracer.close()
    assert tracer.stats.derived == 6
    # The moving average (weight 0.2) of what each capture stalled: every derived pass reported < 1 ms.
    assert tracer.budget.cost_ns < 0.8 ** 6 * recorded_cost + 1_000_000


def test_an_attached_recorder_is_kept_for_the_decode_step_that_needs_it_not_spent_on_a_prefill(sdk) -> None:
    provider, _ = sdk
    cupti, capture, tracer, engine, request = _selected_request(provider, 2)
    capture.prepare()  # attached (for another request's decode step, say)
    engine.step(0, request, phase="prefill", key=None)
    assert cupti.calls == ["register"] and tracer.stats.captures == 0
    engine.step(1, request)  # the decode step of a graph without a recording uses it
    tracer.close()
    assert cupti.calls == ["register", "enable", "disable", "flush", "finalize"] and tracer.stats.captures == 1
