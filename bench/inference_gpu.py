"""GPU benchmark: Hugging Face ``generate`` (static batches) against kernelgate's inference server.

For each random-weight model (fp16, same seed for both systems), prompts of
``--prompt-tokens`` token ids and exactly ``--new-tokens`` generated tokens (EOS ignored):

* ``hf_generate``: ``model.generate`` on a static batch of ``c`` prompts, greedy;
* ``kernelgate``: ``python -m kernelgate.cli serve`` in a child process (DeepSpeed kernel injection,
  continuous batching, CUDA-graph decode), driven by ``c`` concurrent HTTP clients that each
  send requests back to back.

Tokens/s counts generated tokens only. ``ms_per_token_bs1`` is the server's end-to-end latency
of one request at a time (HTTP, prefill and decode) divided by its tokens; the decode-only
figure (``server_decode_ms_per_token``) comes from the server's time-per-output-token metric.
Writes ``--out`` (JSON) with every row, the exact command and the device.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.processes import free_port, start, wait_http  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2-medium,opt-1.3b")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--variants", default="plain,deepspeed",
                        help="server variants, run in this order: deepspeed (kernel injection), plain (HF layers)")
    parser.add_argument("--primary", default="deepspeed", help="variant the summary fields are computed from")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of this script")
    parser.add_argument("--out", default=str(ROOT / "bench/results/inference_gpu.json"))
    parser.add_argument("--log-dir", default=os.environ.get("OUT", "/tmp"))
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    return parser.parse_args()


def prompts_for(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 50000), (count, length), generator=gen).tolist()


# -- Hugging Face generate ------------------------------------------------------------------


def bench_hf(model_name: str, levels: list[int], args: argparse.Namespace) -> list[dict]:
    import torch

    from inference.model_configs import random_config
    from inference.model_loader import build_random

    config = random_config(model_name)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    model = build_random(config, 0, torch.device(args.device), dtype).eval()  # the server's seed-0 weights
    rows = []
    for concurrency in levels:
        batch = torch.tensor(prompts_for(config.vocab_size, concurrency, args.prompt_tokens), device=args.device)
        mask = torch.ones_like(batch)

        def run(model: torch.nn.Module = model, batch: torch.Tensor = batch, mask: torch.Tensor = mask) -> int:
            out = model.generate(batch, attention_mask=mask, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            return (out.shape[1] - batch.shape[1]) * out.shape[0]

        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        with torch.inference_mode():
            run()
            sync()
            repeats = 5 if concurrency == 1 else 3
            started = time.perf_counter()
            tokens = sum(run() for _ in range(repeats))
            sync()
            seconds = time.perf_counter() - started
        rows.append({"model": model_name, "system": "hf_generate", "variant": "static-batch", "backend": "hf",
                     "concurrency": concurrency, "requests": repeats * concurrency, "completion_tokens": tokens,
                     "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
                     "ms_per_token": round(seconds / repeats / args.new_tokens * 1000, 3)})
        print(f"[hf] {model_name} c={concurrency}: {tokens / seconds:.0f} tok/s", flush=True)
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows


# -- kernelgate server ----------------------------------------------------------------------


def start_server(model_name: str, variant: str, max_batch: int, args: argparse.Namespace,
                 model_overrides: dict | None = None, env: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen, int, Path]:
    """Start ``inference.server`` on ``model_name`` (``variant``: deepspeed or plain HF layers, unless
    ``model_overrides`` says otherwise; ``env``: more environment, e.g. which GPU) and wait until it is ready."""
    import yaml

    port = free_port()
    model = {"name": model_name, "random_config": model_name, "dtype": "auto", "device": args.device,
             "use_deepspeed": variant == "deepspeed", "kernel_inject": True, "cuda_graphs": True}
    model.update(model_overrides or {"max_model_len": 2 ** (args.prompt_tokens + args.new_tokens - 1).bit_length()})
    config = {"inference": {
        "listen": {"host": "127.0.0.1", "port": port},
        "model": model,
        "batching": {"max_batch_size": max_batch, "max_wait_ms": 2.0, "max_queue": 1024,
                     "max_tokens_in_flight": 1 << 20},
        "limits": {"request_timeout_s": 600, "drain_timeout_s": 30}}}
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    config_path = log_dir / f"server-{model_name}-{variant}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = log_dir / f"server-{model_name}-{variant}.log"
    server = start(log_path.stem, [sys.executable, "-m", "kernelgate.cli", "serve", "--config", str(config_path)], log_path.parent,
                   env={"PYTHONUNBUFFERED": "1", **(env or {})})
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=args.ready_timeout, proc=server)
    except Exception:
        server.popen.kill()
        # Its log (every rank's lines) is in --log-dir; show the end here too.
        print(f"server {model_name}/{variant} did not become ready; the end of {server.log_path}:\n"
              + "\n".join(server.log_path.read_text(errors="replace").splitlines()[-40:]), file=sys.stderr, flush=True)
        raise
    return server.popen, port, server.log_path


def scrape(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def drive(port: int, model_name: str, prompts: list[list[int]], concurrency: int, per_client: int,
                new_tokens: int) -> tuple[int, float, list[float]]:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    latencies: list[float] = []
    tokens = 0

    async def client(session: aiohttp.ClientSession, index: int, count: int, record: bool) -> None:
        nonlocal tokens
        for i in range(count):
            prompt = prompts[(index * per_client + i) % len(prompts)]
            started = time.perf_counter()
            async with session.post(url, json={"model": model_name, "prompt": prompt, "max_tokens": new_tokens,
                                               "temperature": 0, "ignore_eos": True}) as resp:
                body = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {body}")
            if record:
                latencies.append((time.perf_counter() - started) / body["usage"]["completion_tokens"])
                tokens += body["usage"]["completion_tokens"]

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(client(session, i, 1, False) for i in range(concurrency)))  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client(session, i, per_client, True) for i in range(concurrency)))
        seconds = time.perf_counter() - started
    return tokens, seconds, latencies


def bench_server(model_name: str, variant: str, levels: list[int], args: argparse.Namespace) -> list[dict]:
    from inference.model_configs import random_config

    vocab = random_config(model_name).vocab_size
    proc, port, log_path = start_server(model_name, variant, max(levels), args)
    log_text = log_path.read_text()
    backend = re.search(r"ready \((\S+) backend", log_text)
    graphs = re.search(r"CUDA graphs (on|off)", log_text)
    rows = []
    try:
        for concurrency in levels:
            per_client = {1: 20, 16: 8}.get(concurrency, 4)
            prompts = prompts_for(vocab, concurrency * per_client, args.prompt_tokens, seed=1)
            tpot_sum = scrape(port, "kernelgate_inference_time_per_output_token_seconds_sum")
            tpot_count = scrape(port, "kernelgate_inference_time_per_output_token_seconds_count")
            tokens, seconds, latencies = asyncio.run(drive(port, model_name, prompts, concurrency, per_client,
                                                           args.new_tokens))
            tpot = ((scrape(port, "kernelgate_inference_time_per_output_token_seconds_sum") - tpot_sum)
                    / max(1.0, scrape(port, "kernelgate_inference_time_per_output_token_seconds_count") - tpot_count))
            rows.append({"model": model_name, "system": "kernelgate", "variant": variant,
                         "backend": backend.group(1) if backend else "unknown",
                         "cuda_graphs": graphs.group(1) if graphs else "unknown",
                         "concurrency": concurrency, "requests": len(latencies), "completion_tokens": tokens,
                         "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
                         "ms_per_token": round(1000 * sum(latencies) / len(latencies), 3),
                         "server_decode_ms_per_token": round(1000 * tpot, 3)})
            print(f"[kernelgate/{variant}] {model_name} c={concurrency}: {tokens / seconds:.0f} tok/s, "
                  f"{rows[-1]['ms_per_token']} ms/token end-to-end, {rows[-1]['server_decode_ms_per_token']} decode",
                  flush=True)
    finally:
        stop_server(proc)
    return rows


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains), then kill after a minute."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def summarize(rows: list[dict], models: list[str], primary_variant: str) -> dict:
    def pick(model: str, system: str, concurrency: int, variant: str | None = None) -> dict | None:
        return next((r for r in rows if r["model"] == model and r["system"] == system
                     and r["concurrency"] == concurrency and (variant is None or r["variant"] == variant)), None)

    ratio, bs1 = {}, {}
    for model in models:
        server16, hf16 = pick(model, "kernelgate", 16, primary_variant), pick(model, "hf_generate", 16)
        if server16 and hf16:
            ratio[model] = round(server16["tokens_per_s"] / hf16["tokens_per_s"], 2)
        server1 = pick(model, "kernelgate", 1, primary_variant)
        if server1:
            bs1[model] = server1["ms_per_token"]
    return {"ratio_c16": min(ratio.values()) if ratio else None, "ratio_c16_by_model": ratio,
            "ms_per_token_bs1": max(bs1.values()) if bs1 else None, "ms_per_token_bs1_by_model": bs1,
            "targets": {"ratio_c16": ">= 2.0", "ms_per_token_bs1": "<= 3.0"},
            "targets_met": {"ratio_c16": bool(ratio) and min(ratio.values()) >= 2.0,
                            "ms_per_token_bs1": bool(bs1) and max(bs1.values()) <= 3.0}}


def main() -> int:
    args = parse_args()
    import torch

    models = [m for m in args.models.split(",") if m]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    variants = [v for v in args.variants.split(",") if v]
    rows: list[dict] = []
    for model in models:
        rows += bench_hf(model, levels, args)
        for variant in variants:
            rows += bench_server(model, variant, levels, args)
    versions = {"torch": torch.__version__}
    for name in ("transformers", "deepspeed"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - report what is importable
            versions[name] = None
    result = {
        "command": " ".join([f"{k}={shlex.quote(os.environ[k])}" for k in ("TORCH_CUDA_ARCH_LIST", "PYTHONPATH")
                             if os.environ.get(k)] + ["python3"] + [shlex.quote(a) for a in sys.argv]),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "versions": versions,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "dtype": "float16" if args.device == "cuda" else "float32",
        "weights": "random (seeded), same for both systems",
        **summarize(rows, models, args.primary),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
