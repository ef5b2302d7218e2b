"""Spans built off a hot thread: the hot thread hands over an immutable record, a thread of ours
turns it into a span.

In: ``DeferredSpans.submit(build, record)`` from the producing thread (the inference engine's):
``record`` is immutable (a tuple of ints, strings and span contexts), ``build(record)`` makes the
span through the OpenTelemetry API (explicit start and end times, links, attributes; the SDK's
sampler decides there) and returns its ``SpanContext`` (None when there is none). The producer
pays one object and one ``queue.SimpleQueue.put`` (C, no Python lock). Out: the spans, built in
submission order on the ``kernelgate-spans`` thread, and a :class:`PendingSpan` per record whose
``context()`` waits for that span's context (the kernel tracer's worker parents ``gpu.forward``
on it). ``flush()`` returns once everything submitted before it is built (before a tracer
provider shuts down).

The thread wakes every ``interval_s`` and builds what accumulated, handing the GIL back after
every ``hold_us`` of building: on a GPU server the engine thread mostly waits for the device with the
GIL released, so this work overlaps that wait instead of delaying the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.trace import SpanContext

log = logging.getLogger("kernelgate.otel.deferred")

# Longest the span thread keeps the GIL before handing it back (one engine.step span costs ~15 us
# of CPU here): what the engine thread may wait for it when its step's sync returns.
HOLD_US = 50
YIELD_S = 0.0002
# How long the thread sleeps between batches; spans wait in the exporter's batch for longer anyway.
INTERVAL_S = 0.01
# How long a waiter (the kernel tracer's worker) waits for a span context before going on without it.
RESOLVE_TIMEOUT_S = 5.0

_PENDING = object()
_STOP = object()


class PendingSpan:
    """A span handed to :class:`DeferredSpans`: ``context()`` is its SpanContext once it is built."""

    __slots__ = ("_owner", "_context")

    def __init__(self, owner: DeferredSpans) -> None:
        self._owner = owner
        self._context: Any = _PENDING

    @property
    def built(self) -> bool:
        return self._context is not _PENDING

    def context(self, timeout: float = RESOLVE_TIMEOUT_S) -> SpanContext | None:
        """The span's context (None: no valid span, or not built within ``timeout`` seconds)."""
        if self._context is _PENDING:
            self._owner.wait_built(self, timeout)
        return None if self._context is _PENDING else self._context


def resolve(span: PendingSpan | SpanContext | None, timeout: float = RESOLVE_TIMEOUT_S) -> SpanContext | None:
    """The SpanContext behind what a forward observer was given (a pending span or a context)."""
    return span.context(timeout) if isinstance(span, PendingSpan) else span


class DeferredSpans:
    """One thread that builds the spans submitted to it, in order."""

    def __init__(self, name: str = "kernelgate-spans", interval_s: float = INTERVAL_S,
                 hold_us: int = HOLD_US) -> None:
        self._name = name
        self._interval_s = interval_s
        self._hold_ns = hold_us * 1000
        self._queue: queue.SimpleQueue[tuple[Any, Any, Any]] = queue.SimpleQueue()
        self._built = threading.Condition()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.failures = 0

    def submit(self, build: Callable[[Any], SpanContext | None], record: Any) -> PendingSpan:
        """Queue ``build(record)`` for the span thread; never blocks, never raises for the span."""
        pending = PendingSpan(self)
        if self._thread is None:
            self._start()
        self._queue.put((build, record, pending))
        return pending

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every span submitted before this call is built (True) or ``timeout`` passes."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put((None, done, None))
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Build what is queued, then stop the thread (a later ``submit`` starts a new one)."""
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put((_STOP, None, None))
            thread.join(timeout)

    def wait_built(self, pending: PendingSpan, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._built:
            while not pending.built:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._built.wait(left)

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = False
            held = time.perf_counter_ns()
            for build, record, pending in batch:
                if build is None:  # a flush marker: everything before it is built
                    with self._built:
                        self._built.notify_all()
                    record.set()
                    continue
                if build is _STOP:
                    stop = True
                    continue
                try:
                    pending._context = build(record)
                except Exception:  # noqa: BLE001 - a span lost, never the thread
                    self.failures += 1
                    pending._context = None
                    log.exception("span not built")
                if time.perf_counter_ns() - held > self._hold_ns:
                    time.sleep(YIELD_S)  # let the engine thread have the GIL back
                    held = time.perf_counter_ns()
            with self._built:
                self._built.notify_all()
            if stop:
                return
            time.sleep(self._interval_s)
