"""What the #20 sampling options cost: tokens/s with each option on vs off, one server, interleaved windows.

One inference server (random-weight ``--model``, fp16 on ``--device``, CUDA-graph
decode, batch ``--concurrency``) is driven by ``--concurrency`` closed-loop HTTP clients sending
``--prompt-tokens``-token prompts for ``--new-tokens`` tokens (EOS ignored), in windows of
``--window-s`` seconds that cycle through the modes ``--rounds`` times (off, logprobs, penalties,
n4, json_schema, off, ...), so drift of the machine hits every mode alike:

* ``off``: greedy, no option (the sampler's fast path);
* ``logprobs``: ``logprobs: 5`` (the sampled token's log-probability and the top 5);
* ``penalties``: ``presence_penalty: 0.5, frequency_penalty: 0.5``;
* ``n4``: ``n: 4`` from ``concurrency / 4`` clients (the same number of sequences in the batch);
* ``json_schema``: ``response_format`` json_schema, a string of exactly ``new_tokens`` characters
  (so the requests generate as many tokens as the others; masks from llguidance).

tokens/s counts every generated token (all choices) finished inside the window.
``overhead_pct.<mode> = 100 * (1 - tokens_per_s[mode] / tokens_per_s[off])``; targets: logprobs and
penalties <= 10 %. Writes ``--out`` with the per-window rows, the command and the device.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.processes import free_port, start, wait_http  # noqa: E402

MODES = ("off", "logprobs", "penalties", "n4", "json_schema")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-medium")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of this script")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--window-s", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--deepspeed", action="store_true", help="DeepSpeed kernel injection (JIT-builds its op)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/sampling_overhead.json"))
    parser.add_argument("--log-dir", default=os.environ.get("OUT", "/tmp"))
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    return parser.parse_args()


def body_for(mode: str, model: str, prompt: list[int], new_tokens: int) -> dict:
    body: dict = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    if mode == "logprobs":
        body["logprobs"] = 5
    elif mode == "penalties":
        body.update(presence_penalty=0.5, frequency_penalty=0.5)
    elif mode == "n4":
        body["n"] = 4
    elif mode == "json_schema":
        schema = {"type": "object", "properties": {"t": {"type": "string", "minLength": new_tokens,
                                                         "maxLength": new_tokens, "pattern": "^[a-z]*$"}},
                  "required": ["t"], "additionalProperties": False}
        body.update(response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
                    max_tokens=new_tokens + 16, ignore_eos=False)
    return body


async def window(url: str, mode: str, args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    import aiohttp

    clients = args.concurrency // 4 if mode == "n4" else args.concurrency
    deadline = time.perf_counter() + args.window_s
    tokens = requests = 0
    errors: list[str] = []

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal tokens, requests
        i = 0
        while time.perf_counter() < deadline:
            prompt = prompts[(index * 997 + i) % len(prompts)]
            i += 1
            async with session.post(url, json=body_for(mode, args.model, prompt, args.new_tokens)) as resp:
                data = await resp.json()
            if resp.status != 200:
                errors.append(str(data)[:300])
                return
            if time.perf_counter() <= deadline:
                tokens += data["usage"]["completion_tokens"]
                requests += 1

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(client(session, i) for i in range(clients)))
    if errors:
        raise RuntimeError(f"{mode}: {errors[0]}")
    seconds = min(time.perf_counter() - started, args.window_s)
    return {"mode": mode, "clients": clients, "requests": requests, "completion_tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def main() -> int:
    args = parse_args()
    import torch
    import yaml

    modes = [m for m in args.modes.split(",") if m]
    port = free_port()
    config = {"inference": {
        "listen": {"host": "127.0.0.1", "port": port},
        "model": {"name": args.model, "random_config": args.model, "dtype": "auto", "device": args.device,
                  "use_deepspeed": args.deepspeed, "cuda_graphs": True,
                  "max_model_len": 2 ** (args.prompt_tokens + args.new_tokens + 16 - 1).bit_length()},
        "batching": {"max_batch_size": args.concurrency, "max_wait_ms": 2.0, "max_queue": 1024,
                     "max_tokens_in_flight": 1 << 20},
        "limits": {"request_timeout_s": 600, "drain_timeout_s": 30}}}
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    config_path = log_dir / "sampling-overhead-server.yaml"
    config_path.write_text(yaml.safe_dump(config))
    # The inference server alone (kernelgate.cli would load every section and need Envoy's config libraries).
    serve = ("import sys, yaml; from common.settings import build; from inference.config import InferenceConfig; "
             "from inference.server import run; "
             "run(build(InferenceConfig, yaml.safe_load(open(sys.argv[1]))['inference'], 'inference'))")
    server = start("sampling-overhead-server", [sys.executable, "-c", serve, str(config_path)], log_dir,
                   env={"PYTHONUNBUFFERED": "1"})
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 256, (256, args.prompt_tokens), generator=gen).tolist()  # the demo tokenizer's bytes
    url = f"http://127.0.0.1:{port}/v1/completions"
    rows: list[dict] = []
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=args.ready_timeout, proc=server)
        for mode in modes:  # warm-up: first requests of each mode (grammar compile, allocations)
            asyncio.run(window(url, mode, argparse.Namespace(**{**vars(args), "window_s": 1.0}), prompts))
        for round_ in range(args.rounds):
            for mode in modes:
                row = asyncio.run(window(url, mode, args, prompts))
                row["round"] = round_
                rows.append(row)
                print(f"[round {round_}] {mode}: {row['tokens_per_s']} tok/s ({row['requests']} requests)", flush=True)
    finally:
        server.popen.send_signal(signal.SIGTERM)
        try:
            server.popen.wait(60)
        except Exception:  # noqa: BLE001
            server.popen.kill()
    tps = {m: round(statistics.mean(r["tokens_per_s"] for r in rows if r["mode"] == m), 1) for m in modes}
    overhead = {m: round(100.0 * (1.0 - tps[m] / tps["off"]), 2) for m in modes if m != "off"}
    per_round = {m: [round(100.0 * (1.0 - a["tokens_per_s"] / b["tokens_per_s"]), 2)
                     for a, b in zip([r for r in rows if r["mode"] == m], [r for r in rows if r["mode"] == "off"])]
                 for m in modes if m != "off"}
    device = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    result = {
        "command": "python3 bench/sampling_overhead.py " + shlex.join(sys.argv[1:]),
        "device": device,
        "model": args.model, "concurrency": args.concurrency, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "deepspeed": args.deepspeed, "window_s": args.window_s, "rounds": args.rounds,
        "tokens_per_s": tps, "overhead_pct": overhead, "overhead_pct_by_round": per_round,
        "targets": {"logprobs": "<= 10", "penalties": "<= 10"},
        "targets_met": {m: overhead[m] <= 10.0 for m in ("logprobs", "penalties") if m in overhead},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("device", "tokens_per_s", "overhead_pct", "targets_met")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
