"""CUDA kernels of sampled requests as spans, captured with torch's profiler around forward passes.

Flow (see docs/tracing.md):

* ``on_request`` (event loop, from ``inference.tracing.Tracing.request_span``) decides once per
  request whether its forward passes are profiled: the trace must be head-sampled, and either
  its trace id falls inside ``ratio`` or the request carries the force header; every capture,
  forced ones too, spends one of ``max_captures_per_minute``.
* ``start``/``finish`` (engine thread, the engine's ``forward_observer`` hook) turn the profiler
  on and off around the first ``steps_per_request`` forward passes of a selected request that
  start once the profiler is ready again. That is all the request path pays: enabling the
  profiler (CUPTI re-attaches there), and its stop (flushing CUPTI).
* A worker thread turns the raw profile into spans: events are mapped onto the trace's clock,
  folded, capped, and exported as children of a ``gpu.forward`` span per captured pass.

Two captures do the recording, behind the :class:`Capture` protocol: :class:`CuptiCapture`
(CUPTI's Activity API through NVIDIA's ``cupti-python``, on a GPU when that is installed: half
the engine-thread cost) and :class:`TorchProfilerCapture` (torch's profiler: without
``cupti-python``, and for CPU operators). The pure parts (clock mapping, folding, caps,
sampling) take plain data and are tested without a GPU; the captures are the only code that
touches torch or CUPTI.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind

from otel.config import KernelTraceConfig

log = logging.getLogger("kernelgate.otel.kernels")

TRACER_NAME = "kernelgate.kernels"
FORWARD_SPAN = "gpu.forward"
ANCHOR_NAME = "kernelgate.clock_anchor"
ANCHOR_READINGS = 3
# torch.cuda._sleep(0) launches this empty kernel: its launch call is the clock marker of a cuda capture.
ANCHOR_KERNEL = "spin_kernel"
# After a capture, Kineto detaches CUPTI asynchronously (at a later CUDA call of any thread); a
# capture started before that is done records no kernels and leaves CUPTI attached. Measured:
# bench/results/cupti_after_capture.json.
TEARDOWN_GAP_S = 0.1
# The worker thread hands the GIL back this often (profile events, spans): a thread busy in Python
# otherwise keeps it for the switch interval (5 ms) each time the engine thread asks for it back,
# and an eager forward pass asks at every operator.
YIELD_EVERY_EVENTS = 256
YIELD_EVERY_SPANS = 16
YIELD_S = 0.0002
_TRACE_ID_LOW = (1 << 64) - 1
_WINDOW_S = 60.0

Activities = Literal["cuda", "cpu"]


# --- plain data ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelEvent:
    """One device activity (or CPU operator) as the profiler reported it, on the profiler's clock."""

    name: str
    start_ns: int
    end_ns: int
    device: int = 0
    stream: int = 0


