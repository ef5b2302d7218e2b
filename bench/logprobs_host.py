"""CPU time per token of the logprobs path outside the device step (#20), options on vs off.

What it runs, with the project's own code: ``SlotSampling.pick`` after the device work (its
``_logprob_table`` replaced by a precomputed ``[rows, 2 + 2k]`` table, and a tiny vocabulary so
the argmax is free: what is left is the host half of a step), the engine's
``GenerationOutput`` for each row (as ``Engine._append`` makes it), delivery into each request's
``RequestStream``, then ``GenerationServing.respond`` folding the outputs and the endpoint's
shapes framed with ``dumps`` (whole responses, or every SSE chunk when ``--stream``).

16 sequences x ``--steps`` steps; prints and writes CPU microseconds per token per mode and the
difference from ``off``. No GPU, no server:

    python bench/logprobs_host.py --steps 256 --top 5 [--stream] [--endpoint chat] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from types import SimpleNamespace

import torch
from opentelemetry.trace import INVALID_SPAN

from inference.demo_tokenizer import build_demo_tokenizer
from inference.generation import GenerationOutput, RequestStream, SamplingParams
from inference.openai.chat.serving import _Shapes as ChatShapes
from inference.openai.completion.serving import _Shapes as CompletionShapes
from inference.openai.http import dumps, sse_event
from inference.openai.serving import GenerationServing, Submitted
from inference.sampling import RequestSampler, SlotSampling

ROWS, VOCAB = 16, 50257


def table_for(steps: int, k: int) -> list[torch.Tensor]:
    """A plausible logprob table per step: ids < VOCAB, log-probabilities < 0."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (ROWS, 1 + k), generator=generator).float()
        values = -torch.rand(ROWS, 1 + k, generator=generator) * 12
        out.append(torch.cat([ids[:, :1], values[:, :1], values[:, 1:].sort(dim=1, descending=True).values,
                              ids[:, 1:]], dim=1))
    return out


async def one_run(mode: str, steps: int, k: int, stream: bool, endpoint: str, tokenizer) -> tuple[float, float]:
    """CPU microseconds per token: (engine thread's share, event loop's share)."""
    want = k if mode == "logprobs" else None
    sampling = SlotSampling(ROWS, 64, torch.device("cpu"), fused_logprobs=False)
    params = SamplingParams(max_tokens=steps, temperature=0.0, logprobs=want)
    samplers = [RequestSampler(params, torch.device("cpu")) for _ in range(ROWS)]
    for slot, sampler in enumerate(samplers):
        sampling.admit(slot, sampler)
    tables = table_for(steps, k)
    step = iter(tables)
    sampling._logprob_table = lambda logits, choices, top: next(step)  # the device's half, done already
    logits = torch.zeros(ROWS, 64)
    loop = asyncio.get_running_loop()
    streams = [RequestStream(f"r{i}", loop, lambda _id: None) for i in range(ROWS)]
    engine = SimpleNamespace(info=SimpleNamespace(tokenizer=tokenizer), ready=True)
    serving = GenerationServing(engine, None, None, 1)  # type: ignore[arg-type]
    shapes = ChatShapes() if endpoint == "chat" else CompletionShapes()
    texts = serving._token_texts()
    for table in tables:  # the id -> string cache warm, as on a server that has run a while
        for t in table[:, 0].tolist() + table[:, 2 + k:].flatten().tolist():
            texts(int(t))
    step = iter(tables)
    start = time.process_time()
    # the engine thread's share: the host half of each step, one output per row, delivery
    for index in range(steps):
        picks = sampling.pick(logits, 0, samplers)
        for row, pick in enumerate(picks):
            streams[row].put(GenerationOutput(
                request_id=f"r{row}", text="", token_ids=(pick.token,), prompt_tokens=8,
                completion_tokens=index + 1, finished=index == steps - 1,
                finish_reason="length" if index == steps - 1 else None, index=0,
                logprobs=pick.logprobs, prompt_logprobs=None))  # as Engine._append
    engine_thread = time.process_time() - start
    # the event loop's share: fold, shape, serialise
    for row in range(ROWS):
        submitted = Submitted(request_id=f"cmpl-{row}", created=0, model="m", prompt_tokens=8,
                              streams=(streams[row],), n=1)
        result = await serving.respond(INVALID_SPAN, submitted, shapes, stream, False)
        if stream:
            async for chunk in result:
                sse_event(chunk)
        else:
            dumps(result)
    total = time.process_time() - start
    return engine_thread * 1e6 / (steps * ROWS), (total - engine_thread) * 1e6 / (steps * ROWS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--top", type=int, default=5, help="top_logprobs (alternatives per token)")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    tokenizer = build_demo_tokenizer()

    async def measure() -> dict[str, dict[str, float]]:
        best: dict[str, dict[str, float]] = {}
        for _ in range(args.repeats):  # interleaved; the minimum of each (a busy machine adds, never removes)
            for mode in ("off", "logprobs"):
                engine, loop = await one_run(mode, args.steps, args.top, args.stream, args.endpoint, tokenizer)
                old = best.get(mode, {"engine_thread": engine, "event_loop": loop, "total": engine + loop})
                best[mode] = {"engine_thread": min(old["engine_thread"], engine), "event_loop": min(old["event_loop"], loop),
                              "total": min(old["total"], engine + loop)}
        return best

    best = asyncio.run(measure())
    result = {"command": "python bench/logprobs_host.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False, True))
              + (" --stream" if args.stream else ""),
              "rows": ROWS, "steps": args.steps, "top_logprobs": args.top, "endpoint": args.endpoint,
              "stream": args.stream,
              "cpu_us_per_token": {m: {part: round(v, 2) for part, v in parts.items()} for m, parts in best.items()},
              "logprobs_extra_cpu_us_per_token": {part: round(best["logprobs"][part] - best["off"][part], 2)
                                                  for part in best["off"]}}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
