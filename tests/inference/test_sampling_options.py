"""The #20 sampling options on the engine, against references computed with plain PyTorch.

Log-probabilities, prompt log-probabilities (echo), presence/frequency penalties and
logit_bias are checked token by token against a loop over the Hugging Face module's own
forward pass on the same seeded weights (fp32, CPU); ``n`` against ``n`` single requests and
the one prefill it must cost; mixed settings in one batch against each request run alone;
JSON schema output against the schema.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field

import jsonschema
import pytest
import torch

from inference.generation import GenerationRequest, SamplingParams
from inference.model_loader import load_model
from tests.inference.helpers import TINY, SlowSteps, started_engine, tiny_config

PROMPT = [72, 101, 108, 108, 111, 44, 32]  # "Hello, "
TOL = 1e-4


@dataclass
class Run:
    tokens: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list] = field(default_factory=dict)
    prompt_logprobs: tuple | None = None
    text: dict[int, str] = field(default_factory=dict)
    reasons: dict[int, str | None] = field(default_factory=dict)
    completion_tokens: int = 0


async def run(engine, prompt: list[int], **params) -> Run:
    stream = engine.submit(GenerationRequest(request_id=uuid.uuid4().hex, prompt_token_ids=tuple(prompt),
                                             params=SamplingParams(**params)))
    out = Run()
    async for o in stream:
        out.tokens.setdefault(o.index, []).extend(o.token_ids)
        out.text[o.index] = out.text.get(o.index, "") + o.text
        if o.logprobs is not None:
            out.logprobs.setdefault(o.index, []).extend(o.logprobs)
        if o.prompt_logprobs is not None:
            out.prompt_logprobs = o.prompt_logprobs
        if o.finished:
            out.reasons[o.index] = o.finish_reason
            out.completion_tokens += o.completion_tokens
    return out


@pytest.fixture(scope="module")
def module() -> torch.nn.Module:
    loaded = load_model(TINY)
    loaded.module.config._attn_implementation = "sdpa"
    return loaded.module


def model_logprobs(module: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Plain PyTorch: log-softmax of the module's logits at every position of ``ids``."""
    with torch.inference_mode():
        logits = module(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
    return logits[0].float().log_softmax(dim=-1)


def reference_greedy(module: torch.nn.Module, prompt: list[int], steps: int, presence: float = 0.0,
                     frequency: float = 0.0, bias: dict[int, float] | None = None) -> list[int]:
    """OpenAI's penalties and logit_bias, then argmax, one full forward pass per token."""
    ids = list(prompt)
    counts = torch.zeros(module.config.vocab_size)
    for _ in range(steps):
        with torch.inference_mode():
            logits = module(input_ids=torch.tensor([ids])).logits[0, -1].float()
        logits = logits - frequency * counts - presence * (counts > 0).float()
        for token, value in (bias or {}).items():
            logits[token] += value
        token = int(logits.argmax())
        counts[token] += 1
        ids.append(token)
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def engine():
    engine = started_engine(tiny_config())
    yield engine
    engine.shutdown(10)


async def test_logprobs_equal_the_plain_pytorch_reference(engine, module) -> None:
    result = await run(engine, PROMPT, max_tokens=12, temperature=0.0, logprobs=5, ignore_eos=True)
    tokens = result.tokens[0]
    reference = model_logprobs(module, PROMPT + tokens)
    assert len(result.logprobs[0]) == len(tokens) == 12
    for i, (token, logprob, top) in enumerate(result.logprobs[0]):
        row = reference[len(PROMPT) - 1 + i]
        assert token == tokens[i]
        assert abs(logprob - float(row[token])) < TOL
        values, ids = row.topk(5)
        assert [t for t, _ in top] == ids.tolist()
        assert all(abs(lp - v) < TOL for (_, lp), v in zip(top, values.tolist()))
        assert top[0][0] == token  # greedy picks the most likely token


async def test_sampled_logprobs_are_those_of_the_sampled_tokens(engine, module) -> None:
    result = await run(engine, PROMPT, max_tokens=10, temperature=1.0, seed=7, logprobs=0, ignore_eos=True)
    tokens = result.tokens[0]
    reference = model_logprobs(module, PROMPT + tokens)
    for i, (token, logprob, top) in enumerate(result.logprobs[0]):
        assert token == tokens[i] and top == ()
        assert abs(logprob - float(reference[len(PROMPT) - 1 + i][token])) < TOL


async def test_prompt_logprobs_for_echo(engine, module) -> None:
    result = await run(engine, PROMPT, max_tokens=2, temperature=0.0, logprobs=2, prompt_logprobs=2)
    reference = model_logprobs(module, PROMPT)
    assert result.prompt_logprobs is not None and result.prompt_logprobs[0] == (PROMPT[0], None, ())
    assert len(result.prompt_logprobs) == len(PROMPT)
    for i, (token, logprob, top) in enumerate(result.prompt_logprobs[1:], start=1):
        assert token == PROMPT[i]
        assert abs(logprob - float(reference[i - 1][token])) < TOL
        assert [t for t, _ in top] == reference[i - 1].topk(2).indices.tolist()


@pytest.mark.parametrize(("presence", "frequency"), [(1.5, 0.0), (0.0, 2.0), (0.7, 0.9), (-1.0, 0.0)])
async def test_penalties_match_openais_formula(engine, module, presence: float, frequency: float) -> None:
    result = await run(engine, PROMPT, max_tokens=16, temperature=0.0, presence_penalty=presence,
                       frequency_penalty=frequency, ignore_eos=True)
    assert result.tokens[0] == reference_greedy(module, PROMPT, 16, presence, frequency)


async def test_logit_bias_matches_the_reference_and_can_force_a_token(engine, module) -> None:
    plain = (await run(engine, PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True)).tokens[0]
    bias = {plain[0]: -100.0, 65: 3.0}
    biased = await run(engine, PROMPT, max_tokens=8, temperature=0.0, logit_bias=tuple(bias.items()),
                       ignore_eos=True)
    assert biased.tokens[0] == reference_greedy(module, PROMPT, 8, bias=bias)
    assert plain[0] not in biased.tokens[0]
    forced = await run(engine, PROMPT, max_tokens=5, temperature=1.0, seed=3, logit_bias=((90, 100.0),),
                       ignore_eos=True)
    assert forced.tokens[0] == [90] * 5


async def test_n_sequences_share_one_prefill_and_count_what_they_generate() -> None:
    observer = SlowSteps()
    engine = started_engine(tiny_config(), observer=observer)
    try:
        greedy = await run(engine, PROMPT, max_tokens=6, temperature=0.0, n=3, ignore_eos=True)
        single = await run(engine, PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True)
        sampled = await run(engine, PROMPT, max_tokens=8, temperature=1.0, seed=11, n=4, ignore_eos=True)
        again = await run(engine, PROMPT, max_tokens=8, temperature=1.0, seed=11, n=4, ignore_eos=True)
    finally:
        engine.shutdown(10)
    assert greedy.tokens == {0: single.tokens[0], 1: single.tokens[0], 2: single.tokens[0]}
    assert greedy.completion_tokens == 18 and sampled.completion_tokens == 32
    assert len({tuple(t) for t in sampled.tokens.values()}) > 1  # each sequence has its own generator
    assert sampled.tokens == again.tokens  # and seeds are derived from the request's seed
    prefills = [s for s in observer.started if s.phase == "prefill"]
    assert len(prefills) == 4
    for step in prefills:  # the prompt went through the model once, whatever n was
        assert step.num_tokens == len(PROMPT)
        assert sorted(step.tokens_per_sequence, reverse=True)[0] == len(PROMPT)
        assert sum(step.tokens_per_sequence) == len(PROMPT)
    assert [s.batch_size for s in prefills] == [3, 1, 4, 4]


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tier": {"enum": ["free", "pro"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "tier", "tags"],
    "additionalProperties": False,
}


