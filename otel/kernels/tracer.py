"""The kernel tracer: selects requests (event loop), brackets their passes (engine thread),
exports the spans (worker thread).

In: request spans (``on_request``, from ``inference.tracing.Tracing.request_span``), the engine's
``start``/``finish`` around every forward pass (``inference.tracing.ForwardObserver``), and a
:class:`~otel.kernels.capture.Capture`. Out: a ``gpu.forward`` span per captured pass with one
span per kernel (or folded run of kernels) under it, exported through the tracer it was given, or,
with the span export process (``sink``), handed to it as one compact record per pass (emit.py).

A captured pass is *recorded* (the recorder runs around it) or, with ``kernels.derive``, *derived*:
a decode step replaying a CUDA graph whose kernels were recorded once (derive.py) is only timed by
the runner (``StepInfo.replay``, asked for by returning True from ``start``), and the worker places
the recorded kernels inside that time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanContext

from otel import names
from otel.config import KernelTraceConfig
from otel.deferred import PendingSpan, resolve
from otel.kernels.budget import StallBudget
from otel.kernels.capture import Capture, RawCapture
from otel.kernels.derive import ReplayTemplate, build_template, is_fresh, place
from otel.kernels.emit import ForwardRecord, emit_with_tracer, forward_context, kernel_tuples
from otel.kernels.plan import ClockAnchor, KernelPlan, plan_kernel_spans, request_share
from otel.kernels.selection import CaptureSampler, is_forced
from otel.span_records import new_span_id, sampled_attributes

log = logging.getLogger("kernelgate.otel.kernels")


@dataclass(eq=False)
class _Selected:
    """A captured request: its span, the passes left to profile, the spans left in its trace."""

    span_context: SpanContext
    reason: str
    steps_left: int
    spans_left: int
    budget_ns: int = 0  # stall the budget set aside for its capture, until settled
    span: Any = None  # the live request span: its GPU share goes on it before it ends
    share_ns: int = 0  # its share of the GPU time of its captured passes, exported so far
    passes: int = 0  # captured passes exported
    pending: int = 0  # captured passes not yet exported
    end_ns: int | None = None  # set when the request is done and its span waits for pending passes


@dataclass
class _Job:
    step: Any
    step_span: PendingSpan | SpanContext | None  # resolved on the worker (otel/deferred.py)
    window: tuple[int, int]
    targets: list[_Selected]
    raw: RawCapture | None  # None: a derived pass
    key: tuple[int, ...] | None = None  # a recorded pass's graph key: its kernels become the template
    template: ReplayTemplate | None = None  # a derived pass's: what its kernels are placed from


@dataclass
class KernelStats:
    """Counters, for logs and the benchmark."""

    selected: int = 0
    captures: int = 0
    exported_spans: int = 0
    dropped_captures: int = 0
    failures: int = 0
    # Time the engine thread spent starting and stopping the profiler (what a captured pass pays).
    engine_thread_ns: int = 0
    engine_start_ns: int = 0  # the starting part of engine_thread_ns (CUPTI attaches there, unless ahead)
    worker_ns: int = 0
    # Attaching ahead (a capture that prepares_ahead), on the preparing thread, and its undoing.
    prepares: int = 0
    prepare_ns: int = 0
    releases: int = 0
    budget_refused: int = 0
    # Derived passes (no recorder: kernels placed from a recorded replay of the same graph), the spans
    # they exported (kernel spans and gpu.forward), and the graphs' templates recorded.
    derived: int = 0
    derived_engine_ns: int = 0  # the engine thread's part of engine_thread_ns for derived passes
    derived_spans: int = 0
    templates: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class KernelTracer:
    """The engine's forward observer for kernel capture, and the request hook that selects requests.

    Threads: the event loop selects (``on_request``); the engine thread brackets passes (``start``,
    ``finish``); the worker exports; and, when the capture ``prepares_ahead``, a preparing thread
    attaches the recorder as soon as a selected request waits for it, so the engine thread only
    enables and stops it. ``budget`` caps captures by the stall they measure (budget.py).
    """

    def __init__(self, config: KernelTraceConfig, tracer: trace.Tracer, capture: Capture,
                 sampler: CaptureSampler | None = None, clock: Callable[[], int] = time.time_ns,
                 budget: StallBudget | None = None, timer: Callable[[], int] = time.perf_counter_ns,
                 sink: Callable[[ForwardRecord], object] | None = None) -> None:
        self._config = config
        self._tracer = tracer
        # Where a pass's spans go as one compact record instead of SDK spans (emit.py): the span
        # export process (otel.export_process.ProcessSpanExporter.send_forward), or None: the tracer.
        self._sink = sink
        self._capture = capture
        self.budget = budget or StallBudget(config.stall_budget_pct / 100.0)
        self._sampler = sampler or CaptureSampler(config.ratio, config.max_captures_per_minute, budget=self.budget)
        self._clock = clock
        self._timer = timer  # what the threads' time is measured with (ns)
        self._lock = threading.Lock()
        self._requests: dict[int, _Selected] = {}  # by request span id; event loop adds, engine reads
        self._waiting = 0  # selected requests with passes left to capture (under _lock)
        self._active: list[_Selected] | None = None  # engine thread only
        self._active_ns = 0  # engine-thread time of the active capture so far
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=config.max_pending)
        self._ending: list[_Selected] = []  # done requests whose spans wait for their passes' export
        # Derivation: the recorded replay of each graph key (the worker writes, the engine reads), the
        # keys whose recorded pass is on its way to the worker, and whether a selected request waits
        # for a pass that must be recorded (only then does the preparing thread attach the recorder).
        self._templates: dict[tuple[int, ...], ReplayTemplate] = {}
        self._recording: set[tuple[int, ...]] = set()
        self._want_record = False
        self._active_key: tuple[int, ...] | None = None
        self._active_template: ReplayTemplate | None = None
        self.stats = KernelStats()
        self._worker = threading.Thread(target=self._work, name="kernelgate-kernel-spans", daemon=True)
        self._worker.start()
        self._wake = threading.Event()
        self._closing = False
        self._preparer: threading.Thread | None = None
        if capture.prepares_ahead:
            self._preparer = threading.Thread(target=self._prepare_ahead, name="kernelgate-kernel-prepare",
                                              daemon=True)
            self._preparer.start()

    def recorder_timings(self) -> dict[str, int]:
        """The recorder's own breakdown of where capture time goes, if it keeps one (CuptiCapture)."""
        return dict(getattr(self._capture, "timings", {}))

    # -- request side (event loop) ---------------------------------------------------------------------
    def on_request(self, span: trace.Span, headers: Mapping[str, str]) -> str | None:
        """Select (or not) the request whose server span is ``span``; records why on the span."""
        ctx = span.get_span_context()
        if not ctx.is_valid:
            return None
        with self._lock:
            reason, taken = self._sampler.admit(ctx.trace_id, ctx.trace_flags.sampled,
                                                is_forced(headers, self._config.force_header))
            if reason is None:
                self.stats.budget_refused = self.budget.refused
                return None
            self._requests[ctx.span_id] = _Selected(ctx, reason, self._config.steps_per_request,
                                                    self._config.max_spans_per_trace, taken, span)
            self._waiting += 1
            self.stats.selected += 1
            self.stats.by_reason[reason] = self.stats.by_reason.get(reason, 0) + 1
        self._wake.set()
        span.set_attribute(names.KERNELS_CAPTURE, reason)
        return reason

    def on_request_end(self, span: trace.Span, end_ns: int) -> bool:
        """The request is done. A captured one's span gets its GPU share and is ended here, or by the
        worker once its pending passes are exported (True: this tracer ends ``span``)."""
        if not self._requests:
            return False
        waits = False
        with self._lock:
            selected = self._requests.pop(span.get_span_context().span_id, None)
            if selected is None:
                return False
            unspent, selected.budget_ns = selected.budget_ns, 0
            if selected.steps_left > 0:
                self._waiting -= 1
            if selected.pending:
                selected.end_ns = end_ns
                self._ending.append(selected)
                waits = True
        if unspent:
            self.budget.refund(unspent)  # ended before a pass of it was captured
        if not waits:
            _end_with_share(selected, end_ns)
        return True

    # -- engine side (ForwardObserver) -------------------------------------------------------------------
    def start(self, step: Any) -> bool | None:
        """Before a forward pass: capture it if a selected request with passes left is in it. True asks
        the engine for the runner's timing of the pass's graph replay (``step.replay`` at ``finish``)."""
        if not self._waiting:
            if self._preparer is not None and self._capture.ready():
                self._release()  # attached ahead for requests that ended (or were captured) first
            return None
        if self._active is not None:
            return None
        key = getattr(step, "graph_key", None) if self._config.derive else None
        template = self._templates.get(key) if key is not None else None
        if not is_fresh(template, time.monotonic(), self._config.derive_refresh_s):
            template = None
        if template is None:
            if self._config.derive and self._preparer is not None and getattr(step, "phase", "") == "prefill":
                return None  # an attach ahead is for a decode step that must be recorded, not a prefill
            if key is not None and key in self._recording:
                return None  # its recorded replay is on its way: a later pass of these requests is derived
            if not self._capture.ready():
                # Attach ahead only for a pass that must be recorded: a decode step (a prefill is
                # captured only when the recorder is ready anyway), and with derivation off, any.
                if self._preparer is not None and (not self._config.derive or getattr(step, "phase", "") == "decode"):
                    if self._has_target(step):
                        self._want_record = True
                        self._wake.set()
                return None
        targets = self._take_targets(step)
        if not targets:
            return None
        if template is not None:  # derived: the runner times the replay, the worker places the kernels
            self._active, self._active_ns, self._active_template = targets, 0, template
            return True
        began = self._timer()
        try:
            self._capture.start()
        except Exception:  # noqa: BLE001 - e.g. another profiler is running: skip, never fail the step
            self.stats.failures += 1
            log.exception("could not start the kernel profiler")
            self._settle(targets, self._timer() - began)
            return
        finally:
            took = self._timer() - began
            self.stats.engine_thread_ns += took
            self.stats.engine_start_ns += took
        self._active, self._active_ns = targets, took
        self._want_record = False
        if key is not None:
            with self._lock:
                self._recording.add(key)  # until the worker has made its template
            self._active_key = key
            return True
        return None

    def idle(self) -> bool:
        """No selected request waits for a pass and none is being captured (engine thread): the
        engine may pipeline decode steps. A request selected meanwhile is not in the chained batch
        (joining it takes an admission, which ends the chain), so ``start`` finds no target in it."""
        return not self._waiting and self._active is None

    def _has_target(self, step: Any) -> bool:
        contexts: Sequence[SpanContext | None] = getattr(step, "trace_contexts", ()) or ()
        with self._lock:
            return any((s := self._requests.get(c.span_id)) is not None and s.steps_left > 0
                       for c in contexts if c is not None)

    def _take_targets(self, step: Any) -> list[_Selected]:
        """The selected requests with passes left in ``step``, each charged one pass."""
        contexts: Sequence[SpanContext | None] = getattr(step, "trace_contexts", ()) or ()
        targets: list[_Selected] = []
        with self._lock:
            for ctx in contexts:
                selected = self._requests.get(ctx.span_id) if ctx is not None else None
                # one request's prompts share its span: count the pass once
                if selected is not None and selected.steps_left > 0 and selected not in targets:
                    targets.append(selected)
            for target in targets:
                target.steps_left -= 1
                if target.steps_left == 0:
                    self._waiting -= 1
        return targets

    def finish(self, step: Any, span_context: PendingSpan | SpanContext | None) -> None:
        """After the pass (its outputs are on the host, so its kernels are done): stop, hand off
        (``span_context``, the step span's, is resolved on the worker)."""
        targets, self._active = self._active, None
        if targets is None:
            return
        now = self._clock()  # the pass's kernels are done: its outputs are on the host
        template, self._active_template = self._active_template, None
        key, self._active_key = self._active_key, None
        if template is not None:
            self._finish_derived(step, span_context, targets, template, now)
            return
        began = self._timer()
        try:
            raw = self._capture.stop()
        except Exception:  # noqa: BLE001
            self.stats.failures += 1
            log.exception("could not stop the kernel profiler")
            self._recorded(key)
            return
        finally:
            took = self._timer() - began
            self.stats.engine_thread_ns += took
            self._settle(targets, self._active_ns + took)
            if self._preparer is not None:
                self._wake.set()  # another selected request may be waiting for the recorder
        self.stats.captures += 1
        with self._lock:
            for target in targets:
                target.pending += 1
        if getattr(step, "replay", None) is None:
            self._recorded(key)  # not timed: no template from this pass
            key = None
        try:
            self._jobs.put_nowait(_Job(step, span_context, (step.start_time_ns, now), targets, raw, key=key))
        except queue.Full:
            self.stats.dropped_captures += 1
            self._recorded(key)
            self._exported(targets)

    def _finish_derived(self, step: Any, span_context: PendingSpan | SpanContext | None, targets: list[_Selected],
                        template: ReplayTemplate, now: int) -> None:
        """A derived pass: nothing to stop; the worker reads the replay's timing and places the kernels."""
        began = self._timer()
        if getattr(step, "replay", None) is None:  # the runner did not time it (e.g. no graph replayed)
            self._exported_none(targets)
            return
        self.stats.derived += 1
        with self._lock:
            for target in targets:
                target.pending += 1
        try:
            self._jobs.put_nowait(_Job(step, span_context, (step.start_time_ns, now), targets, None,
                                       template=template))
        except queue.Full:
            self.stats.dropped_captures += 1
            self._exported(targets)
        took = self._timer() - began
        self.stats.engine_thread_ns += took
        self.stats.derived_engine_ns += took
        self._settle(targets, took)

    def _exported_none(self, targets: list[_Selected]) -> None:
        """A pass charged to ``targets`` that produced nothing: give it back."""
        with self._lock:
            for target in targets:
                if target.steps_left == 0 and target.span_context.span_id in self._requests:
                    self._waiting += 1
                target.steps_left += 1

    def _recorded(self, key: tuple[int, ...] | None) -> None:
        """A recorded pass of ``key`` is done with (its template made, or none to make)."""
        if key is not None:
            with self._lock:
                self._recording.discard(key)

    def _settle(self, targets: list[_Selected], stall_ns: int) -> None:
        """Charge the budget what one capture (of ``targets``' pass) stalled the engine thread."""
        with self._lock:
            taken = sum(t.budget_ns for t in targets)
            for target in targets:
                target.budget_ns = 0
        self.budget.spent(taken, stall_ns)

    def _release(self) -> None:
        self._want_record = False
        began = self._timer()
        try:
            self._capture.release()
        except Exception:  # noqa: BLE001
            self.stats.failures += 1
            log.exception("could not release the kernel recorder")
        self.stats.releases += 1
        self.stats.engine_thread_ns += self._timer() - began

    # -- preparing thread ---------------------------------------------------------------------------------
    def _prepare_ahead(self) -> None:
        """Attach the recorder whenever a selected request waits for a pass and it is not ready."""
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            if not self._waiting or self._active is not None or self._capture.ready():
                continue
            if self._config.derive and not self._want_record:
                continue  # the waiting requests' passes are derived: no recorder needed
            began = self._timer()
            try:
                self._capture.prepare()
            except Exception:  # noqa: BLE001 - the next selected request tries again
                self.stats.failures += 1
                log.exception("could not prepare the kernel recorder")
            finally:
                self.stats.prepares += 1
                self.stats.prepare_ns += self._timer() - began

    # -- worker ---------------------------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Export what is pending, then stop the worker (before the tracer provider shuts down)."""
        self._closing = True
        self._wake.set()
        if self._preparer is not None:
            self._preparer.join(timeout)
        try:
            self._jobs.put(None, timeout=timeout)
        except queue.Full:
            log.warning("kernel span worker still busy; pending captures dropped")
        else:
            self._worker.join(timeout)
        with self._lock:
            ending, self._ending = self._ending, []
        for selected in ending:  # spans still waiting end now, with what was exported
            _end_with_share(selected, selected.end_ns or self._clock())

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            began = self._timer()
            try:
                self._export(job)
            except Exception:  # noqa: BLE001 - a bad profile loses its spans, nothing else
                self.stats.failures += 1
                log.exception("kernel spans of step %s not exported", getattr(job.step, "index", "?"))
            finally:
                self._exported(job.targets)
            self.stats.worker_ns += self._timer() - began

    def _exported(self, targets: list[_Selected]) -> None:
        """One pass of each target is exported (or lost); a done request with none left gets its span ended."""
        done = []
        with self._lock:
            for target in targets:
                target.pending -= 1
                if target.pending == 0 and target in self._ending:
                    self._ending.remove(target)
                    done.append(target)
        for target in done:
            _end_with_share(target, target.end_ns or self._clock())

    def _export(self, job: _Job) -> None:
        replay = getattr(job.step, "replay", None)
        try:
            replay_ns = replay.elapsed_ns() if replay is not None else None  # waits for its end mark (CUDA)
            if job.template is not None:
                assert replay is not None and replay_ns is not None
                events = place(job.template, replay.wall_start_ns, replay_ns)
                anchor = ClockAnchor(0, 0, replay.uncertainty_ns)  # placed on the wall clock already
            else:
                assert job.raw is not None
                events, anchor = self._capture.events(job.raw)
            step_span = resolve(job.step_span)
            source = None
            for target in job.targets:
                plan = plan_kernel_spans(events, anchor, job.window, self._config.fold_after,
                                         max(target.spans_left - 1, 0))
                target.share_ns += request_share(job.step, target.span_context.span_id, plan.gpu_time_ns)
                target.passes += 1
                if target.spans_left <= 1:
                    continue
                target.spans_left -= 1 + len(plan.spans)
                self.stats.exported_spans += 1 + len(plan.spans)
                if job.template is not None:
                    self.stats.derived_spans += 1 + len(plan.spans)
                forward = self._emit(job, step_span, target, plan, anchor, replay_ns)
                source = source or forward
            if job.key is not None and replay is not None and replay_ns is not None:
                template = build_template(events, anchor, job.key, replay.wall_start_ns, replay_ns,
                                          getattr(job.step, "index", -1), time.monotonic(), source)
                if template is not None:
                    self._templates[job.key] = template
                    self.stats.templates += 1
                else:
                    log.warning("no kernel of graph %s's replay in its recorded pass: not derived", job.key)
        finally:
            self._recorded(job.key)

    def _emit(self, job: _Job, step_span: SpanContext | None, target: _Selected, plan: KernelPlan,
              anchor: ClockAnchor, replay_ns: int | None) -> SpanContext:
        step = job.step
        # Under the step span when it is recorded in this request's trace, else under the request span.
        recorded = step_span is not None and step_span.trace_flags.sampled
        same_trace = recorded and step_span.trace_id == target.span_context.trace_id
        parent = step_span if same_trace else target.span_context
        links = [(step_span.trace_id, step_span.span_id, int(step_span.trace_flags))] \
            if recorded and not same_trace else []
        attributes: dict[str, Any] = {
            names.STEP_INDEX: getattr(step, "index", -1),
            names.STEP_PHASE: getattr(step, "phase", ""),
            names.STEP_BATCH_SIZE: getattr(step, "batch_size", 0),
            names.KERNELS_CAPTURE: target.reason,
            names.KERNELS_ACTIVITIES: self._capture.activities,
            names.KERNELS_RECORDER: self._capture.name,
            names.KERNELS_COUNT: plan.kernels,
            names.KERNELS_SPANS: len(plan.spans),
            names.KERNELS_FOLDED: plan.folded,
            names.KERNELS_DROPPED: plan.dropped,
            names.KERNELS_CLAMPED: plan.clamped,
            names.KERNELS_GPU_TIME_NS: plan.gpu_time_ns,
            # this request's part of the pass's GPU time (by tokens: the shares of a pass sum to it)
            names.GPU_REQUEST_SHARE_NS: request_share(step, target.span_context.span_id, plan.gpu_time_ns),
            names.STEP_NUM_TOKENS: getattr(step, "num_tokens", 0),
            names.KERNELS_FIRST_START_NS: plan.first_ns,
            names.KERNELS_LAST_END_NS: plan.last_ns,
            names.CLOCK_UNCERTAINTY_NS: anchor.uncertainty_ns,
            names.KERNELS_SOURCE: "derived" if job.template is not None else "recorded",
        }
        key = job.key or (job.template.key if job.template is not None else None)
        if key is not None:
            attributes[names.KERNELS_GRAPH_KEY] = ",".join(map(str, key))
        if replay_ns is not None:
            attributes[names.KERNELS_REPLAY_NS] = replay_ns
        if job.template is not None:
            attributes[names.KERNELS_DERIVED_FROM_STEP] = job.template.step_index
            source = job.template.source
            if isinstance(source, SpanContext):
                links.append((source.trace_id, source.span_id, int(source.trace_flags)))
        # Ends with its last kernel, so it stays inside the step span (which ends before finish() runs).
        sink = self._sink if parent.trace_flags.sampled else None
        if sink is not None:  # the sampler decides as it would for the SDK span (never 'drop' under a sampled parent)
            kept = sampled_attributes(self._tracer, parent, names.FORWARD_SPAN, attributes)
            sink, attributes = (sink, kept) if kept is not None else (None, attributes)
        record = ForwardRecord(parent.trace_id, new_span_id() if sink is not None else 0, parent.span_id,
                               parent.is_remote, job.window[0], plan.last_ns if plan.spans else job.window[1],
                               attributes, tuple(links), kernel_tuples(plan.spans), job.template is not None)
        if sink is not None:  # built and exported by the span export process (it counts what it loses)
            sink(record)
            return forward_context(record)
        return emit_with_tracer(self._tracer, record._replace(span_id=0))


def _end_with_share(selected: _Selected, end_ns: int) -> None:
    """End a captured request's span with its share of the GPU time of its captured passes."""
    span = selected.span
    if span is None:
        return
    if selected.passes:  # none: selected, but no pass was captured (the recorder was busy)
        span.set_attribute(names.GPU_REQUEST_SHARE_NS, selected.share_ns)
    span.end(end_time=end_ns)
