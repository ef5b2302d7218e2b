"""The shadow run of a new version (inference/models/validation.py) against engines that record
what they were sent: the active version takes the shadow prompts one at a time, spaced, and the
candidate's paced time is not counted as its latency."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from inference.config import ValidationConfig
from inference.models import validation


@dataclass
class _Output:
    token_ids: list[int]


class _Stream:
    def __init__(self, engine: "RecordingEngine", prompt: tuple[int, ...], max_tokens: int) -> None:
        self._engine, self._prompt, self._max_tokens = engine, prompt, max_tokens

    def __aiter__(self):
        return self._outputs()

    async def _outputs(self):
        engine = self._engine
        engine.in_flight += 1
        engine.most_in_flight = max(engine.most_in_flight, engine.in_flight)
        started = time.monotonic()
        try:
            await asyncio.sleep(engine.step_s)
            engine.paused_s += engine.pause_per_run_s  # a paced engine yielded this long inside the run
            yield _Output([(sum(self._prompt) + i + engine.offset) % 97 for i in range(self._max_tokens)])
        finally:
            engine.in_flight -= 1
            engine.runs.append((started, time.monotonic()))

    def cancel(self) -> None:
        pass


@dataclass
class RecordingEngine:
    step_s: float = 0.01
    offset: int = 0
    pause_per_run_s: float = 0.0
    ready: bool = True
    paused_s: float = 0.0
    in_flight: int = 0
    most_in_flight: int = 0
    runs: list[tuple[float, float]] = field(default_factory=list)
    info: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(vocab_size=1000, tokenizer=None))

    def submit(self, request):
        return _Stream(self, request.prompt_token_ids, request.params.max_tokens)


def _config(**kw) -> ValidationConfig:
    return ValidationConfig(**{"probe_tokens": 2, "shadow_samples": 4, "shadow_tokens": 3, **kw})


async def test_the_active_version_takes_the_shadow_prompts_one_at_a_time_spaced_apart() -> None:
    active, candidate = RecordingEngine(), RecordingEngine()
    prompts = [(1, 2), (3, 4), (5, 6), (7, 8)]
    result = await validation.validate(candidate, active, prompts, _config())
    assert result.ok and result.shadow_prompts == 4 and result.agreement == 1.0
    assert len(active.runs) == 4 and active.most_in_flight == 1
    for (_, ended), (started, _) in zip(active.runs, active.runs[1:]):
        # asyncio's timer may fire up to one clock tick early; the gap is 50 ms
        assert started - ended >= validation.ACTIVE_GAP_S * 0.9, (started - ended)


async def test_the_candidates_paced_time_is_not_its_latency() -> None:
    # Each candidate run takes 10 ms of its own and yields 1 s to serving versions: without leaving
    # the pauses out its latency would be ~100x the active one's and fail max_latency_ratio.
    active, candidate = RecordingEngine(), RecordingEngine(pause_per_run_s=1.0)
    result = await validation.validate(candidate, active, [(1, 2), (3, 4)], _config(max_latency_ratio=3.0))
    assert result.ok, result.reason
    assert result.latency_ratio is not None and result.latency_ratio < 3.0
    assert candidate.most_in_flight == 1  # the candidate too: one at a time, like the active version


async def test_outputs_that_differ_fail_the_shadow_run_with_the_reason() -> None:
    active, candidate = RecordingEngine(), RecordingEngine(offset=1)
    result = await validation.validate(candidate, active, [(1, 2), (3, 4)], _config(min_agreement=0.5))
    assert not result.ok and result.agreement == 0.0
    assert "min_agreement" in result.reason