@dataclass(frozen=True)
class ClockAnchor:
    """One instant read on both clocks: the profiler's and the wall clock spans use.

    At capture start a marker is recorded inside the profile (a CPU annotation, or for ``cuda``
    the runtime call launching an empty kernel) while ``time.time_ns()`` is read right before
    and after it, a few times; the tightest pair wins (another thread taking the GIL in between
    widens a pair by milliseconds). The marker's midpoint (profiler clock) is taken to be the
    readings' midpoint (wall clock); ``uncertainty_ns`` is half the readings' gap. The profiler
    puts GPU timestamps on its CPU clock already, so one offset maps both.
    """

    profiler_ns: int
    wall_ns: int
    uncertainty_ns: int = 0

    def to_wall(self, profiler_ns: int) -> int:
        return profiler_ns - self.profiler_ns + self.wall_ns

    @classmethod
    def pick(cls, markers: Sequence[tuple[int, int]], readings: Sequence[tuple[int, int]]) -> ClockAnchor:
        """The anchor from the tightest reading: ``markers`` (profiler clock) and ``readings``
        (wall clock before/after each) as (start, end) pairs, in the order they were taken."""
        if len(markers) != len(readings) or not markers:
            raise ValueError(f"{len(markers)} clock anchors in the profile, {len(readings)} read")
        (start, end), (before, after) = min(zip(sorted(markers), readings), key=lambda m: m[1][1] - m[1][0])
        return cls(profiler_ns=(start + end) // 2, wall_ns=(before + after) // 2, uncertainty_ns=(after - before) // 2)


@dataclass(frozen=True)
class KernelSpan:
    """A span to export: one kernel, or ``count`` kernels of one name folded together."""

    name: str
    start_ns: int
    end_ns: int
    count: int
    gpu_time_ns: int
    device: int = 0
    stream: int = 0
    kernel_name: str = ""


@dataclass(frozen=True)
class KernelPlan:
    """What one captured forward pass becomes, with what was folded, dropped or clamped."""

    spans: tuple[KernelSpan, ...]
    kernels: int
    folded: int
    dropped: int
    clamped: int
    gpu_time_ns: int
    first_ns: int
    last_ns: int


def short_kernel_name(name: str, limit: int = 96) -> str:
    """``void ns::kernel<T, 4>(args)`` -> ``ns::kernel``: span names stay readable in Jaeger.
    Anonymous namespaces are left out (their parenthesis is not the argument list)."""
    short = (name[5:] if name.startswith("void ") else name).replace("(anonymous namespace)::", "")
    for stop in ("<", "("):
        cut = short.find(stop)
        if cut > 0:
            short = short[:cut]
    return short.strip()[:limit] or name[:limit]


def plan_kernel_spans(events: Iterable[KernelEvent], anchor: ClockAnchor, window: tuple[int, int],
                      fold_after: int, max_spans: int) -> KernelPlan:
    """Map ``events`` onto the wall clock, fold repeats, keep at most ``max_spans``.

    Per kernel name, the first ``fold_after`` launches become spans of their own; the rest
    become one span from the first folded launch's start to the last one's end, with their
    count and summed GPU time. Times are clamped into ``window`` (the parent span) so the
    tree stays consistent whatever the residual clock error; ``clamped`` counts the kernels
    that needed it. Over ``max_spans``, the spans with the least GPU time are dropped.
    """
    lo, hi = window
    mapped: list[tuple[int, int, KernelEvent]] = []
    clamped = 0
    for event in events:
        start, end = anchor.to_wall(event.start_ns), anchor.to_wall(max(event.end_ns, event.start_ns))
        if start < lo or end > hi:
            clamped += 1
        start = min(max(start, lo), hi)
        mapped.append((start, min(max(end, start), hi), event))
    mapped.sort(key=lambda m: m[0])
    by_name: dict[str, list[tuple[int, int, KernelEvent]]] = {}
    for item in mapped:
        by_name.setdefault(item[2].name, []).append(item)
    spans: list[KernelSpan] = []
    folded = 0
    for name, items in by_name.items():
        short = short_kernel_name(name)
        for start, end, event in items[:fold_after]:
            spans.append(KernelSpan(short, start, end, 1, end - start, event.device, event.stream, name))
        rest = items[fold_after:]
        if rest:
            folded += len(rest)
            spans.append(KernelSpan(short, rest[0][0], max(e for _, e, _ in rest), len(rest),
                                    sum(e - s for s, e, _ in rest), rest[0][2].device, rest[0][2].stream, name))
    dropped = 0
    if len(spans) > max_spans:
        kept = sorted(spans, key=lambda s: s.gpu_time_ns, reverse=True)[:max(max_spans, 0)]
        dropped = sum(s.count for s in spans) - sum(s.count for s in kept)
        spans = kept
    spans.sort(key=lambda s: (s.start_ns, s.end_ns))
    return KernelPlan(spans=tuple(spans), kernels=len(mapped), folded=folded, dropped=dropped, clamped=clamped,
                      gpu_time_ns=sum(e - s for s, e, _ in mapped),
                      first_ns=mapped[0][0] if mapped else lo, last_ns=max((e for _, e, _ in mapped), default=lo))


def gpu_shares(total_ns: int, tokens: Sequence[int]) -> list[int]:
    """``total_ns`` of a pass divided among its sequences by the tokens each put through it.

    Largest remainder: the integer shares always sum to ``total_ns`` exactly. A pass with no
    tokens at all (cannot happen in the engine) splits evenly.
    """
    if not tokens:
        return []
    weights = list(tokens) if sum(tokens) > 0 else [1] * len(tokens)
    whole = sum(weights)
    exact = [total_ns * w for w in weights]
    shares = [e // whole for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] % whole, reverse=True)
    for i in by_remainder[:total_ns - sum(shares)]:
        shares[i] += 1
    return shares


def request_share(step: Any, span_id: int, total_ns: int) -> int:
    """The GPU time of ``step`` that falls to the request whose server span is ``span_id``."""
    contexts: Sequence[SpanContext | None] = getattr(step, "trace_contexts", ()) or ()
    tokens: Sequence[int] = getattr(step, "tokens_per_sequence", ()) or ()
    if len(tokens) != len(contexts):
        tokens = [1] * len(contexts)
    shares = gpu_shares(total_ns, tokens)
    return sum(share for ctx, share in zip(contexts, shares) if ctx is not None and ctx.span_id == span_id)


# --- which requests are captured ---------------------------------------------------------------------
def in_ratio(trace_id: int, ratio: float) -> bool:
    """Same test as OTel's TraceIdRatioBased: with ratio <= the head ratio, a kernel-sampled
    trace is always a head-sampled one, and every service decides alike for one trace."""
    return (trace_id & _TRACE_ID_LOW) < round(ratio * (_TRACE_ID_LOW + 1))


def is_forced(headers: Mapping[str, str], header: str) -> bool:
    value = headers.get(header) or headers.get(header.lower()) or ""
    return value.strip().lower() in ("1", "true", "yes")


class CaptureSampler:
    """Ratio-or-forced selection under a sliding one-minute cap on captures. Not thread-safe."""

    def __init__(self, ratio: float, max_per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._ratio = ratio
        self._max = max_per_minute
        self._clock = clock
        self._starts: deque[float] = deque()
        self.rate_limited = 0

    def decide(self, trace_id: int, sampled: bool, forced: bool) -> str | None:
        """``"forced"``, ``"ratio"``, or None (not captured)."""
        if not sampled:
            return None
        reason = "forced" if forced else ("ratio" if in_ratio(trace_id, self._ratio) else None)
        if reason is None:
            return None
        now = self._clock()
        while self._starts and now - self._starts[0] >= _WINDOW_S:
            self._starts.popleft()
        if len(self._starts) >= self._max:
            self.rate_limited += 1
            return None
        self._starts.append(now)
        return reason


# --- the profiler --------------------------------------------------------------------------------------
@dataclass
class RawCapture:
    """What the engine thread hands to the worker: the profiler's result, unparsed."""

    result: Any
    readings: list[tuple[int, int]]  # wall clock before/after each anchor marker


class Capture(Protocol):
    """Records one forward pass at a time; ``name`` and ``activities`` go on the ``gpu.forward`` span."""

    name: str
    activities: Activities

    def ready(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> RawCapture: ...

    def events(self, raw: RawCapture) -> tuple[list[KernelEvent], ClockAnchor]: ...


class TorchProfilerCapture:
    """torch's profiler (Kineto/CUPTI) switched on for one forward pass at a time.

    ``cuda`` records device activities (kernels, memcpy, memset) and the CUDA runtime calls that
    launched them; the clock marker is the launch of an empty kernel. CPU operators are not
    recorded: for an eager prefill they were 7 in 8 of the profile's events and about doubled
    the stop and the parse. ``cpu`` records CPU operators of the calling thread (CPU serving and
    tests: there are no kernels there), marked by a ``record_function``. Uses
    ``torch.autograd``'s enable/disable primitives, which torch.profiler itself is built on, so
    that stopping does not parse the trace on the request path.

    For ``cuda`` it sets ``TEARDOWN_CUPTI=1`` unless the operator set it: Kineto detaches CUPTI
    after a trace only then (libkineto CuptiActivityApi.cpp), and an attached CUPTI made every
    later CUDA graph replay 10-16 % slower, captured or not, for the life of the process
    (bench/results/cupti_after_capture.json). CUPTI re-attaches lazily at the next start (15-30
    ms; torch.profiler allows that with CUDA graphs from CUDA 12.6); ``ready`` is False for
    ``TEARDOWN_GAP_S`` after a stop, while the detach may still be under way.
    """

    name = "torch.profiler"

    def __init__(self, activities: Activities, clock: Callable[[], int] = time.time_ns) -> None:
        import torch
        from torch.autograd import ProfilerActivity, ProfilerConfig, ProfilerState

        self.activities = activities
        self._clock = clock
        if activities == "cuda":
            os.environ.setdefault("TEARDOWN_CUPTI", "1")
        self._gap_s = TEARDOWN_GAP_S if activities == "cuda" and os.environ["TEARDOWN_CUPTI"] == "1" else 0.0
        self._stopped_at = -self._gap_s
        self._kinds = {ProfilerActivity.CUDA} if activities == "cuda" else {ProfilerActivity.CPU}
        self._config = ProfilerConfig(ProfilerState.KINETO, False, False, False, False, False,
                                      torch._C._profiler._ExperimentalConfig())
        self._mark: Callable[[], None] = (lambda: torch.cuda._sleep(0)) if activities == "cuda" else self._annotate
        self._record = torch.profiler.record_function
        self._device_cpu = torch._C._autograd.DeviceType.CPU
        self._readings: list[tuple[int, int]] = []

    def ready(self) -> bool:
        return time.monotonic() - self._stopped_at >= self._gap_s

    def start(self) -> None:
        from torch.autograd import _enable_profiler, _prepare_profiler

        _prepare_profiler(self._config, self._kinds)
        _enable_profiler(self._config, self._kinds)
        self._readings = []
        for _ in range(ANCHOR_READINGS):
            before = self._clock()
            self._mark()
            self._readings.append((before, self._clock()))

    def stop(self) -> RawCapture:
        from torch.autograd import _disable_profiler

        try:
            result = _disable_profiler()
        finally:
            self._stopped_at = time.monotonic()
        readings, self._readings = self._readings, []
        return RawCapture(result, readings)

    def events(self, raw: RawCapture) -> tuple[list[KernelEvent], ClockAnchor]:
        """Parse the profile (worker thread): the anchor, then the activities of interest."""
        if self.activities == "cuda":
            return self._device_events(raw)
        return self._cpu_events(raw)

    def _annotate(self) -> None:
        with self._record(ANCHOR_NAME):
            pass

    def _device_events(self, raw: RawCapture) -> tuple[list[KernelEvent], ClockAnchor]:
        launches: dict[int, tuple[int, int]] = {}  # runtime calls (CPU side) by correlation id
        marked: list[int] = []
        out: list[KernelEvent] = []
        for i, e in enumerate(raw.result.events()):
            if i % YIELD_EVERY_EVENTS == YIELD_EVERY_EVENTS - 1:
                time.sleep(YIELD_S)
            if e.device_type() == self._device_cpu:
                launches[e.correlation_id()] = (e.start_ns(), e.end_ns())
                continue
            name = e.name()
            if ANCHOR_KERNEL in name:
                marked.append(e.correlation_id())
            else:
                out.append(KernelEvent(name, e.start_ns(), e.end_ns(), e.device_index(), e.device_resource_id()))
        return out, ClockAnchor.pick([launches[c] for c in marked if c in launches], raw.readings)

    def _cpu_events(self, raw: RawCapture) -> tuple[list[KernelEvent], ClockAnchor]:
        kineto = list(raw.result.events())
        markers = sorted((e for e in kineto if e.name() == ANCHOR_NAME), key=lambda e: e.start_ns())
        anchor = ClockAnchor.pick([(m.start_ns(), m.end_ns()) for m in markers], raw.readings)
        threads = {m.start_thread_id() for m in markers}
        out = [KernelEvent(e.name(), e.start_ns(), e.end_ns(), e.device_index(), e.device_resource_id())
               for e in kineto if e.device_type() == self._device_cpu and e.name() != ANCHOR_NAME
               and e.start_thread_id() in threads and not e.is_user_annotation()]
        return out, anchor


class CuptiCapture:
    """CUDA kernels recorded through CUPTI's Activity API directly (NVIDIA's ``cupti-python``).

    Why not torch's profiler on a GPU: it costs the engine thread ~34 ms a captured pass on the
    H100 (Kineto re-attaching CUPTI, then processing its records with the GIL held); this
    costs ~21 ms (bench/results/tracing_gpu.json), and the records arrive as plain values.

    Per pass, on the engine thread: ``start`` registers the buffer callbacks (CUPTI attaches
    here, ~13 ms; after a ``finalize`` it has forgotten them, and a capture without them records
    nothing), enables concurrent-kernel records and reads the clock anchor (``get_timestamp``,
    the clock of the kernel records, between two wall-clock readings); ``stop`` disables them,
    flushes (the records come back through ``_buffer_completed`` on this thread, 1-3 ms) and
    detaches CUPTI with ``finalize`` (2-5 ms): left attached, CUPTI slowed every later CUDA graph
    replay 10-18 %. Demangling and everything after run on the worker (``events``).

    ``cupti`` is the ``cupti.cupti`` module (a fake in tests); ``demangle`` turns a kernel's
    mangled name into the C++ signature (torch's ``_demangle``).
    """

    name = "cupti"
    activities: Activities = "cuda"
    # CUPTI asks for activity buffers as it needs them; one pass of GPT-2 medium filled ~120 KB.
    BUFFER_BYTES = 8 << 20

    def __init__(self, cupti: Any, demangle: Callable[[str], str] = lambda name: name,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self._cupti = cupti
        self._kind = cupti.ActivityKind.CONCURRENT_KERNEL
        self._demangle = demangle
        self._clock = clock
        self._lock = threading.Lock()  # CUPTI may hand a full buffer back on a thread of its own
        self._records: list[tuple[str, int, int, int, int]] = []
        self._readings: list[tuple[int, int]] = []
        self._markers: list[tuple[int, int]] = []

    def ready(self) -> bool:
        return True  # finalize() has detached CUPTI by the time stop() returns

    def start(self) -> None:
        cupti = self._cupti
        try:
            cupti.activity_register_callbacks(self._buffer_requested, self._buffer_completed)
            cupti.activity_enable(self._kind)
        except Exception:
            self._detach()
            raise
        with self._lock:
            self._records = []  # whatever a failed stop() left behind
        self._readings, self._markers = [], []
        for _ in range(ANCHOR_READINGS):
            before = self._clock()
            stamp = cupti.get_timestamp()
            self._readings.append((before, self._clock()))
            self._markers.append((stamp, stamp))

    def stop(self) -> RawCapture:
        try:
            self._cupti.activity_disable(self._kind)
            self._cupti.activity_flush_all(1)  # CUPTI_ACTIVITY_FLAG_FLUSH_FORCED: incomplete buffers too
        finally:
            self._detach()
        with self._lock:
            records, self._records = self._records, []
        readings, self._readings = self._readings, []
        markers, self._markers = self._markers, []
        return RawCapture((records, markers), readings)

    def events(self, raw: RawCapture) -> tuple[list[KernelEvent], ClockAnchor]:
        records, markers = raw.result
        names: dict[str, str] = {}
        out: list[KernelEvent] = []
        for i, (name, start, end, device, stream) in enumerate(records):
            if i % YIELD_EVERY_EVENTS == YIELD_EVERY_EVENTS - 1:
                time.sleep(YIELD_S)
            readable = names.get(name)
            if readable is None:
                readable = names[name] = self._demangle(name)
            out.append(KernelEvent(readable, start, end, device, stream))
        return out, ClockAnchor.pick(markers, raw.readings)

    def _detach(self) -> None:
        try:
            self._cupti.finalize()
        except Exception:  # noqa: BLE001 - the capture's own error (if any) is the one to report
            log.exception("could not detach CUPTI")

    def _buffer_requested(self) -> tuple[int, int]:
        return self.BUFFER_BYTES, 0  # size, max records (0: as many as fit)

    def _buffer_completed(self, activities: Sequence[Any]) -> None:
        # Copied out here: the record objects may point into the buffer CUPTI reuses after this returns.
        kernels = [(a.name, a.start, a.end, a.device_id, a.stream_id) for a in activities if a.kind == self._kind]
        with self._lock:
            self._records.extend(kernels)


# --- the observer ----------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Selected:
    """A captured request: its span, the passes left to profile, the spans left in its trace."""

    span_context: SpanContext
    reason: str
    steps_left: int
    spans_left: int
    span: Any = None  # the live request span: its GPU share goes on it before it ends
    share_ns: int = 0  # its share of the GPU time of its captured passes, exported so far
    pending: int = 0  # captured passes not yet exported
    passes: int = 0  # captured passes exported
    end_ns: int | None = None  # set when the request is done and its span waits for pending passes


@dataclass
class _Job:
    step: Any
    step_span: SpanContext | None
    window: tuple[int, int]
    targets: list[_Selected]
    raw: RawCapture


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
    engine_start_ns: int = 0  # the starting part of engine_thread_ns (CUPTI re-attaches there)
    worker_ns: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class KernelTracer:
    """The engine's forward observer for kernel capture, and the request hook that selects requests."""

    def __init__(self, config: KernelTraceConfig, tracer: trace.Tracer, capture: Capture,
                 sampler: CaptureSampler | None = None, clock: Callable[[], int] = time.time_ns) -> None:
        self._config = config
        self._tracer = tracer
        self._capture = capture
        self._sampler = sampler or CaptureSampler(config.ratio, config.max_captures_per_minute)
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: dict[int, _Selected] = {}  # by request span id; event loop adds, engine reads
        self._active: list[_Selected] | None = None  # engine thread only
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=config.max_pending)
        self._closing: list[_Selected] = []  # done requests whose spans wait for their passes
        self.stats = KernelStats()
        self._worker = threading.Thread(target=self._work, name="kernelgate-kernel-spans", daemon=True)
        self._worker.start()

    # -- request side (event loop) ---------------------------------------------------------------------
    def on_request(self, span: trace.Span, headers: Mapping[str, str]) -> str | None:
        """Select (or not) the request whose server span is ``span``; records why on the span."""
        ctx = span.get_span_context()
        if not ctx.is_valid:
            return None
        with self._lock:
            reason = self._sampler.decide(ctx.trace_id, ctx.trace_flags.sampled,
                                          is_forced(headers, self._config.force_header))
            if reason is None:
                return None
            self._requests[ctx.span_id] = _Selected(ctx, reason, self._config.steps_per_request,
                                                    self._config.max_spans_per_trace, span)
            self.stats.selected += 1
            self.stats.by_reason[reason] = self.stats.by_reason.get(reason, 0) + 1
        span.set_attribute("kernelgate.kernels.capture", reason)
        return reason

    def on_request_end(self, span: trace.Span, end_ns: int) -> bool:
        """Done: a captured request's span gets its GPU share; ended here, or by the worker once its
        pending passes are exported (True)."""
        if not self._requests:
            return False
        with self._lock:
            selected = self._requests.pop(span.get_span_context().span_id, None)
            if selected is None:
                return False
            if selected.pending:
                selected.end_ns = end_ns
                self._closing.append(selected)
                return True
        _end_with_share(selected, end_ns)
        return True

    # -- engine side (ForwardObserver) -------------------------------------------------------------------
    def start(self, step: Any) -> None:
        """Before a forward pass: profile it if a selected request with passes left is in it."""
        if not self._requests or self._active is not None or not self._capture.ready():
            return
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
        if not targets:
            return
        began = time.perf_counter_ns()
        try:
            self._capture.start()
        except Exception:  # noqa: BLE001 - e.g. another profiler is running: skip, never fail the step
            self.stats.failures += 1
            log.exception("could not start the kernel profiler")
            return
        finally:
            took = time.perf_counter_ns() - began
            self.stats.engine_thread_ns += took
            self.stats.engine_start_ns += took
        self._active = targets

    def finish(self, step: Any, span_context: SpanContext | None) -> None:
        """After the pass (its outputs are on the host, so its kernels are done): stop, hand off."""
        targets, self._active = self._active, None
        if targets is None:
            return
        now = self._clock()  # the pass's kernels are done: its outputs are on the host
        began = time.perf_counter_ns()
        try:
            raw = self._capture.stop()
        except Exception:  # noqa: BLE001
            self.stats.failures += 1
            log.exception("could not stop the kernel profiler")
            return
        finally:
            self.stats.engine_thread_ns += time.perf_counter_ns() - began
        self.stats.captures += 1
        with self._lock:
            for target in targets:
                target.pending += 1
        try:
            self._jobs.put_nowait(_Job(step, span_context, (step.start_time_ns, now), targets, raw))
        except queue.Full:
            self.stats.dropped_captures += 1
            self._settle(targets)

    # -- worker ---------------------------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Export what is pending, then stop the worker (before the tracer provider shuts down)."""
        try:
            self._jobs.put(None, timeout=timeout)
        except queue.Full:
            log.warning("kernel span worker still busy; pending captures dropped")
        else:
            self._worker.join(timeout)
        with self._lock:
            closing, self._closing = self._closing, []
        for selected in closing:  # spans still waiting end now, with what was exported
            _end_with_share(selected, selected.end_ns or self._clock())

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            began = time.perf_counter_ns()
            try:
                self._export(job)
            except Exception:  # noqa: BLE001 - a bad profile loses its spans, nothing else
                self.stats.failures += 1
                log.exception("kernel spans of step %s not exported", getattr(job.step, "index", "?"))
            finally:
                self._settle(job.targets)
            self.stats.worker_ns += time.perf_counter_ns() - began

    def _settle(self, targets: list[_Selected]) -> None:
        """One pass of each target is exported (or lost); a done request with none left gets its span ended."""
        done = []
        with self._lock:
            for target in targets:
                target.pending -= 1
                if target.pending == 0 and target in self._closing:
                    self._closing.remove(target)
                    done.append(target)
        for target in done:
            _end_with_share(target, target.end_ns or self._clock())

    def _export(self, job: _Job) -> None:
        events, anchor = self._capture.events(job.raw)
        for target in job.targets:
            plan = plan_kernel_spans(events, anchor, job.window, self._config.fold_after,
                                     max(target.spans_left - 1, 0))
            target.share_ns += request_share(job.step, target.span_context.span_id, plan.gpu_time_ns)
            target.passes += 1
            if target.spans_left <= 1:
                continue
            target.spans_left -= 1 + len(plan.spans)
            self.stats.exported_spans += 1 + len(plan.spans)
            self._emit(job, target, plan, anchor)

    def _emit(self, job: _Job, target: _Selected, plan: KernelPlan, anchor: ClockAnchor) -> None:
        step, step_span = job.step, job.step_span
        # Under the step span when it is recorded in this request's trace, else under the request span.
        recorded = step_span is not None and step_span.trace_flags.sampled
        same_trace = recorded and step_span.trace_id == target.span_context.trace_id
        parent = step_span if same_trace else target.span_context
        links = [Link(step_span)] if recorded and not same_trace else []
        forward = self._tracer.start_span(
            FORWARD_SPAN, context=trace.set_span_in_context(trace.NonRecordingSpan(parent)), kind=SpanKind.INTERNAL,
            start_time=job.window[0], links=links, attributes={
                "kernelgate.step.index": getattr(step, "index", -1),
                "kernelgate.step.phase": getattr(step, "phase", ""),
                "kernelgate.step.batch_size": getattr(step, "batch_size", 0),
                "kernelgate.kernels.capture": target.reason,
                "kernelgate.kernels.activities": self._capture.activities,
                "kernelgate.kernels.recorder": self._capture.name,
                "kernelgate.kernels.count": plan.kernels,
                "kernelgate.kernels.spans": len(plan.spans),
                "kernelgate.kernels.folded": plan.folded,
                "kernelgate.kernels.dropped": plan.dropped,
                "kernelgate.kernels.clamped": plan.clamped,
                "kernelgate.kernels.gpu_time_ns": plan.gpu_time_ns,
                # This request's part of the pass's GPU time (by tokens: the shares of a pass sum to it).
                "kernelgate.gpu.request_share_ns": request_share(step, target.span_context.span_id, plan.gpu_time_ns),
                "kernelgate.step.num_tokens": getattr(step, "num_tokens", 0),
                "kernelgate.kernels.first_start_ns": plan.first_ns,
                "kernelgate.kernels.last_end_ns": plan.last_ns,
                "kernelgate.clock.uncertainty_ns": anchor.uncertainty_ns,
            })
        ctx = trace.set_span_in_context(forward)
        for i, k in enumerate(plan.spans):
            if i % YIELD_EVERY_SPANS == YIELD_EVERY_SPANS - 1:
                time.sleep(YIELD_S)
            attributes: dict[str, Any] = {"gpu.kernel.name": k.kernel_name[:1024], "gpu.device": k.device,
                                          "gpu.stream": k.stream, "kernelgate.kernel.count": k.count,
                                          "kernelgate.kernel.gpu_time_ns": k.gpu_time_ns}
            if k.count > 1:
                attributes["kernelgate.kernel.folded"] = True
            self._tracer.start_span(k.name, context=ctx, kind=SpanKind.INTERNAL, start_time=k.start_ns,
                                    attributes=attributes).end(end_time=k.end_ns)
        # Ends with its last kernel, so it stays inside the step span (which ends before finish() runs).
        forward.end(end_time=plan.last_ns if plan.spans else job.window[1])


def _end_with_share(selected: _Selected, end_ns: int) -> None:
    """End a captured request's span with its share of the GPU time of its captured passes."""
    span = selected.span
    if span is None:
        return
    if selected.passes:  # none: selected, but no pass was captured (the profiler was busy)
        span.set_attribute("kernelgate.gpu.request_share_ns", selected.share_ns)
    span.end(end_time=end_ns)


def resolve_activities(config: KernelTraceConfig) -> Activities:
    if config.activities != "auto":
        return config.activities
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_capture(config: KernelTraceConfig) -> Capture:
    """The capture ``kernels.capture`` names; ``auto``: CUPTI directly when recording CUDA
    activities and ``cupti-python`` is installed (the ``gpu`` extra), else torch's profiler."""
    activities = resolve_activities(config)
    backend = config.capture
    if backend == "auto":
        backend = "cupti" if activities == "cuda" and importlib.util.find_spec("cupti") is not None else "torch"
    if backend == "torch":
        return TorchProfilerCapture(activities)
    if activities != "cuda":
        raise ValueError(f"kernels.capture: cupti records CUDA kernels, and activities resolved to {activities!r} "
                         "(no CUDA device?); use capture: auto or torch")
    if importlib.util.find_spec("cupti") is None:
        raise ValueError("kernels.capture: cupti needs NVIDIA's cupti-python (pip install 'kernelgate[gpu]')")
    from cupti import cupti
    from torch._C import _demangle

    return CuptiCapture(cupti, demangle=_demangle)
