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

tokens/s of a window: the completion tokens of the requests that finished after the window's first
completion, over the time from that completion to the window's last one (the c clients run in
lock-step waves, so counting to the window's deadline would quantize the rate by a whole wave).
``overhead_pct.<mode> = 100 * (1 - tokens_per_s[mode] / tokens_per_s[off])`` from the mean over
rounds; ``overhead_pct_median`` from the median of the per-round ratios (each mode's window against
the ``off`` window of the same round). Targets: logprobs and penalties <= 10 %.

So that it cannot measure the wrong thing quietly, every response is checked (logprobs present with
``logprobs`` alternatives for every token, n choices, JSON that parses, every token generated), the
server must report CUDA graphs on when ``--device cuda``, each window records the mean decode batch
the engine ran (from its Prometheus histogram: it must be the concurrency), and a probe prompt must
show that penalties change greedy choices, token by token (:func:`probe`; the bench fails if not). Writes ``--out`` with the per-window rows, the checks, the
command, the device, torch and the git commit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import subprocess
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


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far; 0 where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def window(url: str, mode: str, args: argparse.Namespace, prompts: list[list[int]],
                 server_pid: int | None = None) -> dict:
    import aiohttp

    clients = args.concurrency // 4 if mode == "n4" else args.concurrency
    deadline = time.perf_counter() + args.window_s
    finished: list[tuple[float, int]] = []  # (when, completion tokens) of each request
    errors: list[str] = []

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            prompt = prompts[(index * 997 + i) % len(prompts)]
            i += 1
            async with session.post(url, json=body_for(mode, args.model, prompt, args.new_tokens)) as resp:
                data = await resp.json()
            if resp.status != 200:
                errors.append(str(data)[:300])
                return
            problem = check_response(mode, data, args.new_tokens)
            if problem:
                errors.append(problem)
                return
            now = time.perf_counter()
            if now <= deadline:
                finished.append((now, data["usage"]["completion_tokens"]))

    metrics_url = url.replace("/v1/completions", "/metrics")
    before = await decode_batches(metrics_url)
    cpu_before, wall_before = cpu_seconds(server_pid), time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(client(session, i) for i in range(clients)))
    after = await decode_batches(metrics_url)
    server_cpu, wall = cpu_seconds(server_pid) - cpu_before, time.perf_counter() - wall_before
    if errors:
        raise RuntimeError(f"{mode}: {errors[0]}")
    finished.sort()
    if len({when for when, _ in finished}) < 2:
        raise RuntimeError(f"{mode}: fewer than two completions in a {args.window_s}s window; make it longer")
    first = finished[0][0]
    counted = [(when, tokens) for when, tokens in finished if when > first]
    seconds = counted[-1][0] - first
    tokens = sum(t for _, t in counted)
    steps = after[0] - before[0]
    return {"mode": mode, "clients": clients, "requests": len(finished), "counted_requests": len(counted),
            "completion_tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "decode_steps": int(steps), "mean_decode_batch": round((after[1] - before[1]) / steps, 2) if steps else None,
            # the server's CPU time per generated token (all its threads: engine, event loop, exporters), and how
            # many cores it kept busy: where the host, not the GPU, sets the pace, this is what an option costs
            "server_cpu_us_per_token": round(1e6 * server_cpu / (after[1] - before[1]), 1) if after[1] > before[1] else None,
            "server_cores_busy": round(server_cpu / wall, 2)}


