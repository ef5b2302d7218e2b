"""The engine against Hugging Face ``generate``, and continuous batching against one-at-a-time runs."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
import torch

from inference.config import BatchingConfig
from inference.model_loader import load_model
from tests.inference.helpers import TINY, SlowSteps, generate, started_engine, tiny_config

PROMPTS = [
    [72, 101, 108, 108, 111],            # "Hello"
    [7],
    list(range(40, 140)),
    [200, 13, 55, 1, 99, 254, 3, 17, 88],
    list(range(250, 10, -3)),
]


def hf_greedy(model_name: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Reference tokens from transformers' own generate() on the same seeded weights."""
    loaded = load_model(replace(TINY, name=model_name, random_config=model_name, decoder="hf"))
    module = loaded.module
    module.config._attn_implementation = "sdpa"
    with torch.inference_mode():
        out = module.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-opt", "tiny-llama"])
async def test_greedy_matches_hf_generate(model_name: str) -> None:
    config = tiny_config(model=replace(TINY, name=model_name, random_config=model_name))
    engine = started_engine(config)
    try:
        results = await asyncio.gather(*(generate(engine, p, 24) for p in PROMPTS))
    finally:
        engine.shutdown(10)
    for prompt, result in zip(PROMPTS, results):
        assert result.token_ids == hf_greedy(model_name, prompt, 24), f"prompt {prompt[:8]}..."


async def test_batched_equals_one_at_a_time(shared_engine) -> None:
    lengths = [5, 24, 9, 31, 2, 17, 12, 28]
    prompts = [PROMPTS[i % len(PROMPTS)][: 3 + 7 * i] for i in range(len(lengths))]
    alone = [await generate(shared_engine, p, n) for p, n in zip(prompts, lengths)]
    # All at once, and staggered so requests join and leave a running batch mid-flight.
    together = await asyncio.gather(*(generate(shared_engine, p, n) for p, n in zip(prompts, lengths)))
    staggered = await asyncio.gather(*(generate(shared_engine, p, n, delay_s=0.004 * i)
                                       for i, (p, n) in enumerate(zip(prompts, lengths))))
    for a, t, s, n in zip(alone, together, staggered, lengths):
        assert len(a.token_ids) == n or a.finish_reason == "stop"
        assert t.token_ids == a.token_ids
        assert s.token_ids == a.token_ids


async def test_more_requests_than_slots_all_complete_identically() -> None:
    engine = started_engine(tiny_config(batching=BatchingConfig(max_batch_size=3, max_wait_ms=0.0, max_queue=32)))
    try:
        prompts = [PROMPTS[i % len(PROMPTS)][: 2 + i] for i in range(10)]
        alone = [await generate(engine, p, 6 + i) for i, p in enumerate(prompts)]
        together = await asyncio.gather(*(generate(engine, p, 6 + i) for i, p in enumerate(prompts)))
    finally:
        engine.shutdown(10)
    assert [t.token_ids for t in together] == [a.token_ids for a in alone]


async def test_seeded_sampling_is_reproducible_and_batch_independent(shared_engine) -> None:
    prompt = PROMPTS[0]
    first = await generate(shared_engine, prompt, 20, temperature=0.9, seed=1234)
    again = await generate(shared_engine, prompt, 20, temperature=0.9, seed=1234)
    crowd = await asyncio.gather(generate(shared_engine, prompt, 20, temperature=0.9, seed=1234),
                                 *(generate(shared_engine, p, 15, temperature=1.0) for p in PROMPTS))
    other = await generate(shared_engine, prompt, 20, temperature=0.9, seed=99)
    assert first.token_ids == again.token_ids == crowd[0].token_ids
    assert other.token_ids != first.token_ids


async def test_stop_string_cuts_text_and_frees_slot(shared_engine) -> None:
    # The random weights decide what text comes out: take the first prompt whose output has a
    # two-character stop string first seen after its start (whole characters, no U+FFFD).
    for prompt in PROMPTS:
        text = (await generate(shared_engine, prompt, 40)).text
        stops = [text[i:i + 2] for i in range(1, len(text) - 2)
                 if "\ufffd" not in text[i:i + 2] and text.index(text[i:i + 2]) > 0]
        if stops:
            break
    assert stops, "no prompt's output has a usable stop string"
    stop = stops[0]
    cut = await generate(shared_engine, prompt, 40, stop=(stop,))
    assert cut.finish_reason == "stop"
    assert cut.text == text[:text.index(stop)]
    assert stop not in cut.text
    assert shared_engine.stats().running == 0


async def test_forward_observer_sees_every_step() -> None:
    observer = SlowSteps()
    engine = started_engine(tiny_config(), observer=observer)
    try:
        await asyncio.gather(generate(engine, PROMPTS[0], 5), generate(engine, PROMPTS[1], 3))
    finally:
        engine.shutdown(10)
    phases = [step.phase for step in observer.started]
    assert phases[0] == "prefill" and "decode" in phases
    assert [s.index for s, _ in observer.finished] == [s.index for s in observer.started]
    assert max(s.batch_size for s in observer.started) == 2


async def test_slow_steps_are_kept_with_their_time_phase_and_batch() -> None:
    """A step of 20 ms or more (here: an observer that makes each take 30 ms) is in ``slow_steps``
    (the admin status shows them: where a hot swap stalled the serving version)."""
    slow = started_engine(tiny_config(), observer=SlowSteps(delay_s=0.03))
    try:
        before = time.time()
        await generate(slow, PROMPTS[0], 3)
    finally:
        slow.shutdown(10)
    steps = slow.slow_steps()
    assert [phase for _, _, _, phase, _ in steps][:2] == ["prefill", "decode"] and len(steps) == 3
    assert all(before <= at <= time.time() and took >= 30 and gap >= 0 and batch == 1
               for at, took, gap, _, batch in steps)
