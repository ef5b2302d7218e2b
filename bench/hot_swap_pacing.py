"""What a version starting up beside a serving one costs the serving one, in one process (CPU, #15).

v1 (an engine) serves an open loop of greedy requests; after a warm-up, v2 (another engine of the
same model) starts beside it, then runs a probe and a shadow-sized batch, as the registry's load
and validation do. Two settings, each in its own process, one after the other:

- ``before``: v2 builds its own grammar tables, is not paced, switch interval 0.5 ms;
- ``after``: v2 shares v1's grammar tables (``GrammarTables``), is paced (``LoadPacer``, stopped
  after its validation-sized steps), switch interval 50 us.

Per setting: v1's request latencies (p50/p99/max, ms) for requests sent before v2 starts and
for those in flight while v2 starts up and validates, v2's start-up + validation time, and v2's
start-up log line. On the shared 2-core box the numbers are noisy: compare within one run, and
run it again on a quiet machine.

    python bench/hot_swap_pacing.py --out /tmp/hot_swap_pacing.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_report  # noqa: E402


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 2)


async def measure(setting: str, model: str, rate: float, max_tokens: int, warm_up_s: float, before_s: float) -> dict:
    import torch
    from prometheus_client import CollectorRegistry

    from inference.config import BatchingConfig, ModelConfig
    from inference.engine import Engine
    from inference.generation import GenerationRequest, SamplingParams
    from inference.metrics import InferenceMetrics
    from inference.pacing import LoadPacer
    from inference.structured import GrammarTables
    from inference.tracing import Tracing

    torch.set_num_threads(1)
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "start-up of" in record.getMessage():
                lines.append(record.getMessage())

    logging.getLogger("kernelgate.inference.engine").addHandler(Keep())
    logging.getLogger("kernelgate.inference.engine").setLevel(logging.INFO)
    after = setting == "after"
    config = ModelConfig(name=model, random_config=model, device="cpu", use_deepspeed=False, max_model_len=256)
    batching = BatchingConfig(max_batch_size=8, max_wait_ms=2.0, max_queue=256)
    tables = GrammarTables()

    def engine(**kwargs: object) -> Engine:
        return Engine(config, batching, InferenceMetrics(CollectorRegistry()), Tracing(), **kwargs)

    async def ready(e: Engine) -> None:
        while not e.ready:
            if e.failure is not None:
                raise RuntimeError(e.failure)
            await asyncio.sleep(0.005)

    async def run(e: Engine, prompt: tuple[int, ...], tokens: int) -> None:
        stream = e.submit(GenerationRequest(request_id=uuid.uuid4().hex, prompt_token_ids=prompt,
                                            params=SamplingParams(max_tokens=tokens, temperature=0.0,
                                                                  ignore_eos=True)))
        async for _ in stream:
            pass

    v1 = engine(grammar_tables=tables)
    v1.start()
    await ready(v1)
    sent: list[tuple[float, asyncio.Task[float]]] = []
    stop = asyncio.Event()

    async def timed(prompt: tuple[int, ...]) -> float:
        started = time.monotonic()
        await run(v1, prompt, max_tokens)
        return time.monotonic() - started

    async def open_loop() -> None:
        i = 0
        next_at = time.monotonic()
        while not stop.is_set():
            sent.append((time.monotonic(), asyncio.ensure_future(timed((1 + i % 50, 2, 3, 4, 5, 6, 7, 8)))))
            i += 1
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    loop_task = asyncio.ensure_future(open_loop())
    await asyncio.sleep(warm_up_s + before_s)
    sys.setswitchinterval(0.00005 if after else 0.0005)
    swap_started = time.monotonic()
    pacer = LoadPacer(lambda: [v1]) if after else None
    v2 = engine(grammar_tables=tables if after else None, pacer=pacer, beside_serving=True)
    v2.start()
    await ready(v2)
    started_up = time.monotonic()
    await run(v2, (1, 2, 3, 4), 4)  # the probe
    await asyncio.gather(*(run(v2, (9 + i, 2, 3, 4, 5, 6, 7, 8), 8) for i in range(8)))  # a shadow-sized batch
    if pacer is not None:
        pacer.stop()
    swap_ended = time.monotonic()
    sys.setswitchinterval(0.005)
    await asyncio.sleep(1.0)
    stop.set()
    await loop_task
    await asyncio.gather(*(task for _, task in sent))
    t0 = sent[0][0] + warm_up_s
    before = [1e3 * task.result() for at, task in sent if t0 <= at and at + task.result() < swap_started]
    during = [1e3 * task.result() for at, task in sent if at < swap_ended and at + task.result() > swap_started]
    v2.shutdown(10)
    v1.shutdown(10)
    return {"setting": setting, "v1_requests_before": len(before), "v1_p50_ms_before": _pct(before, 0.5),
            "v1_p99_ms_before": _pct(before, 0.99), "v1_max_ms_before": _pct(before, 1.0),
            "v1_requests_during": len(during), "v1_p50_ms_during": _pct(during, 0.5),
            "v1_p99_ms_during": _pct(during, 0.99), "v1_max_ms_during": _pct(during, 1.0),
            "v2_start_up_s": round(started_up - swap_started, 3),
            "v2_start_up_and_validation_s": round(swap_ended - swap_started, 3),
            "v1_slow_steps": [[round(took, 1), round(gap, 1), phase, batch]
                              for at, took, gap, phase, batch in v1.slow_steps() if at >= swap_started - 0.1
                              and at <= swap_ended + 0.1][-10:],
            "v2_start_up_log": lines[-1] if len(lines) > 1 else None,
            "pacer": None if pacer is None else {"pauses": pacer.pauses, "paused_ms": round(1e3 * pacer.paused_s, 1),
                                                 "every_pause_saw_a_v1_step": all(pacer.stepped)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--warm-up-s", type=float, default=2.0)
    parser.add_argument("--before-s", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=1, help="before/after pairs, alternating")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.one is not None:
        result = asyncio.run(measure(args.one, args.model, args.rate, args.max_tokens, args.warm_up_s, args.before_s))
        print(json.dumps(result))
        return 0
    runs = []
    for _ in range(args.rounds):
        for setting in ("before", "after"):
            cmd = [sys.executable, __file__, "--one", setting, "--model", args.model, "--rate", str(args.rate),
                   "--max-tokens", str(args.max_tokens), "--warm-up-s", str(args.warm_up_s),
                   "--before-s", str(args.before_s)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    write_report("hot_swap_pacing", args.out, {"model": args.model, "rate_per_s": args.rate,
                                               "max_tokens": args.max_tokens, "runs": runs}, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
