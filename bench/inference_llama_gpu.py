"""GPU benchmark of the Llama-family shapes: kernelgate's fused decoder against HF ``generate``, and the floor.

For each named random-weight shape (``llama-3.2-1b``, ``llama-3.1-8b``, ``qwen2.5-7b``; fp16,
the same seeded weights for both systems), prompts of 128 and 1024 random token ids and
exactly ``--new-tokens`` generated tokens (EOS ignored):

* ``floor``: the weights' bytes over the device-to-device copy bandwidth measured in this run
  (bytes read + written): the time one decode step needs to read every weight once.
* ``step``: kernelgate's decode step alone, in process (CUDA-graph replay at batch 1 and 64),
  the number the floor ratio is about.
* ``hf_generate``: ``model.generate`` on a static batch of ``c`` prompts (greedy); its time to
  first token is ``generate`` with one new token at batch 1.
* ``kernelgate``: ``python -m kernelgate.cli serve`` in a child process driven by ``c`` concurrent
  HTTP clients sending requests back to back; time to first token and decode time per token
  come from the server's own histograms (``/metrics``) over the batch-1 run.
* ``check``: at ``--check-model`` (1B), logits of the fused decoder against HF's forward on the
  same weights (relative error, fp16) and greedy tokens of the server path against ``generate``.

``floor_ratio_bs1`` = kernelgate's decode ms/token at batch 1 (server metric) / floor;
``ratio_c64_over_hf`` = kernelgate tokens/s at concurrency 64 / HF's at batch 64 (prompt 128).
With ``--tp N`` the server runs with ``model.tp_size`` N (one GPU per rank) and the result also
records greedy equality with ``tp_size`` 1 under ``tp<N>``: tokens and whether the logits of every
step are bitwise equal (``logits_equal``, ``logits_max_abs_diff``), and the server's tokens/s at
``tp_size`` N and 1. ``--numerics default,tp_invariant`` does all of that for each ``model.numerics``
(the first's figures at the top of ``tp<N>.<model>``, the others' under ``tp<N>.<model>.<numerics>``),
so the cost of the tensor-parallel-invariant mode is in the same file. Writes ``--out`` with the
command, device and versions. ``scripts/gpu_bench.sh`` runs it on the device machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from inference_gpu import drive, prompts_for, scrape, start_server, stop_server  # noqa: E402

MODELS = "llama-3.1-8b,llama-3.2-1b,qwen2.5-7b"
TTFT = "kernelgate_inference_time_to_first_token_seconds"
TPOT = "kernelgate_inference_time_per_output_token_seconds"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--prompt-tokens", default="128,1024")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--ops", default="auto", help="model.ops of the server (auto: Triton kernels)")
    parser.add_argument("--step-ops", default="", help="op sets to time the in-process decode step with "
                        "(comma list; default: --ops)")
    parser.add_argument("--tp", type=int, default=1, help="model.tp_size of the server (one GPU per rank)")
    parser.add_argument("--numerics", default="default",
                        help="model.numerics, comma list: with --tp N each is checked (tp N vs 1) and timed")
    parser.add_argument("--numerics-shards", type=int, default=0, help="model.numerics_shards of tp_invariant")
    parser.add_argument("--dtype", default="auto", help="model dtype (auto: float16 on CUDA, float32 on the CPU)")
    parser.add_argument("--check-model", default="llama-3.2-1b", help="'' skips the HF equality check")
    parser.add_argument("--skip", default="", help="comma list of parts to leave out: hf,server,step")
    parser.add_argument("--out", default=str(ROOT / "bench/results/inference_llama_gpu.json"))
    parser.add_argument("--log-dir", default=os.environ.get("OUT", "/tmp"))
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--step-timeout", type=float, default=300.0,
                        help="seconds a child step (a tensor-parallel greedy check) may take before it is killed")
    parser.add_argument("--greedy-worker", metavar="MODEL",
                        help="internal: write MODEL's greedy tokens with --tp ranks to --out (and its logits to "
                             "--logits-out) and exit (a child process, so the bench itself never joins a process "
                             "group)")
    parser.add_argument("--logits-out", help="internal: where the greedy worker saves its logits (torch.save)")
    parser.add_argument("--merge", nargs="+", metavar="RESULT",
                        help="no GPU: merge these result files (e.g. a later Qwen or tp2 run) into --out and exit")
    return parser.parse_args()


def copy_bandwidth_gbs(device: str) -> float:
    """Device-to-device copy of 2 GiB (64 MiB on the CPU), (read + write bytes) / median time of 10."""
    import torch

    count = 1 << 30 if device == "cuda" else 1 << 25
    src = torch.empty(count, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(13):
        sync(device)
        started = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - started)
    del src, dst
    return 2 * 2 * count / statistics.median(times[3:]) / 1e9


def hf_model(name: str, device: str):
    import torch

    from inference.model_configs import random_config
    from inference.model_loader import build_random

    dtype = torch.float16 if device == "cuda" else torch.float32
    # seed 0, the server's default model.seed: the same weights
    return build_random(random_config(name), 0, torch.device(device), dtype).eval()


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def bench_hf(name: str, model, prompt_lengths: list[int], levels: list[int], args: argparse.Namespace) -> list[dict]:
    import torch

    rows = []
    vocab = model.config.vocab_size
    for length in prompt_lengths:
        for concurrency in levels:
            batch = torch.tensor(prompts_for(vocab, concurrency, length), device=args.device)

            def run(new: int, batch: torch.Tensor = batch) -> float:
                started = time.perf_counter()
                model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, pad_token_id=0)
                sync(args.device)
                return time.perf_counter() - started

            with torch.inference_mode():
                run(2)
                ttft = statistics.median(run(1) for _ in range(3)) if concurrency == 1 else None
                seconds = run(args.new_tokens)
            tokens = concurrency * args.new_tokens
            row = {"model": name, "system": "hf_generate", "prompt_tokens": length, "concurrency": concurrency,
                   "completion_tokens": tokens, "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1)}
            if ttft is not None:
                row["ttft_ms"] = round(1000 * ttft, 2)
                row["decode_ms_per_token"] = round(1000 * (seconds - ttft) / (args.new_tokens - 1), 3)
            rows.append(row)
            print(f"[hf] {name} p={length} c={concurrency}: {row['tokens_per_s']} tok/s", flush=True)
    return rows


def check_against_hf(name: str, model, args: argparse.Namespace) -> dict:
    """Fused decoder logits vs HF forward, teacher-forced, on the same weights (fp16)."""
    import copy

    import torch

    from inference.attention import SlotAttention
    from inference.llama import FusedLlama
    from inference.ops import select_ops
    from inference.runner import ModelRunner

    prompts = prompts_for(model.config.vocab_size, 4, 64, seed=7)
    with torch.inference_mode():
        reference = model(torch.tensor(prompts, device=args.device)).logits.float()
        attention = SlotAttention()
        fused = FusedLlama(copy.deepcopy(model), attention, select_ops(args.ops, torch.device(args.device)), 128)
        runner = ModelRunner(fused, attention, num_slots=4, max_len=128, dtype=torch.float16,
                             device=torch.device(args.device), use_cuda_graphs=True)
        runner.capture_decode_graphs()
        half = 48
        got = [runner.prefill(0, [p[:half] for p in prompts]).float()]
        for step in range(half, 63):
            got.append(runner.decode([p[step] for p in prompts], [step] * 4).float())
    want = [reference[:, half - 1 + i] for i in range(len(got))]
    errors = [float((g - w).norm() / w.norm()) for g, w in zip(got, want)]
    agree = sum(int((g.argmax(-1) == w.argmax(-1)).sum()) for g, w in zip(got, want))
    del fused, runner
    torch.cuda.empty_cache()
    return {"model": name, "logits_max_relative_error": round(max(errors), 6), "argmax_agreement":
            f"{agree}/{4 * len(got)}", "teacher_forced_positions": len(got), "ops": args.ops}


def greedy_tokens_hf(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import torch

    out = []
    with torch.inference_mode():
        for prompt in prompts:
            batch = torch.tensor([prompt], device=model.device)
            gen = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            out.append(gen[0, len(prompt):].tolist())
    return out


def greedy_fused(name: str, prompts: list[list[int]], new_tokens: int, tp: int, args: argparse.Namespace,
                 write_to: Path | None = None, numerics: str = "default", logits_to: Path | None = None):
    """Greedy tokens of kernelgate's decoder (the engine's runner, CUDA graphs on), ``tp`` ranks, and the
    logits of every step ``[steps, rows, vocab]`` (on the CPU, in the model's dtype).

    Token ids, not text: the random shapes' vocabularies are far larger than the demo tokenizer's.
    """
    import torch

    from inference.config import BatchingConfig, ModelConfig
    from inference.model_loader import load_model
    from inference.runner import ModelRunner

    config = ModelConfig(name=name, random_config=name, device=args.device, dtype=_dtype(args), ops=args.ops,
                         tp_size=tp, max_model_len=256, numerics=numerics,
                         numerics_shards=args.numerics_shards if numerics == "tp_invariant" else 0)
    group = None
    if tp > 1:
        from inference.tensor_parallel import TensorParallelGroup
        from common.processes import free_port

        group = TensorParallelGroup(config, BatchingConfig(max_batch_size=len(prompts)), free_port())
        loaded = group.load(config, len(prompts))
    else:
        loaded = load_model(config, len(prompts))
    runner = ModelRunner(loaded.module, loaded.attention, num_slots=len(prompts), max_len=256, dtype=loaded.dtype,
                         device=loaded.device, use_cuda_graphs=True)
    if group is not None:
        runner = group.mirror(runner)
    out: list[list[int]] = [[] for _ in prompts]
    steps = []
    try:
        with torch.inference_mode():
            runner.capture_decode_graphs()
            steps.append(runner.prefill(0, prompts).cpu())
            tokens = steps[-1].argmax(-1).tolist()
            for step in range(new_tokens):
                for row, token in enumerate(tokens):
                    out[row].append(token)
                if step + 1 < new_tokens:
                    steps.append(runner.decode(tokens, [len(p) + step for p in prompts]).cpu())
                    tokens = steps[-1].argmax(-1).tolist()
        logits = torch.stack(steps)
        if logits_to is not None:
            torch.save(logits, logits_to)
        if write_to is not None:  # before the group's teardown, which has blocked on NCCL
            write_to.parent.mkdir(parents=True, exist_ok=True)
            write_to.write_text(json.dumps({"model": name, "tp_size": tp, "numerics": numerics, "tokens": out}))
    except BaseException:
        logging.getLogger("kernelgate.bench").exception("greedy run of %s with tp_size %d failed", name, tp)
        raise
    finally:
        if group is not None:
            runner.close()
            group.close()
    del loaded, runner
    torch.cuda.empty_cache()
    return out, logits


def greedy_prompts(name: str) -> list[list[int]]:
    from inference.model_configs import random_config

    return prompts_for(random_config(name).vocab_size, 3, 32, seed=3)


def greedy_in_child(name: str, tp: int, args: argparse.Namespace, numerics: str = "default"):
    """``greedy_fused`` with ``tp`` ranks in a child process, killed after ``--step-timeout``: its tokens and
    logits (the logits go through a file outside ``--log-dir``, which is the device call's output).

    Rank 0 of the group is the child, not this process: a group formed and left per model in
    one process is what hung the first two-GPU run (the follower exited without leaving the
    NCCL group, and rank 0's ``destroy_process_group`` waited for it forever), and a child
    can always be killed.
    """
    import subprocess

    import tempfile

    import torch

    out = Path(args.log_dir) / f"greedy-{name}-tp{tp}-{numerics}.json"
    logits = Path(tempfile.mkdtemp(prefix="kg-greedy-")) / "logits.pt"
    command = [sys.executable, str(Path(__file__).resolve()), "--greedy-worker", name, "--tp", str(tp),
               "--device", args.device, "--ops", args.ops, "--out", str(out), "--log-dir", args.log_dir,
               "--dtype", args.dtype, "--numerics", numerics, "--numerics-shards", str(args.numerics_shards),
               "--logits-out", str(logits)]
    out.unlink(missing_ok=True)
    child = subprocess.Popen(command)
    deadline, written_at = time.monotonic() + args.step_timeout, None
    while child.poll() is None:
        if written_at is None and out.exists():
            written_at = time.monotonic()
        if time.monotonic() > deadline or (written_at is not None and time.monotonic() - written_at > 30):
            child.kill()
            child.wait()
            if written_at is None:
                raise RuntimeError(f"greedy check of {name} with tp_size {tp} took more than {args.step_timeout:.0f}s")
            print(f"[{name}] tp{tp} greedy worker wrote its tokens but did not exit within 30 s "
                  "(the group's teardown; its log has the ranks' stacks): killed", file=sys.stderr, flush=True)
            break
        time.sleep(0.2)
    if child.returncode not in (0, -9) or not out.exists():
        raise RuntimeError(f"greedy check of {name} with tp_size {tp} failed (exit {child.returncode})")
    got = torch.load(logits)
    logits.unlink()
    logits.parent.rmdir()
    return json.loads(out.read_text())["tokens"], got


def tp_check(name: str, prompts: list[list[int]], args: argparse.Namespace, numerics: str) -> dict:
    """Greedy tokens and every step's logits with ``tp_size`` 1 (this process) against ``--tp`` (a child)."""
    (want, want_logits), (got, got_logits) = (greedy_fused(name, prompts, 32, 1, args, numerics=numerics),
                                              greedy_in_child(name, args.tp, args, numerics))
    same_shape = want_logits.shape == got_logits.shape
    diff = float((want_logits.float() - got_logits.float()).abs().max()) if same_shape else None
    return {"numerics": numerics, "greedy_equal": want == got,
            "greedy_common_prefix": [_common_prefix(a, b) for a, b in zip(want, got)],
            "logits_equal": same_shape and bool((want_logits == got_logits).all()), "logits_max_abs_diff": diff}


def step_times(name: str, model, args: argparse.Namespace) -> dict:
    """kernelgate's decode step alone (graph replay), batch 1 and 64, 256 cached tokens, per op set.

    Consumes the HF model (the last op set takes its weights; earlier ones a copy).
    """
    import copy

    import torch

    from inference.attention import SlotAttention
    from inference.llama import FusedLlama
    from inference.ops import select_ops
    from inference.runner import ModelRunner

    result: dict = {}
    op_sets = [o for o in (args.step_ops or args.ops).split(",") if o]
    for index, ops_name in enumerate(op_sets):
        attention = SlotAttention()
        source = model if index == len(op_sets) - 1 else copy.deepcopy(model)
        fused = FusedLlama(source, attention, select_ops(ops_name, torch.device("cuda")), 2048)
        del source
        result["weight_bytes_fused"] = fused.weight_bytes
        for batch in (1, 64):
            runner = ModelRunner(fused, attention, num_slots=batch, max_len=512, dtype=torch.float16,
                                 device=torch.device("cuda"), use_cuda_graphs=True)
            with torch.inference_mode():
                runner.capture_decode_graphs()
                times = []
                for _ in range(30):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    runner.decode([1] * batch, [255] * batch)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
            suffix = "" if ops_name == op_sets[-1] else f"_{ops_name}"
            result[f"step_ms_bs{batch}{suffix}"] = round(statistics.median(times[5:]), 4)
            del runner
        del fused
        torch.cuda.empty_cache()
    return result


def start_llama_server(name: str, prompt_lengths: list[int], levels: list[int], args: argparse.Namespace, tp: int,
                       numerics: str = "default", env: dict[str, str] | None = None):
    """The kernelgate server of ``bench_server``, started and ready: (process, port, log path)."""
    max_len = 2 ** (max(prompt_lengths) + args.new_tokens - 1).bit_length()
    model_keys = {"ops": args.ops, "tp_size": tp, "max_model_len": max_len, "dtype": args.dtype, "numerics": numerics}
    if numerics == "tp_invariant":
        model_keys["numerics_shards"] = args.numerics_shards
    variant = f"fused-tp{tp}" + ("" if numerics == "default" else f"-{numerics}")
    return start_server(name, variant, max(levels), args, model_keys, env)


def one_gpu_servers(name: str, length: int, levels: list[int], args: argparse.Namespace, modes: list[str]) -> list:
    """One-GPU servers of every numerics mode, started side by side on GPUs 0, 1, ... (their start-up is
    most of their time) where there are enough GPUs (or on the CPU), to be measured one at a time; else
    Nones (each ``bench_server`` starts its own in turn)."""
    import torch

    if len(modes) < 2 or (args.device == "cuda" and torch.cuda.device_count() < len(modes)):
        return [None] * len(modes)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(modes)) as pool:
        futures = [pool.submit(start_llama_server, name, [length], levels, args, 1, mode,
                               {"CUDA_VISIBLE_DEVICES": str(gpu)}) for gpu, mode in enumerate(modes)]
    started = [f.result() for f in futures if f.exception() is None]
    if len(started) < len(futures):
        for proc, _, _ in started:
            stop_server(proc)
        raise next(f.exception() for f in futures if f.exception() is not None)
    return started


def bench_server(name: str, prompt_lengths: list[int], levels: list[int], args: argparse.Namespace,
                 tp: int, numerics: str = "default", server=None) -> tuple[list[dict], dict]:
    """kernelgate's tokens/s, time to first token and decode time per token at each prompt length and
    concurrency; ``server``: one already started by :func:`start_llama_server` (stopped here too)."""
    from inference.model_configs import random_config

    vocab = random_config(name).vocab_size
    proc, port, log_path = server or start_llama_server(name, prompt_lengths, levels, args, tp, numerics)
    rows, extra = [], {}
    try:
        for length in prompt_lengths:
            for concurrency in levels:
                per_client = {1: 3, 16: 2}.get(concurrency, 1)
                prompts = prompts_for(vocab, concurrency * per_client, length, seed=1)
                before = {m: (scrape(port, m + "_sum"), scrape(port, m + "_count")) for m in (TTFT, TPOT)}
                tokens, seconds, latencies = asyncio.run(drive(port, name, prompts, concurrency, per_client,
                                                               args.new_tokens))
                mean = {m: (scrape(port, m + "_sum") - s) / max(1.0, scrape(port, m + "_count") - c)
                        for m, (s, c) in before.items()}
                row = {"model": name, "system": "kernelgate", "tp_size": tp, "numerics": numerics,
                       "prompt_tokens": length,
                       "concurrency": concurrency, "requests": len(latencies), "completion_tokens": tokens,
                       "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
                       "ttft_ms": round(1000 * mean[TTFT], 2), "decode_ms_per_token": round(1000 * mean[TPOT], 3)}
                rows.append(row)
                print(f"[kernelgate tp{tp} {numerics}] {name} p={length} c={concurrency}: {row['tokens_per_s']} tok/s, "
                      f"ttft {row['ttft_ms']} ms, decode {row['decode_ms_per_token']} ms/token", flush=True)
        text = log_path.read_text()
        extra["backend"] = next((line.split("(")[1].split(" backend")[0] for line in text.splitlines()
                                 if " ready (" in line), "unknown")
    finally:
        stop_server(proc)
    return rows, extra


def write_result(args: argparse.Namespace, bandwidth: float, lengths: list[int], by_model: dict, checks: list,
                 rows: list, tp_section: dict) -> dict:
    """Write ``--out`` (also after each model, so a run cut short keeps what it measured)."""
    import torch

    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for module in ("transformers", "deepspeed", "triton"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - report what is importable
            versions[module] = None
    result = {
        "command": " ".join(([f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])}"] if os.environ.get("PYTHONPATH") else [])
                            + ["python3"] + [shlex.quote(a) for a in sys.argv]),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "gpus": torch.cuda.device_count() if args.device == "cuda" else 0, "versions": versions,
        "dtype": _dtype(args), "weights": "random (seeded), the same for both systems",
        "prompt_tokens": lengths, "new_tokens": args.new_tokens, "ops": args.ops,
        "copy_bandwidth_gbs": round(bandwidth, 1),
        "targets": {"llama-3.1-8b": {"floor_ratio_bs1": "<= 1.3", "ratio_c64_over_hf": ">= 5"}},
        "by_model": by_model, "checks": checks, "rows": rows,
    }
    if args.tp > 1:
        result[f"tp{args.tp}"] = tp_section
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def merge(out: Path, parts: list[Path]) -> dict:
    """Fold later runs into one result: by_model, rows, checks and tp sections; each run's command kept."""
    result = json.loads(out.read_text()) if out.exists() else {}
    runs = result.setdefault("runs", [{k: result.get(k) for k in ("command", "device", "gpus", "run_with")}])
    for path in parts:
        part = json.loads(path.read_text())
        runs.append({k: part.get(k) for k in ("command", "device", "gpus", "run_with")})
        for name, info in part.get("by_model", {}).items():
            result.setdefault("by_model", {}).setdefault(name, {}).update(info)
            result.get("not_run", {}).pop(name, None)
        key = lambda r: (r["model"], r["system"], r.get("tp_size", 1), r.get("numerics", "default"),  # noqa: E731
                         r["prompt_tokens"], r["concurrency"])
        fresh = {key(r) for r in part.get("rows", [])}
        result["rows"] = [r for r in result.get("rows", []) if key(r) not in fresh] + part.get("rows", [])
        result["checks"] = result.get("checks", []) + part.get("checks", [])
        for section in (k for k in part if k.startswith("tp") and k[2:].isdigit()):
            merged = result.setdefault(section, {})
            for name, figures in part[section].items():  # per model: keys the run did not write stay
                if isinstance(merged.get(name), dict) and isinstance(figures, dict):
                    merged[name].update(figures)
                else:
                    merged[name] = figures
            result.get("not_run", {}).pop(section, None)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> int:
    args = parse_args()
    if args.merge:
        merge(Path(args.out), [Path(p) for p in args.merge])
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s rank0 %(name)s: %(message)s")
    if args.greedy_worker:
        greedy_fused(args.greedy_worker, greedy_prompts(args.greedy_worker), 32, args.tp, args, Path(args.out),
                     args.numerics, Path(args.logits_out) if args.logits_out else None)
        return 0
    import torch

    models = [m for m in args.models.split(",") if m]
    lengths = [int(x) for x in args.prompt_tokens.split(",") if x]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    skip = set(args.skip.split(","))
    modes = [m for m in args.numerics.split(",") if m]
    bandwidth = copy_bandwidth_gbs(args.device)
    print(f"copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    rows: list[dict] = []
    by_model: dict[str, dict] = {}
    checks = []
    tp_section: dict[str, dict] = {}
    for name in models:
        model = hf_model(name, args.device)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        floor_ms = weight_bytes / (bandwidth * 1e9) * 1000
        info: dict = {"weight_bytes": weight_bytes, "copy_bandwidth_gbs": round(bandwidth, 1),
                      "floor_ms_per_token_bs1": round(floor_ms, 3)}
        if name == args.check_model:
            checks.append(check_against_hf(name, model, args))
            print(f"[check] {checks[-1]}", flush=True)
        if "hf" not in skip:
            rows += bench_hf(name, model, lengths, levels, args)
        prompts = greedy_prompts(name)
        if name == args.check_model:
            want = greedy_tokens_hf(model, prompts, 32)
            got = greedy_fused(name, prompts, 32, 1, args, numerics=modes[0])[0]
            info["greedy_equal_hf"] = want == got
            info["greedy_common_prefix_hf"] = [_common_prefix(a, b) for a, b in zip(want, got)]
        if "step" not in skip and args.tp == 1:
            info.update(step_times(name, model, args))  # consumes the HF model
        del model
        torch.cuda.empty_cache()
        if args.tp > 1:  # first every mode's equality check (the point of the run), then the servers
            tp_section[name] = {}
            for mode in modes:
                section = _mode_section(tp_section[name], mode, modes)
                section.update(tp_check(name, prompts, args, mode))
                if mode == "tp_invariant":
                    section["numerics_shards"] = args.numerics_shards or "auto"
                print(f"[tp{args.tp}] {name} {mode}: {json.dumps(section)}", flush=True)
                write_result(args, bandwidth, lengths, by_model, checks, rows, tp_section)
        if "server" not in skip:
            server_rows, extra = bench_server(name, lengths, levels, args, args.tp, modes[0])
            rows += server_rows
            info["backend"] = extra["backend"]
            if args.tp > 1:
                top = max(levels)
                for mode in modes:
                    section = _mode_section(tp_section[name], mode, modes)
                    if mode != modes[0]:
                        server_rows, _ = bench_server(name, lengths[:1], [1, top], args, args.tp, mode)
                        rows += server_rows
                    section[f"tp{args.tp}"] = {"tokens_per_s_c1": _pick(server_rows, lengths[0], 1),
                                               f"tokens_per_s_c{top}": _pick(server_rows, lengths[0], top)}
                    write_result(args, bandwidth, lengths, by_model, checks, rows, tp_section)
                servers = one_gpu_servers(name, lengths[0], [1, top], args, modes)
                try:
                    for index, mode in enumerate(modes):
                        server, servers[index] = servers[index], None  # bench_server stops it
                        one_rows, _ = bench_server(name, lengths[:1], [1, top], args, 1, mode, server)
                        rows += one_rows
                        _mode_section(tp_section[name], mode, modes)["tp1"] = {
                            "tokens_per_s_c1": _pick(one_rows, lengths[0], 1),
                            f"tokens_per_s_c{top}": _pick(one_rows, lengths[0], top)}
                        write_result(args, bandwidth, lengths, by_model, checks, rows, tp_section)
                finally:
                    for server in servers:  # those not measured (a failure before them)
                        if server is not None:
                            stop_server(server[0])
        ours = next((r for r in rows if r["model"] == name and r["system"] == "kernelgate"
                     and r.get("tp_size") == args.tp and r.get("numerics") == modes[0]
                     and r["prompt_tokens"] == lengths[0] and r["concurrency"] == 1), None)
        if ours:
            info["decode_ms_per_token_bs1"] = ours["decode_ms_per_token"]
            info["floor_ratio_bs1"] = round(ours["decode_ms_per_token"] / floor_ms, 3)
        if "step_ms_bs1" in info:
            info["step_floor_ratio_bs1"] = round(info["step_ms_bs1"] / floor_ms, 3)
        hf64 = _pick(rows, lengths[0], max(levels), name, "hf_generate")
        ours64 = _pick([r for r in rows if r.get("tp_size") == args.tp and r.get("numerics") == modes[0]],
                       lengths[0], max(levels), name)
        if hf64 and ours64:
            info[f"ratio_c{max(levels)}_over_hf"] = round(ours64 / hf64, 2)
        if args.tp == 1:
            by_model[name] = info
        else:  # a tensor-parallel run's own figures stay in its section (by_model is one GPU's)
            tp_section.setdefault(name, {})["server"] = info
        print(f"[{name}] {json.dumps(info)}", flush=True)
        write_result(args, bandwidth, lengths, by_model, checks, rows, tp_section)
    result = write_result(args, bandwidth, lengths, by_model, checks, rows, tp_section)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0


def _dtype(args: argparse.Namespace) -> str:
    if args.dtype != "auto":
        return args.dtype
    return "float16" if args.device == "cuda" else "float32"


def _mode_section(section: dict, mode: str, modes: list[str]) -> dict:
    """Where a numerics mode's figures go in a model's ``tp<N>`` section: the first mode's at its top
    (as before there were modes), every other under its name."""
    return section if mode == modes[0] else section.setdefault(mode, {})


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy continuations share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _pick(rows: list[dict], length: int, concurrency: int, model: str | None = None,
          system: str = "kernelgate") -> float | None:
    row = next((r for r in rows if r["system"] == system and r["prompt_tokens"] == length
                and r["concurrency"] == concurrency and (model is None or r["model"] == model)), None)
    return row["tokens_per_s"] if row else None


if __name__ == "__main__":
    sys.exit(main())
