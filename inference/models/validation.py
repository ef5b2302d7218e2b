"""Is a newly loaded version fit to serve? A probe generation, then a shadow run against the active one.

In: the candidate engine, the active engine (or None), recent live prompts (token ids) and the
``ValidationConfig``. Out: a :class:`ValidationResult` (ok, the reason when not, the numbers).
The probe asks for ``probe_tokens`` tokens and must get them without an error. The shadow run
sends the most recent ``shadow_samples`` prompts greedily (``shadow_tokens`` tokens, EOS
ignored), one at a time, to the active version and then to the candidate, and compares: the share
of prompts with identical outputs must reach ``min_agreement``, and the candidate's summed
latency may be at most ``max_latency_ratio`` x the active one's (not counting the time the
candidate's steps yielded to serving versions, ``inference.pacing``). Prompts the candidate's vocabulary
cannot take (another tokenizer) are skipped, and the result says how many.

The active version serves live traffic meanwhile, so its shadow prompts are spaced: each one starts
after a pause as long as the previous one took, and at least :data:`ACTIVE_GAP_S`, so a live
request shares its steps with at most one shadow prefill. Sent all at once, 8 prompts were one
prefill step of 76 ms on the H200 that every live request in flight waited for (p99 during the
swap 2.6x before, ``bench/results/hot_swap_gpu.json``'s earlier run).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from inference.config import ValidationConfig
from inference.generation import GenerationRequest, SamplingParams

# The least time between two shadow prompts sent to the active (serving) version.
ACTIVE_GAP_S = 0.05


@dataclass(frozen=True)
class ValidationResult:
    ok: bool
    reason: str | None
    probe_ms: float
    shadow_prompts: int = 0
    shadow_skipped: int = 0
    agreement: float | None = None
    latency_ratio: float | None = None

    def describe(self) -> dict[str, Any]:
        return {"ok": self.ok, "reason": self.reason, "probe_ms": round(self.probe_ms, 2),
                "shadow_prompts": self.shadow_prompts, "shadow_skipped": self.shadow_skipped,
                "agreement": self.agreement, "latency_ratio": self.latency_ratio}


async def _run(engine: Any, prompt: tuple[int, ...], max_tokens: int) -> tuple[list[int], float]:
    """Greedy generation of ``max_tokens`` tokens; (token ids, seconds)."""
    started = time.monotonic()
    stream = engine.submit(GenerationRequest(
        request_id=f"validate-{uuid.uuid4().hex}", prompt_token_ids=prompt,
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)))
    tokens: list[int] = []
    try:
        async for output in stream:
            tokens.extend(output.token_ids)
    finally:
        stream.cancel()
    return tokens, time.monotonic() - started


async def _run_each(engine: Any, prompts: list[tuple[int, ...]], max_tokens: int,
                    gap_s: float = 0.0) -> list[tuple[list[int], float]]:
    """:func:`_run` for each prompt in turn, the next one after a pause as long as the last one took
    and at least ``gap_s`` (none when 0). A run's seconds leave out the time the engine's steps
    yielded to serving versions (``paused_s`` of a paced engine, ``inference.pacing``): not its own
    latency."""
    runs: list[tuple[list[int], float]] = []
    for prompt in prompts:
        if runs and gap_s > 0:
            await asyncio.sleep(max(gap_s, runs[-1][1]))
        paused = getattr(engine, "paused_s", 0.0)
        tokens, seconds = await _run(engine, prompt, max_tokens)
        runs.append((tokens, max(seconds - (getattr(engine, "paused_s", 0.0) - paused), 0.0)))
    return runs


def _probe_prompt(engine: Any) -> tuple[int, ...]:
    tokenizer = getattr(engine.info, "tokenizer", None)
    try:
        ids = tuple(tokenizer.encode("Hello, how are you?"))
    except Exception:  # noqa: BLE001 - any tokenizer trouble: fall back to fixed ids
        ids = ()
    return ids or (1, 2, 3, 4)


async def validate(candidate: Any, active: Any | None, recent: list[tuple[int, ...]],
                   config: ValidationConfig) -> ValidationResult:
    try:
        tokens, probe_s = await _run(candidate, _probe_prompt(candidate), config.probe_tokens)
    except Exception as exc:  # noqa: BLE001 - the reason of the failure
        return ValidationResult(False, f"probe generation failed: {exc}", 0.0)
    if len(tokens) != config.probe_tokens:
        return ValidationResult(False, f"probe generation gave {len(tokens)} tokens, wanted {config.probe_tokens}",
                                probe_s * 1e3)
    samples = recent[-config.shadow_samples:] if config.shadow_samples else []
    if active is None or not samples or not active.ready:
        return ValidationResult(True, None, probe_s * 1e3)
    vocab = candidate.info.vocab_size
    usable = [p for p in samples if p and max(p) < vocab]
    if not usable:
        return ValidationResult(True, None, probe_s * 1e3, shadow_skipped=len(samples))
    try:
        wants = await _run_each(active, usable, config.shadow_tokens, gap_s=ACTIVE_GAP_S)
        gots = await _run_each(candidate, usable, config.shadow_tokens)
    except Exception as exc:  # noqa: BLE001
        return ValidationResult(False, f"shadow run failed: {exc}", probe_s * 1e3)
    agree = sum(got == want for (got, _), (want, _) in zip(gots, wants))
    active_s = sum(seconds for _, seconds in wants)
    candidate_s = sum(seconds for _, seconds in gots)
    agreement = agree / len(usable)
    ratio = candidate_s / active_s if active_s > 0 else 1.0
    result = dict(probe_ms=probe_s * 1e3, shadow_prompts=len(usable), shadow_skipped=len(samples) - len(usable),
                  agreement=round(agreement, 4), latency_ratio=round(ratio, 3))
    if agreement < config.min_agreement:
        return ValidationResult(False, f"shadow run: outputs agree on {agreement:.0%} of {len(usable)} recent "
                                f"prompts, below validation.min_agreement {config.min_agreement:.0%}", **result)
    if ratio > config.max_latency_ratio:
        return ValidationResult(False, f"shadow run: latency {ratio:.2f}x the active version's, above "
                                f"validation.max_latency_ratio {config.max_latency_ratio:g}", **result)
    return ValidationResult(True, None, **result)
