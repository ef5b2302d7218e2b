"""Pipelined decode (``batching.pipeline_decode``): step N+1 launched before step N's tokens are
read, fed them on the device. The tokens must be exactly those of one step at a time.

Each mix runs on a pipelined engine and on a one-at-a-time engine (same seeded weights, CPU,
fp32) and is compared request by request against that engine's run of each request alone:
stop tokens and stop strings ending sequences mid-batch (their early step is dropped),
admissions mid-decode and more requests than slots, ``max_tokens`` 1 and 2, ``n`` > 1,
penalties, logit bias, log-probabilities, seeded sampling, a grammar (which falls back to one
step at a time) and aborts. The pipelined engine's counter proves the early launches happened.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import pytest
import torch

from inference.config import BatchingConfig, ModelConfig
from inference.generation import GenerationRequest, SamplingParams
from inference.model_loader import load_model
from inference.runner import ModelRunner
from inference.sampling import RequestSampler, SlotSampling
from tests.inference.helpers import TINY, SlowSteps, metric_value, started_engine, tiny_config
from tests.inference.test_sampling_options import SCHEMA, Run
from tests.inference.test_sampling_options import run as run_with

PIPELINED = "kernelgate_inference_pipelined_decode_steps_total"
GENERATED = "kernelgate_inference_generated_tokens_total"
PROMPTS = [[72, 101, 108, 108, 111], [7], list(range(40, 90)), [200, 13, 55, 1, 99], list(range(250, 10, -7))]


def _engines(model: str, slots: int = 4):
    config = replace(TINY, name=model, random_config=model)
    made = {}
    for pipelined in (True, False):
        batching = BatchingConfig(max_batch_size=slots, max_wait_ms=0.0, max_queue=64, pipeline_decode=pipelined)
        made[pipelined] = started_engine(tiny_config(model=config, batching=batching))
    return made


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def engines(request):
    made = _engines(request.param)
    yield made
    for engine in made.values():
        engine.shutdown(10)


async def run(engine, prompt: list[int], **params) -> Run:
    """One request (greedy unless it says otherwise: SamplingParams' default temperature is 1)."""
    return await run_with(engine, prompt, **{"temperature": 0.0, **params})


async def _alone_and_together(engine, jobs: list[tuple[list[int], dict]], stagger_s: float = 0.003):
    alone = [await run(engine, prompt, **params) for prompt, params in jobs]

    async def later(i: int, prompt: list[int], params: dict) -> Run:
        await asyncio.sleep(stagger_s * i)  # joins a running batch mid-decode
        return await run(engine, prompt, **params)

    together = await asyncio.gather(*(later(i, p, s) for i, (p, s) in enumerate(jobs)))
    return alone, together


def _same(a: Run, b: Run) -> None:
    assert b.tokens == a.tokens
    assert b.text == a.text
    assert b.reasons == a.reasons
    assert b.logprobs.keys() == a.logprobs.keys()
    for index in a.logprobs:
        for (ta, la, topa), (tb, lb, topb) in zip(a.logprobs[index], b.logprobs[index]):
            assert ta == tb and abs(la - lb) < 1e-4 and [x for x, _ in topa] == [x for x, _ in topb]


async def test_greedy_and_stops_mid_batch_give_the_same_tokens_pipelined(engines) -> None:
    plain = engines[False]
    # Stop tokens and stop strings that end sequences a few tokens in, while others keep going.
    full = [await run(plain, p, max_tokens=24, ignore_eos=True) for p in PROMPTS]
    stop_ids = [full[i].tokens[0][4 + i] for i in range(3)]
    text = full[3].text[0]
    stop_text = next((text[i:i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i:i + 2]), None)
    jobs = [(PROMPTS[0], {"max_tokens": 30, "stop_token_ids": (stop_ids[0],), "ignore_eos": True}),
            (PROMPTS[1], {"max_tokens": 1}),
            (PROMPTS[2], {"max_tokens": 30, "stop_token_ids": (stop_ids[2],), "ignore_eos": True}),
            (PROMPTS[3], {"max_tokens": 30, "stop": (stop_text,) if stop_text else (), "ignore_eos": True}),
            (PROMPTS[4], {"max_tokens": 2, "ignore_eos": True}),
            (PROMPTS[1], {"max_tokens": 17, "stop_token_ids": (stop_ids[1],), "ignore_eos": True}),
            (PROMPTS[0], {"max_tokens": 9, "ignore_eos": True}),  # more requests than slots: queued, admitted later
            (PROMPTS[2], {"max_tokens": 26}),
            (PROMPTS[3], {"max_tokens": 3, "n": 3, "ignore_eos": True})]
    reference = [await run(plain, p, **s) for p, s in jobs]
    assert reference[0].reasons[0] == "stop" and len(reference[0].tokens[0]) < 30
    for pipelined, engine in engines.items():
        before_steps, before_tokens = (metric_value(engine.metrics.registry, name) for name in (PIPELINED, GENERATED))
        alone, together = await _alone_and_together(engine, jobs)
        for ref, a, t in zip(reference, alone, together):
            _same(ref, a)
            _same(ref, t)
        generated = sum(len(t) for r in alone + together for t in r.tokens.values())
        # a row dropped because its sequence had already ended is neither delivered nor counted
        assert metric_value(engine.metrics.registry, GENERATED) - before_tokens == generated
        steps = metric_value(engine.metrics.registry, PIPELINED) - before_steps
        assert (steps > 0) if pipelined else (steps == 0)
        assert engine.stats().running == 0


async def test_sampling_options_give_the_same_tokens_pipelined(engines) -> None:
    jobs = [(PROMPTS[0], {"temperature": 0.0, "logprobs": 3}),
            (PROMPTS[1], {"temperature": 0.8, "seed": 5, "presence_penalty": 1.0, "frequency_penalty": 0.5}),
            (PROMPTS[2], {"temperature": 0.0, "logit_bias": ((100, 5.0), (101, -50.0))}),
            (PROMPTS[3], {"temperature": 0.9, "seed": 9, "top_p": 0.8, "n": 2}),
            (PROMPTS[4], {"temperature": 0.0, "frequency_penalty": 1.5, "logprobs": 1}),
            (PROMPTS[0], {"temperature": 1.0, "seed": 1}),
            (PROMPTS[1], {"temperature": 0.0, "presence_penalty": 2.0, "n": 2})]
    jobs = [(p, {"max_tokens": 10 + 3 * i, "ignore_eos": True, **s}) for i, (p, s) in enumerate(jobs)]
    reference = [await run(engines[False], p, **s) for p, s in jobs]
    before = metric_value(engines[True].metrics.registry, PIPELINED)
    alone, together = await _alone_and_together(engines[True], jobs)
    for ref, a, t in zip(reference, alone, together):
        _same(ref, a)
        _same(ref, t)
    assert metric_value(engines[True].metrics.registry, PIPELINED) > before


async def test_a_grammar_falls_back_to_one_step_at_a_time_with_the_same_tokens(engines) -> None:
    pipelined, plain = engines[True], engines[False]
    if pipelined.info.grammars is None:
        pytest.skip("no grammar support for this tokenizer")
    jobs = [(PROMPTS[0], {"temperature": 0.0, "guide": pipelined.info.grammars.compile("json_schema", SCHEMA)}),
            (PROMPTS[2], {"temperature": 0.7, "seed": 2,
                          "guide": pipelined.info.grammars.compile("json_schema", SCHEMA)}),
            (PROMPTS[3], {"temperature": 0.0})]
    jobs = [(p, {"max_tokens": 40, **s}) for p, s in jobs]
    want = [await run(plain, p, **{**s, "guide": plain.info.grammars.compile("json_schema", SCHEMA)}
                      if "guide" in s else s) for p, s in jobs]
    before = metric_value(pipelined.metrics.registry, PIPELINED)
    got = [await run(pipelined, p, **s) for p, s in jobs[:2]]  # guided only: never launched early
    assert metric_value(pipelined.metrics.registry, PIPELINED) == before
    together = await asyncio.gather(*(run(pipelined, p, **s) for p, s in jobs))
    for w, g in zip(want, got + list(together)[2:]):
        _same(w, g)
    for w, t in zip(want, together):
        _same(w, t)


async def test_an_abort_mid_decode_leaves_the_others_identical(engines) -> None:
    engine, plain = engines[True], engines[False]
    others = [(PROMPTS[0], {"max_tokens": 20, "ignore_eos": True}), (PROMPTS[3], {"max_tokens": 25, "ignore_eos": True})]
    want = [await run(plain, p, **s) for p, s in others]
    long_want = await run(plain, PROMPTS[2], max_tokens=200, ignore_eos=True)
    request_id = uuid.uuid4().hex
    stream = engine.submit(GenerationRequest(request_id=request_id, prompt_token_ids=tuple(PROMPTS[2]),
                                             params=SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)))
    tasks = [asyncio.ensure_future(run(engine, p, **s)) for p, s in others]
    received: list[int] = []
    async for output in stream:
        received.extend(output.token_ids)
        if len(received) >= 6:
            engine.abort(request_id)
            break
    got = await asyncio.gather(*tasks)
    for w, g in zip(want, got):
        _same(w, g)
    assert received == long_want.tokens[0][:len(received)]
    deadline = asyncio.get_running_loop().time() + 10
    while engine.stats().running:
        assert asyncio.get_running_loop().time() < deadline, "the aborted sequence still holds its slot"
        await asyncio.sleep(0.02)