def check_response(mode: str, data: dict, new_tokens: int) -> str | None:
    """What is wrong with a response for ``mode`` (None: it is what the mode asks for)."""
    choices = data.get("choices") or []
    want_choices = 4 if mode == "n4" else 1
    if len(choices) != want_choices:
        return f"{mode}: {len(choices)} choices, expected {want_choices}"
    used = data["usage"]["completion_tokens"]
    if mode != "json_schema" and used != want_choices * new_tokens:
        return f"{mode}: {used} completion tokens, expected {want_choices * new_tokens} (ignore_eos)"
    for choice in choices:
        logprobs = choice.get("logprobs")
        if mode == "logprobs":
            if not logprobs or len(logprobs["token_logprobs"]) != new_tokens or len(logprobs["top_logprobs"]) != new_tokens:
                return f"logprobs: expected {new_tokens} token log-probabilities, got {str(logprobs)[:200]}"
            if not all(isinstance(v, float) and v <= 0.0 for v in logprobs["token_logprobs"]) \
                    or not all(top for top in logprobs["top_logprobs"]):
                return f"logprobs: bad values {str(logprobs)[:200]}"
        elif logprobs is not None:
            return f"{mode}: logprobs in a response that did not ask for them"
        if mode == "json_schema":
            try:
                value = json.loads(choice["text"])
            except ValueError:
                return f"json_schema: output is not JSON: {choice['text'][:200]!r}"
            if not isinstance(value, dict) or len(value.get("t", "")) != new_tokens:
                return f"json_schema: output does not match the schema: {choice['text'][:200]!r}"
    return None


