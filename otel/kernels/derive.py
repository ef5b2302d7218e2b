"""Derived kernel spans: a decode graph's kernels recorded once, later replays placed from them.

A decode step replays one of the runner's captured CUDA graphs, and a graph replays the same
kernels in the same order every time. So the kernels of one recorded replay per graph key are
kept as a :class:`ReplayTemplate` (offsets from the replay's start mark, durations), and a later
replay of that graph, timed by the runner with two CUDA events (no profiler, no sync on the engine
thread), gets its kernel events placed from the template: offsets and durations scaled by the
measured replay time over the recorded one, anchored at the replay's start mark.

In: a recorded pass's :class:`~otel.kernels.plan.KernelEvent` records and clock anchor, with the
runner's timing of its replay (``inference.runner.DecodeTiming``: start mark on the wall clock,
elapsed); later, another replay's timing. Out: a :class:`ReplayTemplate`, then per derived replay
the :class:`~otel.kernels.plan.KernelEvent` list on the wall clock (fed to ``plan_kernel_spans``
with an identity anchor, so folding, caps and clamping into the parent are the same as for
recorded passes). Pure: no torch, no CUPTI, no OpenTelemetry.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from otel.kernels.plan import ClockAnchor, KernelEvent


@dataclass(frozen=True)
class TemplateKernel:
    """One kernel of the recorded replay, relative to that replay's first kernel."""

    name: str
    offset_ns: int
    duration_ns: int
    device: int = 0
    stream: int = 0


@dataclass(frozen=True)
class ReplayTemplate:
    """The kernels of one recorded replay of a graph (``key``), in launch order.

    ``lead_ns``: from the replay's start mark to its first kernel; ``replay_ns``: the recorded
    replay's measured duration (start mark to end mark), the unit later replays are scaled by.
    ``step_index`` and ``source`` (the recorded ``gpu.forward``'s span context, if one was
    exported) say where the kernels were recorded; ``recorded_at_s`` when (monotonic clock).
    """

    key: tuple[int, ...]
    kernels: tuple[TemplateKernel, ...]
    lead_ns: int
    replay_ns: int
    step_index: int
    recorded_at_s: float
    source: Any = None


def replay_events(events: Sequence[KernelEvent], anchor: ClockAnchor, wall_start_ns: int,
                  replay_ns: int) -> list[KernelEvent]:
    """The kernels of the one graph replay in a recorded pass's ``events``.

    CUPTI tags a kernel launched by a graph with the graph's id: the replay's kernels are those of
    the most frequent id (the pass's other kernels, sampling, were launched one by one). Without
    graph ids (the CPU recorder: an eager decode's operators) they are the events that start inside
    the timed interval (``wall_start_ns`` .. ``+ replay_ns``, on the wall clock).
    """
    graph_ids = Counter(e.graph_id for e in events if e.graph_id)
    if graph_ids:
        graph = graph_ids.most_common(1)[0][0]
        return [e for e in events if e.graph_id == graph]
    lo, hi = wall_start_ns - anchor.uncertainty_ns, wall_start_ns + replay_ns + anchor.uncertainty_ns
    return [e for e in events if lo <= anchor.to_wall(e.start_ns) <= hi]


def build_template(events: Sequence[KernelEvent], anchor: ClockAnchor, key: tuple[int, ...], wall_start_ns: int,
                   replay_ns: int, step_index: int, recorded_at_s: float, source: Any = None) -> ReplayTemplate | None:
    """A template from a recorded pass whose replay the runner timed; None when no kernel of the
    replay is in the record (nothing to derive from)."""
    kernels = replay_events(events, anchor, wall_start_ns, replay_ns)
    if not kernels or replay_ns <= 0:
        return None
    mapped = sorted(((anchor.to_wall(e.start_ns), anchor.to_wall(max(e.end_ns, e.start_ns)), e) for e in kernels),
                    key=lambda m: m[0])
    first = mapped[0][0]
    return ReplayTemplate(
        key=key, kernels=tuple(TemplateKernel(e.name, start - first, end - start, e.device, e.stream)
                               for start, end, e in mapped),
        lead_ns=max(0, first - wall_start_ns), replay_ns=replay_ns, step_index=step_index,
        recorded_at_s=recorded_at_s, source=source)


def place(template: ReplayTemplate, wall_start_ns: int, replay_ns: int) -> list[KernelEvent]:
    """The template's kernels for a replay that started at ``wall_start_ns`` and took ``replay_ns``:
    offsets, durations and the lead scaled by ``replay_ns / template.replay_ns``, nothing past the
    replay's end mark."""
    scale = replay_ns / template.replay_ns
    base = wall_start_ns + round(template.lead_ns * scale)
    limit = wall_start_ns + replay_ns
    out = []
    for k in template.kernels:
        start = min(base + round(k.offset_ns * scale), limit)
        end = min(start + round(k.duration_ns * scale), limit)
        out.append(KernelEvent(k.name, start, end, k.device, k.stream))
    return out


def is_fresh(template: ReplayTemplate | None, now_s: float, refresh_s: float) -> bool:
    """Whether a template may still be derived from (``refresh_s`` <= 0: for ever)."""
    return template is not None and (refresh_s <= 0 or now_s - template.recorded_at_s < refresh_s)
