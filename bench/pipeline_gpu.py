"""Pipelined decode on vs off, side by side in one process: same tokens, and the batch-1 time per token.

Two engines (``inference.engine.Engine``, the server's own, CUDA graphs on) on the same seeded
random weights, one with ``batching.pipeline_decode`` on (step N+1 launched before step N's
tokens are read, fed them on the device) and one with it off, both resident on the GPU.

* ``greedy_equal``: every prompt alone, then all at once with different ``max_tokens`` and a
  stop token that ends one sequence mid-batch (its early step dropped), token ids compared
  exactly between the two engines (the same batch at every step in both: no fp16 batch effect);
* ``ms_per_token``: one greedy request at a time (prompt ``--prompt-tokens``, ``--new-tokens``
  new, EOS ignored), the engine's own time per output token (its
  ``time_per_output_token`` histogram: first token to last, over the tokens between), rounds
  alternating between the engines; medians, and off ÷ on.

Writes ``--out`` (JSON: command, device, versions). Runs on the CPU too (``--device cpu
--model tiny-llama``: a check that it works, not a measurement).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TPOT = "kernelgate_inference_time_per_output_token_seconds"


def _engine(args: argparse.Namespace, pipelined: bool):
    from prometheus_client import CollectorRegistry

    from inference.config import BatchingConfig, ModelConfig
    from inference.engine import Engine
    from inference.metrics import InferenceMetrics
    from inference.tracing import Tracing

    model = ModelConfig(name=args.model, random_config=args.model, device=args.device, use_deepspeed=False,
                        max_model_len=2 ** (max(args.prompt_tokens, 32) + max(args.new_tokens, 48)).bit_length())
    batching = BatchingConfig(max_batch_size=args.slots, max_wait_ms=0.0, pipeline_decode=pipelined)
    engine = Engine(model, batching, InferenceMetrics(CollectorRegistry()), Tracing())
    engine.start()
    deadline = time.monotonic() + args.ready_timeout
    while not engine.ready:
        if engine.failure is not None or time.monotonic() > deadline:
            raise SystemExit(f"engine (pipeline_decode {pipelined}) did not start: {engine.failure!r}")
        time.sleep(0.1)
    return engine


async def _tokens(engine, prompt: list[int], max_tokens: int, stop: tuple[int, ...] = ()) -> list[int]:
    from inference.generation import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, stop_token_ids=stop)
    stream = engine.submit(GenerationRequest(request_id=uuid.uuid4().hex, prompt_token_ids=tuple(prompt),
                                             params=params))
    out: list[int] = []
    async for output in stream:
        out.extend(output.token_ids)
    return out


def _tpot(engine) -> tuple[float, float]:
    registry = engine.metrics.registry
    return (registry.get_sample_value(TPOT + "_sum") or 0.0, registry.get_sample_value(TPOT + "_count") or 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    import torch

    from inference.model_configs import random_config
    from inference_gpu import prompts_for

    vocab = random_config(args.model).vocab_size
    engines = {True: _engine(args, True), False: _engine(args, False)}
    result: dict = {"command": " ".join(["python3"] + [shlex.quote(a) for a in sys.argv]),
                    "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
                    "versions": {"torch": torch.__version__}, "model": args.model,
                    "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    try:
        prompts = prompts_for(vocab, args.slots, 32, seed=3)
        lengths = [48, 13, 30, 7, 21, 40, 9, 17][:len(prompts)]

        async def equality(engine) -> dict:
            alone = [await _tokens(engine, p, 48) for p in prompts]
            stop = (alone[0][10],)  # ends sequence 0 at its 11th token (or earlier) while the others run on
            together = await asyncio.gather(*(_tokens(engine, p, n, stop if i == 0 else ())
                                              for i, (p, n) in enumerate(zip(prompts, lengths))))
            return {"alone": alone, "together": list(together)}

        runs = {mode: asyncio.run(equality(engine)) for mode, engine in engines.items()}
        result["greedy_equal"] = runs[True] == runs[False]
        result["greedy_rows"] = {part: [a == b for a, b in zip(runs[True][part], runs[False][part])]
                                 for part in ("alone", "together")}
        print("greedy_equal", result["greedy_equal"], result["greedy_rows"], flush=True)

        prompt = prompts_for(vocab, 1, args.prompt_tokens, seed=1)[0]
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for mode, engine in engines.items():
                before_sum, before_count = _tpot(engine)
                asyncio.run(_tokens(engine, prompt, args.new_tokens))
                after_sum, after_count = _tpot(engine)
                times[mode].append(1000 * (after_sum - before_sum) / max(1.0, after_count - before_count))
        on, off = statistics.median(times[True]), statistics.median(times[False])
        result["ms_per_token"] = {"pipelined": round(on, 4), "one_at_a_time": round(off, 4),
                                  "off_over_on": round(off / on, 4)}
        result["rounds_ms"] = {"pipelined": [round(t, 4) for t in times[True]],
                               "one_at_a_time": [round(t, 4) for t in times[False]]}
        print("ms_per_token", result["ms_per_token"], flush=True)
    finally:
        for engine in engines.values():
            engine.shutdown(30)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result.get("greedy_equal") else 1


if __name__ == "__main__":
    sys.exit(main())