def test_decode_from_device_tokens_equals_decode() -> None:
    loaded = load_model(ModelConfig(name="tiny-llama", random_config="tiny-llama", device="cpu", use_deepspeed=False))
    with torch.inference_mode():
        runners = [ModelRunner(loaded.module, loaded.attention, num_slots=4, max_len=loaded.max_model_len,
                               dtype=loaded.dtype, device=loaded.device, use_cuda_graphs=False) for _ in range(2)]
        firsts = [r.prefill(0, [PROMPTS[0], PROMPTS[3]]) for r in runners]
        tokens = firsts[0].argmax(-1)
        positions = [len(PROMPTS[0]), len(PROMPTS[3])]
        for _ in range(5):
            listed = runners[0].decode(tokens.tolist(), positions)
            fed = runners[1].decode_from(tokens, positions)
            torch.testing.assert_close(fed, listed, rtol=0, atol=0)
            tokens = listed.argmax(-1)
            positions = [p + 1 for p in positions]


def test_a_third_launch_before_the_first_is_read_is_refused() -> None:
    sampling = SlotSampling(4, 32, torch.device("cpu"))
    params = SamplingParams(max_tokens=4, temperature=0.0)
    samplers = [RequestSampler(params, torch.device("cpu")) for _ in range(2)]
    for slot, sampler in enumerate(samplers):
        sampling.admit(slot, sampler)
    logits = torch.randn(2, 32)
    first = sampling.launch(logits, 0, samplers)
    second = sampling.launch(logits + 1, 0, samplers)
    with pytest.raises(RuntimeError, match="third"):
        sampling.launch(logits, 0, samplers)
    assert [p.token for p in first.result()] == logits.argmax(-1).tolist()
    assert [p.token for p in second.result()] == (logits + 1).argmax(-1).tolist()
    sampling.launch(logits, 0, samplers).result()  # once read, its buffers are free again
    assert sampling.host_syncs == 3