async def test_json_schema_output_always_parses_and_validates(engine) -> None:
    guide = engine.info.grammars.compile("json_schema", SCHEMA)
    results = await asyncio.gather(*(run(engine, PROMPT, max_tokens=200, temperature=1.0, seed=seed, guide=guide)
                                     for seed in range(8)))
    results.append(await run(engine, PROMPT, max_tokens=200, temperature=0.0, guide=guide))
    for result in results:
        assert result.reasons[0] == "stop", result.text
        jsonschema.validate(json.loads(result.text[0]), SCHEMA)


async def test_json_object_output_is_an_object(engine) -> None:
    guide = engine.info.grammars.compile("json_object", None)
    # Strings of a random-weight model run long: favour the closing quote, as a real model would.
    for seed in range(4):
        result = await run(engine, PROMPT, max_tokens=300, temperature=1.0, seed=seed, guide=guide,
                           logit_bias=((ord('"'), 4.0), (ord("}"), 4.0)))
        assert result.reasons[0] == "stop", result.text
        assert isinstance(json.loads(result.text[0]), dict)


async def test_mixed_settings_in_one_batch_equal_each_alone() -> None:
    engine = started_engine(tiny_config())
    try:
        guide = engine.info.grammars.compile("json_schema", SCHEMA)
        settings = [
            {"temperature": 0.0},
            {"temperature": 0.0, "logprobs": 3},
            {"temperature": 0.8, "seed": 5, "presence_penalty": 1.0, "frequency_penalty": 0.5},
            {"temperature": 0.0, "logit_bias": ((100, 5.0), (101, -50.0))},
            {"temperature": 0.9, "seed": 9, "top_p": 0.8, "n": 2},
            {"temperature": 0.7, "seed": 2, "guide": guide},
            {"temperature": 0.0, "frequency_penalty": 1.5, "logprobs": 1},
        ]
        prompts = [PROMPT[: 3 + i] for i in range(len(settings))]
        alone = [await run(engine, p, max_tokens=12, ignore_eos=True, **s) for p, s in zip(prompts, settings)]
        together = await asyncio.gather(*(run(engine, p, max_tokens=12, ignore_eos=True, **s)
                                          for p, s in zip(prompts, settings)))
    finally:
        engine.shutdown(10)
    for a, t in zip(alone, together):
        assert t.tokens == a.tokens
        assert t.logprobs.keys() == a.logprobs.keys()
        for index in a.logprobs:
            for (ta, la, topa), (tt, lt, topt) in zip(a.logprobs[index], t.logprobs[index]):
                assert ta == tt and abs(la - lt) < TOL and [x for x, _ in topa] == [x for x, _ in topt]


def test_grammars_for_a_model_whose_vocabulary_and_eos_outrun_the_tokenizer() -> None:
    """gpt2-medium's random config (vocab 50257, EOS 50256) with the 259-token demo tokenizer (the GPU benchmark)."""
    from inference.demo_tokenizer import build_demo_tokenizer
    from inference.structured import Grammars, allowed

    grammars = Grammars(build_demo_tokenizer(), 50257, (50256,))
    matcher = grammars.matcher(grammars.compile("json_schema", SCHEMA))
    mask = allowed([matcher], 50257, torch.device("cpu"))
    assert mask.shape == (1, 50257) and mask[0, ord("{")] and not mask[0, 300:].any()
