"""Head sampling: parent-based trace-id ratio, and thinning of the engine's per-step spans.

The inference engine starts an ``engine.step`` span for every forward pass (hundreds a second
under load, each linked to every request in its batch). Recording all of them costs more than
the rest of the tracing together (docs/tracing.md, bench/results/tracing_gpu_sequential_torch.json),
so within a sampled trace only prefill steps and every ``decode_every``-th decode step are kept. The
choice is by step index, so one step is kept or dropped for all of its requests alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes

from otel.names import STEP_INDEX, STEP_PHASE, STEP_SPAN


def step_kept(phase: object, index: object, decode_every: int) -> bool:
    """Whether an ``engine.step`` span of ``phase`` and ``index`` survives thinning: prefill steps
    and every ``decode_every``-th decode step (the one rule; ``inference.tracing.Tracing`` applies it
    before building a step span, the sampler below to whatever reaches it)."""
    return decode_every <= 1 or phase != "decode" or not isinstance(index, int) or index % decode_every == 0


class StepThinningSampler(Sampler):
    """Drops decode ``engine.step`` spans whose index is not a multiple of ``decode_every``;
    everything else is decided by ``delegate``."""

    def __init__(self, delegate: Sampler, decode_every: int) -> None:
        self._delegate = delegate
        self._every = max(1, decode_every)

    def should_sample(self, parent_context: Context | None, trace_id: int, name: str,
                      kind: SpanKind | None = None, attributes: Attributes = None,
                      links: Sequence[Link] | None = None, trace_state=None) -> SamplingResult:
        if name == STEP_SPAN and attributes and not step_kept(attributes.get(STEP_PHASE), attributes.get(STEP_INDEX),
                                                              self._every):
            return SamplingResult(Decision.DROP)
        return self._delegate.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"StepThinningSampler(decode_every={self._every}, {self._delegate.get_description()})"