async def decode_batches(metrics_url: str) -> tuple[float, float]:
    """(decode steps, sequences in them) so far, from the server's batch-size histogram."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(metrics_url) as resp:
        text = await resp.text()
    values = {}
    for line in text.splitlines():
        for key in ("_count", "_sum"):
            if line.startswith(f"kernelgate_inference_batch_size{key}") and 'phase="decode"' in line:
                values[key] = float(line.rsplit(" ", 1)[1])
    return values.get("_count", 0.0), values.get("_sum", 0.0)


PROBE_PENALTY = 2.0  # presence and frequency: a random model's greedy output repeats tokens, so this must change it


async def probe(url: str, args: argparse.Namespace, prompt: list[int]) -> dict:
    """Do penalties change what greedy decoding chooses? Compared by token, not by text: the demo
    tokenizer has 259 tokens, so a random gpt2-medium's ids above 258 all decode to "" and two
    different outputs read the same (that made the previous text probe blind). Every request
    asks ``logprobs: 1``, which reports the model's own log-probabilities before the penalties:
    without penalties every chosen token must be the top-1 (greedy is argmax); with them, a step
    that chose anything but the model's top-1 is a step the penalties changed. With
    ``PROBE_PENALTY`` none such is an error: the bench stops rather than measure an option that
    does not run. The measured setting (0.5) is probed too, and recorded."""
    import aiohttp

    async def departures(session: aiohttp.ClientSession, penalty: float) -> int:
        body = {**body_for("off", args.model, prompt, args.new_tokens), "logprobs": 1,
                "presence_penalty": penalty, "frequency_penalty": penalty}
        async with session.post(url, json=body) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"probe request failed: {resp.status} {data}")
        lp = data["choices"][0]["logprobs"]
        chosen, top = lp["token_logprobs"], [max(alternatives.values()) for alternatives in lp["top_logprobs"]]
        if len(chosen) != args.new_tokens:
            raise RuntimeError(f"probe: {len(chosen)} tokens, asked for {args.new_tokens}")
        return sum(1 for c, t in zip(chosen, top) if c < t - 1e-6)

    async with aiohttp.ClientSession() as session:
        plain = await departures(session, 0.0)
        strong = await departures(session, PROBE_PENALTY)
        measured = await departures(session, 0.5)
    if plain:
        raise RuntimeError(f"probe: greedy without penalties chose a token other than the top-1 at {plain} steps")
    if not strong:
        raise RuntimeError(f"penalties {PROBE_PENALTY} did not change a single greedy choice in "
                           f"{args.new_tokens} tokens: penalties are not applied on this path")
    return {"penalties_change_greedy_output": True,
            "penalty_probe_steps_changed": {"0.0": plain, str(PROBE_PENALTY): strong, "0.5": measured},
            "penalty_probe_tokens": args.new_tokens}


def start_inference_alone(name: str, config: dict, log_dir: Path, env: dict[str, str]):
    """The inference server alone, from ``config`` (a kernelgate config dict with an ``inference``
    section): kernelgate.cli would load every section and need Envoy's config libraries, which the
    GPU image lacks. Returns the process (common.processes.Proc); its log is ``log_dir/name.log``."""
    import yaml

    config_path = log_dir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    serve = ("import sys, yaml; from common.settings import build; from inference.config import InferenceConfig; "
             "from inference.server import run; "
             "run(build(InferenceConfig, yaml.safe_load(open(sys.argv[1]))['inference'], 'inference'))")
    return start(name, [sys.executable, "-c", serve, str(config_path)], log_dir, env=env)


def main() -> int:
    args = parse_args()
    import torch

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
    server = start_inference_alone("sampling-overhead-server", config, log_dir, {"PYTHONUNBUFFERED": "1"})
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 256, (256, args.prompt_tokens), generator=gen).tolist()  # the demo tokenizer's bytes
    url = f"http://127.0.0.1:{port}/v1/completions"
    rows: list[dict] = []
    checks: dict = {}
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=args.ready_timeout, proc=server)
        log_lines = server.log_path.read_text(errors="replace").splitlines()  # appended to: this run's are last
        ready_line = next((line for line in reversed(log_lines) if " ready (" in line), "")
        checks["server"] = ready_line.split(" - ")[-1].strip() or None
        if args.device == "cuda" and "CUDA graphs on" not in ready_line:
            raise RuntimeError(f"the server is not decoding with CUDA graphs: {ready_line or server.log_tail()}")
        path_line = next((line for line in reversed(log_lines) if "log-probabilities: " in line), "")
        checks["logprobs_path"] = path_line.rsplit("log-probabilities: ", 1)[-1].strip() or None
        if args.device == "cuda" and checks["logprobs_path"] != "Triton kernels":
            raise RuntimeError(f"the server computes logprobs with {checks['logprobs_path']}, not the Triton kernels")
        checks.update(asyncio.run(probe(url, args, prompts[0])))  # raises if penalties change nothing
        print("penalty probe:", json.dumps(checks["penalty_probe_steps_changed"]), flush=True)
        for mode in modes:  # warm-up: first requests of each mode (grammar compile, allocations)
            asyncio.run(window(url, mode, argparse.Namespace(**{**vars(args), "window_s": 1.0}), prompts))
        for round_ in range(args.rounds):
            for mode in modes:
                row = asyncio.run(window(url, mode, args, prompts, server.popen.pid))
                row["round"] = round_
                rows.append(row)
                print(f"[round {round_}] {mode}: {row['tokens_per_s']} tok/s ({row['requests']} requests, "
                      f"mean decode batch {row['mean_decode_batch']})", flush=True)
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
    median = {m: round(statistics.median(values), 2) for m, values in per_round.items()}
    device = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:  # no git on the device machines
        commit = ""
    result = {
        "command": "python3 bench/sampling_overhead.py " + shlex.join(sys.argv[1:]),
        "device": device, "torch": torch.__version__,
        "commit": commit or os.environ.get("KG_COMMIT", "unknown"),
        "checks": checks,
        "model": args.model, "concurrency": args.concurrency, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "deepspeed": args.deepspeed, "window_s": args.window_s, "rounds": args.rounds,
        "tokens_per_s": tps, "overhead_pct": overhead, "overhead_pct_by_round": per_round,
        "overhead_pct_median": median,
        "targets": {"logprobs": "<= 10", "penalties": "<= 10"},
        "targets_met": {m: overhead[m] <= 10.0 for m in ("logprobs", "penalties") if m in overhead},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("device", "checks", "tokens_per_s", "overhead_pct", "overhead_pct_median",
                                             "targets_met")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
