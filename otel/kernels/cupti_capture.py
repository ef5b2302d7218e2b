"""CUDA kernels of one forward pass recorded through CUPTI's Activity API (NVIDIA's ``cupti-python``).

In: ``start``/``stop`` on the engine thread around one pass; CUPTI's buffer callbacks. Out: the
pass's kernel records as plain tuples, demangled and anchored on the worker thread by ``events``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from otel.kernels.capture import ANCHOR_READINGS, YIELD_EVERY_EVENTS, Activities, RawCapture, yield_gil
from otel.kernels.plan import ClockAnchor, KernelEvent

log = logging.getLogger("kernelgate.otel.kernels.cupti")

class CuptiCapture:
    """CUDA kernels recorded through CUPTI's Activity API directly (NVIDIA's ``cupti-python``).

    Why not torch's profiler on a GPU: it costs the engine thread ~34 ms a captured pass on the
    H100 (Kineto re-attaching CUPTI, then processing its records with the GIL held); this
    cost ~21 ms there attaching at the pass; on an H200, ~44 ms even attaching ahead (below), all
    of it in the stop (docs/tracing.md, Cost). The records arrive as plain values.

    CUPTI attaches when the buffer callbacks are registered (~13-17 ms; after a ``finalize`` it
    has forgotten them, and a capture without them records nothing). With ``prepare_ahead``
    that happens in ``prepare``, on a thread of the tracer's own while the engine keeps serving
    (``cupti-python`` releases the GIL in its calls), and ``ready`` says when it is done; without,
    in ``start`` on the engine thread. Per captured pass, on the engine thread: ``start`` enables
    concurrent-kernel records and reads the clock anchor (``get_timestamp``, the clock of the
    kernel records, between two wall-clock readings); ``stop`` disables them, flushes (the records
    come back through ``_buffer_completed`` on this thread, 1-3 ms) and detaches CUPTI with
    ``finalize`` (2-5 ms): left attached, CUPTI slowed every later CUDA graph replay 10-18 %, and
    ``finalize`` racing another thread's CUDA calls crashed Kineto (pytorch/kineto#686), so it
    stays on the engine thread, between two passes (left to the preparing thread, it crashed the
    engine on the H200 with "unspecified launch failure": bench/results/tracing_gpu_h200_run2.log).
    ``release`` detaches an attached CUPTI that
    no capture followed (the request ended first), on the engine thread too. Demangling and
    everything after run on the worker (``events``).

    ``cupti`` is the ``cupti.cupti`` module (a fake in tests); ``demangle`` turns a kernel's
    mangled name into the C++ signature (torch's ``_demangle``).
    """

    name = "cupti"
    activities: Activities = "cuda"
    # CUPTI asks for activity buffers as it needs them; one pass of GPT-2 medium filled ~120 KB.
    BUFFER_BYTES = 8 << 20

    def __init__(self, cupti: Any, demangle: Callable[[str], str] = lambda name: name,
                 clock: Callable[[], int] = time.time_ns, prepare_ahead: bool = False) -> None:
        self._cupti = cupti
        self._kind = cupti.ActivityKind.CONCURRENT_KERNEL
        self._demangle = demangle
        self._clock = clock
        self.prepares_ahead = prepare_ahead
        self._lock = threading.Lock()  # CUPTI may hand a full buffer back on a thread of its own
        # Held while CUPTI attaches or detaches: the preparing thread and the engine thread.
        self._attach_lock = threading.Lock()
        self._attached = False
        # Where the engine thread's time goes, summed over captures (ns), for logs and the benchmark.
        self.timings = dict.fromkeys(("captures", "register_ns", "enable_ns", "disable_ns", "flush_ns",
                                      "callback_ns", "finalize_ns"), 0)
        self._records: list[tuple[str, int, int, int, int, int]] = []
        self._readings: list[tuple[int, int]] = []
        self._markers: list[tuple[int, int]] = []

    def ready(self) -> bool:
        """Whether ``start`` may run now: always when attaching inline, else once ``prepare`` is done."""
        return self._attached or not self.prepares_ahead

    def prepare(self) -> None:
        """Attach CUPTI ahead of a capture (not on the engine thread); a no-op when attached."""
        with self._attach_lock:
            if self._attached:
                return
            try:
                self._cupti.activity_register_callbacks(self._buffer_requested, self._buffer_completed)
            except Exception:
                self._detach()
                raise
            self._attached = True

    def release(self) -> None:
        """Detach a CUPTI that ``prepare`` attached and no capture used (engine thread)."""
        if self._attached and self._attach_lock.acquire(blocking=False):
            try:
                if self._attached:
                    self._attached = False
                    self._detach()
            finally:
                self._attach_lock.release()

    def start(self) -> None:
        cupti = self._cupti
        timings, clock = self.timings, time.perf_counter_ns
        try:
            if not self._attached:
                began = clock()
                cupti.activity_register_callbacks(self._buffer_requested, self._buffer_completed)
                self._attached = True
                timings["register_ns"] += clock() - began
            began = clock()
            cupti.activity_enable(self._kind)
            timings["enable_ns"] += clock() - began
        except Exception:
            self._attached = False
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
        timings, clock = self.timings, time.perf_counter_ns
        with self._attach_lock:
            began = flushed = clock()
            try:
                self._cupti.activity_disable(self._kind)
                disabled = clock()
                timings["disable_ns"] += disabled - began
                self._cupti.activity_flush_all(1)  # CUPTI_ACTIVITY_FLAG_FLUSH_FORCED: incomplete buffers too
                flushed = clock()
                timings["flush_ns"] += flushed - disabled
            finally:
                self._attached = False
                self._detach()
                timings["finalize_ns"] += clock() - flushed
                timings["captures"] += 1
        with self._lock:
            records, self._records = self._records, []
        readings, self._readings = self._readings, []
        markers, self._markers = self._markers, []
        return RawCapture((records, markers), readings)

    def events(self, raw: RawCapture) -> tuple[list[KernelEvent], ClockAnchor]:
        records, markers = raw.result
        names: dict[str, str] = {}
        out: list[KernelEvent] = []
        for i, (name, start, end, device, stream, graph) in enumerate(records):
            if i % YIELD_EVERY_EVENTS == YIELD_EVERY_EVENTS - 1:
                yield_gil()
            readable = names.get(name)
            if readable is None:
                readable = names[name] = self._demangle(name)
            out.append(KernelEvent(readable, start, end, device, stream, graph))
        return out, ClockAnchor.pick(markers, raw.readings)

    def _detach(self) -> None:
        try:
            self._cupti.finalize()
        except Exception:  # noqa: BLE001 - the capture's own error (if any) is the one to report
            log.exception("could not detach CUPTI")

    def _buffer_requested(self) -> tuple[int, int]:
        return self.BUFFER_BYTES, 0  # size, max records (0: as many as fit)

    def _buffer_completed(self, activities: Sequence[Any]) -> None:
        began = time.perf_counter_ns()
        # Copied out here: the record objects may point into the buffer CUPTI reuses after this returns.
        kernels = [(a.name, a.start, a.end, a.device_id, a.stream_id, getattr(a, "graph_id", 0) or 0)
                   for a in activities if a.kind == self._kind]
        with self._lock:
            self._records.extend(kernels)
            self.timings["callback_ns"] += time.perf_counter_ns() - began
