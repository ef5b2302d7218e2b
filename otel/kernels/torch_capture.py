"""CUDA kernels (or CPU operators) of one forward pass recorded by torch's profiler (Kineto).

In: ``start``/``stop`` on the engine thread around one pass. Out: the profiler's result, parsed
on the worker thread by ``events`` into kernel records and a clock anchor. The recorder without
``cupti-python`` on a GPU, and the only one for CPU operators (CPU serving, tests).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from otel.kernels.capture import ANCHOR_READINGS, YIELD_EVERY_EVENTS, Activities, RawCapture, yield_gil
from otel.kernels.plan import ClockAnchor, KernelEvent

ANCHOR_NAME = "kernelgate.clock_anchor"
# torch.cuda._sleep(0) launches this empty kernel: its launch call is the clock marker of a cuda capture.
ANCHOR_KERNEL = "spin_kernel"
# After a capture, Kineto detaches CUPTI asynchronously (at a later CUDA call of any thread); a
# capture started before that is done records no kernels and leaves CUPTI attached. Measured:
# bench/results/cupti_after_capture.json.
TEARDOWN_GAP_S = 0.1


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
    # Preparing the profiler ahead on another thread was measured and rejected (docs/tracing.md).
    prepares_ahead = False

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

    def prepare(self) -> None:
        """Nothing to do ahead: the profiler attaches in ``start``."""

    def release(self) -> None:
        """Nothing to undo: ``prepare`` does nothing."""

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
                yield_gil()
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