class _Idle(SlowSteps):
    """A forward observer that watches nothing (kernel tracing with no selected request running)."""

    def __init__(self) -> None:
        super().__init__()
        self.watching = False

    def idle(self) -> bool:
        return not self.watching


async def test_an_idle_forward_observer_keeps_decode_pipelined_and_a_watching_one_stops_it() -> None:
    """Kernel tracing is attached on every traced server: while it selects nothing, decode still
    pipelines (the H200 run lost the pipelining on every traced server before); while it watches,
    steps run one at a time so each capture brackets one step."""
    observer = _Idle()
    batching = BatchingConfig(max_batch_size=4, max_wait_ms=0.0, max_queue=64, pipeline_decode=True)
    engine = started_engine(tiny_config(batching=batching), observer=observer)
    try:
        reference = await run(engine, PROMPTS[2], max_tokens=20, ignore_eos=True)
        before = metric_value(engine.metrics.registry, PIPELINED)
        idle_run = await run(engine, PROMPTS[2], max_tokens=20, ignore_eos=True)
        assert metric_value(engine.metrics.registry, PIPELINED) - before > 0
        _same(reference, idle_run)
        observer.watching = True
        before = metric_value(engine.metrics.registry, PIPELINED)
        watched = await run(engine, PROMPTS[2], max_tokens=20, ignore_eos=True)
        assert metric_value(engine.metrics.registry, PIPELINED) - before == 0
        _same(reference, watched)
        assert len(observer.started) >= 40 and len(observer.finished) >= 40  # it still saw every step
    finally:
        engine.shutdown(10)
