"""The interface between the kernel tracer and whatever records a forward pass's kernels.

In: nothing but the engine thread's calls (``start`` before a pass, ``stop`` after it).
Out: a :class:`RawCapture` (unparsed, cheap to take on the engine thread), which the worker
thread turns into :class:`~otel.kernels.plan.KernelEvent` records and a clock anchor with
``events``. The recorders, one file each: ``cupti_capture.py`` (CUPTI's Activity API through
cupti-python) and ``torch_capture.py`` (torch's profiler); ``factory.py`` picks one from the config.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from otel.kernels.plan import ClockAnchor, KernelEvent

Activities = Literal["cuda", "cpu"]

# Clock-anchor markers read at each capture start; the tightest pair wins (ClockAnchor.pick).
ANCHOR_READINGS = 3
# The worker thread hands the GIL back this often (profile events, spans): a thread busy in Python
# otherwise keeps it for the switch interval (5 ms) each time the engine thread asks for it back,
# and an eager forward pass asks at every operator.
YIELD_EVERY_EVENTS = 256
YIELD_EVERY_SPANS = 16
YIELD_S = 0.0002


def yield_gil() -> None:
    """Let the engine thread run (see YIELD_EVERY_EVENTS)."""
    time.sleep(YIELD_S)


@dataclass
class RawCapture:
    """What the engine thread hands to the worker: the profiler's result, unparsed."""

    result: Any
    readings: list[tuple[int, int]]  # wall clock before/after each anchor marker


class Capture(Protocol):
    """Records one forward pass at a time; ``name`` and ``activities`` go on the ``gpu.forward`` span.

    ``start``, ``stop`` and ``release`` run on the engine thread; ``prepare`` (only called when
    ``prepares_ahead``) on a thread of the tracer's, to make ``ready`` true without the engine
    thread paying for it; ``events`` on the worker thread.
    """

    name: str
    activities: Activities
    prepares_ahead: bool

    def ready(self) -> bool: ...

    def prepare(self) -> None: ...

    def release(self) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> RawCapture: ...

    def events(self, raw: RawCapture) -> tuple[list[KernelEvent], ClockAnchor]: ...

