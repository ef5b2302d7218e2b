"""The engine's final count for a request (``RequestStream.spent``), which the usage report to the
sidecar is made of: an ``n`` > 1 request prefills its prompt once and adds up what every sequence
generated; the count is complete only when every sequence has been let go."""

from __future__ import annotations

import uuid

from inference.generation import GenerationRequest, SamplingParams
from tests.inference.helpers import started_engine, tiny_config

PROMPT = tuple(range(5, 17))


async def _run(engine, params: SamplingParams):
    stream = engine.submit(GenerationRequest(request_id=uuid.uuid4().hex, prompt_token_ids=PROMPT, params=params))
    generated: dict[int, int] = {}
    async for output in stream:
        generated[output.index] = output.completion_tokens
    return generated, await stream.spent(30)


async def test_n_sequences_count_the_shared_prefill_once_and_every_generated_token():
    engine = started_engine(tiny_config())
    try:
        generated, spent = await _run(engine, SamplingParams(max_tokens=6, temperature=1.0, seed=3, n=3))
        assert sorted(generated) == [0, 1, 2]
        assert spent is not None
        assert spent.prompt_tokens == len(PROMPT)
        assert spent.completion_tokens == sum(generated.values()) > 0

        generated, spent = await _run(engine, SamplingParams(max_tokens=4, temperature=0.0))
        assert spent is not None
        assert (spent.prompt_tokens, spent.completion_tokens) == (len(PROMPT), generated[0])
    finally:
        engine.shutdown(10)
