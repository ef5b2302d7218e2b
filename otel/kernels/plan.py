"""What one captured forward pass becomes: kernel records mapped onto the wall clock, folded, capped.

In: :class:`KernelEvent` records on a recorder's clock, a :class:`ClockAnchor` read at capture start,
and the parent span's window. Out: a :class:`KernelPlan` of :class:`KernelSpan` to export. Pure
functions over plain data: no torch, no CUPTI, no OpenTelemetry; tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

@dataclass(frozen=True)
class KernelEvent:
    """One device activity (or CPU operator) as the profiler reported it, on the profiler's clock."""

    name: str
    start_ns: int
    end_ns: int
    device: int = 0
    stream: int = 0
    graph_id: int = 0  # the CUDA graph that launched it (CUPTI), 0: launched on its own


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
    contexts: Sequence[Any] = getattr(step, "trace_contexts", ()) or ()
    tokens: Sequence[int] = getattr(step, "tokens_per_sequence", ()) or ()
    if len(tokens) != len(contexts):
        tokens = [1] * len(contexts)
    shares = gpu_shares(total_ns, tokens)
    return sum(share for ctx, share in zip(contexts, shares) if ctx is not None and ctx.span_id == span_id)
