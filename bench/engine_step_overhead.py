"""The engine's per-step Python around the model step at batch 1: what the GPU waits for between steps.

At batch 1 on the GPU the decode step is one CUDA-graph replay; everything the engine thread
does between reading a step's token and launching the next replay (sampling bookkeeping,
detokenizing, stop checks, metrics, delivery, the step span, scheduling, staging the next
inputs) leaves the GPU idle. That part is plain Python and costs the same on the CPU, so this
measures it on the CPU: the real engine (``inference.engine.Engine``) serves one greedy request
of ``--new-tokens`` tokens on a tiny random-weight model, and a runner wrapper (the engine's
``wrap_runner`` hook, as tensor parallel uses it) timestamps every ``decode`` call. Per step:

* ``model_ms``: time inside ``runner.decode`` (the model on the CPU: not the GPU's number);
* ``between_ms``: from one ``decode`` returning to the next one starting: all of the engine's
  own per-step work;
* ``critical_ms``: from a step's sampled token being on the host (the sampler's pending picks
  read: on the GPU that is where the step's kernels have finished) to the launch of the step that
  takes that token as input, 0 when that step was launched before (pipelined decode,
  ``batching.pipeline_decode``: the token is fed on the device): the part of the engine's work
  the GPU idles for at batch 1 (work done after the next step is launched, such as handing the
  outputs to the event loop, overlaps the GPU's step and is not in it); ``lead_ms``: the same
  difference unclipped (negative: the next step was queued that long before the token was read);
* with ``--breakdown``, the same gap split by engine function (wrapped with timers).

Medians over the steps after ``--skip`` warm-up steps, best of ``--rounds`` requests.
Writes ``--out`` (JSON) with the command. Numbers from a shared machine are noisy: compare
runs made back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class TimedRunner:
    """The engine's runner, with every decode call's start and end recorded."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self.calls: list[tuple[float, float]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def decode(self, tokens: list[int], positions: list[int]) -> Any:
        started = time.perf_counter()
        out = self._runner.decode(tokens, positions)
        self.calls.append((started, time.perf_counter()))
        return out

    def decode_from(self, tokens: Any, positions: list[int]) -> Any:
        started = time.perf_counter()
        out = self._runner.decode_from(tokens, positions)
        self.calls.append((started, time.perf_counter()))
        return out


def _timed(owner: Any, name: str, totals: dict[str, list[float]]) -> None:
    inner = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[name].append(time.perf_counter() - started)

    setattr(owner, name, wrapper)


async def _one_request(engine: Any, prompt: list[int], new_tokens: int) -> int:
    from inference.generation import GenerationRequest, SamplingParams

    stream = engine.submit(GenerationRequest(request_id=uuid.uuid4().hex, prompt_token_ids=tuple(prompt),
                                             params=SamplingParams(max_tokens=new_tokens, temperature=0.0,
                                                                   ignore_eos=True)))
    tokens = 0
    async for output in stream:
        tokens += len(output.token_ids)
    return tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip", type=int, default=8)
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--pipeline", choices=("on", "off"), default="on",
                        help="batching.pipeline_decode: launch step N+1 before reading step N's token")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    from prometheus_client import CollectorRegistry

    from inference import engine as engine_module
    from inference.config import BatchingConfig, ModelConfig
    from inference.metrics import InferenceMetrics
    from inference.sampling import PendingPicks
    from inference.tracing import Tracing

    holder: dict[str, TimedRunner] = {}

    def wrap(runner: Any) -> TimedRunner:
        holder["runner"] = TimedRunner(runner)
        return holder["runner"]

    model = ModelConfig(name=args.model, random_config=args.model, device="cpu", use_deepspeed=False)
    batching = BatchingConfig(max_batch_size=8, max_wait_ms=0.0, pipeline_decode=args.pipeline == "on")
    engine = engine_module.Engine(model, batching,
                                  InferenceMetrics(CollectorRegistry()), Tracing(), wrap_runner=wrap)
    parts: dict[str, list[float]] = defaultdict(list)
    sampled: list[float] = []
    inner_result = PendingPicks.result

    def result(self: Any) -> Any:  # when each step's tokens are first on the host
        first = not self.read
        out = inner_result(self)
        if first:
            sampled.append(time.perf_counter())
        return out

    PendingPicks.result = result  # type: ignore[method-assign]
    if args.breakdown:
        for name in ("_append", "_deliver", "_notify_observer"):
            _timed(engine, name, parts)
        _timed(engine._tracing, "record_step", parts)
        _timed(engine._scheduler, "admit", parts)
    engine.start()
    deadline = time.monotonic() + 120
    while not engine.ready:
        if engine.failure is not None or time.monotonic() > deadline:
            raise SystemExit(f"engine did not start: {engine.failure!r}")
        time.sleep(0.05)
    prompt = list(range(3, 19))
    rounds = []
    try:
        for _ in range(args.rounds):
            runner = holder["runner"]
            runner.calls.clear()
            sampled.clear()
            for values in parts.values():
                values.clear()
            asyncio.run(_one_request(engine, prompt, args.new_tokens))
            calls = runner.calls[args.skip:]
            model_ms = statistics.median(1000 * (end - start) for start, end in calls)
            between_ms = statistics.median(1000 * (b[0] - a[1]) for a, b in zip(calls, calls[1:]))
            # sampled[0] is the prefill's token; sampled[i] comes from decode call i - 1, and decode
            # call i takes it as input (launched before it was read when pipelined).
            leads = [1000 * (runner.calls[i][0] - sampled[i]) for i in range(args.skip, len(runner.calls))]
            row = {"model_ms": round(model_ms, 4), "between_ms": round(between_ms, 4),
                   "critical_ms": round(statistics.median(max(0.0, lead) for lead in leads), 4),
                   "lead_ms": round(statistics.median(leads), 4)}
            if args.breakdown:
                row["parts_us"] = {name: round(1e6 * statistics.median(v[args.skip:] or v), 1)
                                   for name, v in parts.items() if v}
            rounds.append(row)
            print(json.dumps(row), flush=True)
    finally:
        engine.shutdown(10)
    best = min(rounds, key=lambda r: (r["critical_ms"], r["lead_ms"]))
    result = {"command": " ".join(["python3"] + [shlex.quote(a) for a in sys.argv]), "device": "cpu",
              "model": args.model, "pipeline_decode": args.pipeline == "on", "new_tokens": args.new_tokens, "best": best, "rounds": rounds}
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
