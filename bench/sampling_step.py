"""What one sampling step costs the engine thread, with each #20 option on vs off (no model, no HTTP).

A batch of ``--batch`` greedy sequences over a ``--vocab`` vocabulary (gpt2's 50257 by default)
samples ``--steps`` steps from fixed random logits, as the engine does after each decode step:
off, logprobs 5, penalties (presence and frequency 0.5), logit_bias (10 ids), and all of them;
on CUDA also ``logprobs_torch``: logprobs 5 through the op-by-op torch path (log-softmax, gather,
topk, casts, cat) that the Triton kernels of :mod:`inference.triton_logprobs` replace there, side
by side in the same run. For each mode: wall and CPU time per step (median of ``--repeats``
runs), aten ops per step that are not views (``kernels_per_step``, counted with a dispatch mode;
a Triton launch is not an aten op), on CUDA the kernels CUPTI saw (``cuda_kernels_per_step``),
and device waits per step. Each mode's row is printed as soon as it is measured (logprobs second).
``--baseline REV`` runs the sampler of git revision REV (``inference/sampling.py`` as it was,
API of ``next_tokens``) side by side, interleaved, on the same logits.

On the GPU the engine is host-bound at c16 (a gpt2-medium decode step is ~0.3 ms of kernels
but ~3 ms of Python), so the host time per step measured here is what the options cost the
served tokens/s. ``--device cuda`` also works (it synchronizes once per step, as the engine).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from inference.generation import SamplingParams  # noqa: E402
from inference.sampling import RequestSampler, SlotSampling  # noqa: E402

MODES: dict[str, dict[str, Any]] = {
    "off": {},
    "logprobs": {"logprobs": 5},
    "logprobs_torch": {"logprobs": 5},  # CUDA only: the op-by-op torch path the Triton kernels replace
    "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5},
    "logit_bias": {"logit_bias": tuple((i * 97, 1.0) for i in range(10))},
    "all": {"logprobs": 5, "presence_penalty": 0.5, "frequency_penalty": 0.5,
            "logit_bias": tuple((i * 97, 1.0) for i in range(10))},
}


class _Kernels(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def current(params: SamplingParams, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
            fused: bool | None = None) -> tuple[Callable, Callable]:
    sampling = SlotSampling(args.batch, args.vocab, device, logits_dtype=dtype, fused_logprobs=fused)
    if device.type == "cuda" and fused is None and not sampling.fused_logprobs:
        raise RuntimeError("the Triton logprobs kernels are not in use on CUDA (see the log above)")
    samplers = [RequestSampler(params, device) for _ in range(args.batch)]
    for slot, sampler in enumerate(samplers):
        sampling.admit(slot, sampler)
    return (lambda logits: sampling.pick(logits, 0, samplers)), (lambda: sampling.host_syncs)


def baseline(module: types.ModuleType, params: SamplingParams, args: argparse.Namespace,
             device: torch.device) -> tuple[Callable, Callable]:
    buffers = module.SamplingBuffers(args.batch, args.vocab, device)
    samplers = [module.RequestSampler(params, device, counts=buffers.counts) for _ in range(args.batch)]
    return (lambda logits: module.next_tokens(logits, samplers, buffers)), (lambda: -1)


def load_baseline(rev: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{rev}:inference/sampling.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("baseline_sampling")
    sys.modules[module.__name__] = module  # its dataclasses look their module up
    exec(compile(source, f"{rev}:inference/sampling.py", "exec"), module.__dict__)  # noqa: S102
    return module


def cuda_kernels(step: Callable, logits: torch.Tensor) -> int | None:
    """CUDA kernels one step launches, as CUPTI sees them (torch.topk is several; a Triton launch is one)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(logits)
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - a count we cannot take is recorded as missing, not guessed
        print(f"cuda kernel count unavailable: {exc}", flush=True)
        return None
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset")))


def op_breakdown(logits: torch.Tensor, k: int = 5, reps: int = 200) -> dict[str, float]:
    """CUDA: microseconds per call of each op of the torch logprobs path, and of the Triton path,
    each run ``reps`` times back to back between two events (so a call costs the larger of its
    launch and its kernels): where the op-by-op path spends its time."""
    from inference.triton_logprobs import logprob_table

    choices = logits.argmax(dim=-1)
    raw = logits.log_softmax(dim=-1, dtype=torch.float32)
    top_ids = raw.topk(k, dim=-1)[1]
    ops: dict[str, Callable[[], Any]] = {
        "log_softmax_fp32": lambda: logits.log_softmax(dim=-1, dtype=torch.float32),
        "gather": lambda: raw.gather(1, choices.view(-1, 1)),
        "topk_fp32_logprobs": lambda: raw.topk(k, dim=-1),
        "topk_logits": lambda: logits.topk(k, dim=-1),
        "casts_and_cat": lambda: torch.cat([choices.view(-1, 1).float(), raw[:, :1], raw[:, :k], top_ids.float()], 1),
        "triton_logprob_table": lambda: logprob_table(logits, choices, k),
    }
    out = {}
    for name, op in ops.items():
        op()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            op()
        end.record()
        end.synchronize()
        out[name] = round(1000 * start.elapsed_time(end) / reps, 1)
    return out


def measure(step: Callable, logits: torch.Tensor, steps: int, device: torch.device) -> tuple[float, float]:
    """Wall and CPU microseconds per step."""
    step(logits)  # warm-up (allocations)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(logits)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (1e6 * (time.perf_counter() - wall) / steps, 1e6 * (time.process_time() - cpu) / steps)


def git_commit() -> str:
    """This tree's commit (KG_COMMIT where there is no git, as on the device machines)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:
        out = ""
    return out.strip() or os.environ.get("KG_COMMIT", "unknown")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--baseline", default=None, help="git revision of the sampler to compare with")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the engine's CPU share)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    logits = (torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(0)) * 3).to(device, dtype)
    old = load_baseline(args.baseline) if args.baseline else None
    results: dict[str, Any] = {}
    with torch.inference_mode():
        for mode, extra in MODES.items():
            if mode == "logprobs_torch" and device.type != "cuda":
                continue  # on the CPU, logprobs is this path already
            params = SamplingParams(max_tokens=1 << 30, temperature=0.0, **extra)
            runs: dict[str, list[tuple[float, float]]] = {"current": []}
            fused = False if mode == "logprobs_torch" else None
            makers = {"current": lambda: current(params, args, device, dtype, fused)}  # noqa: B023
            if old is not None:
                runs["baseline"] = []
                makers["baseline"] = lambda: baseline(old, params, args, device)  # noqa: B023
            row: dict[str, Any] = {}
            for name, make in makers.items():
                step, syncs = make()
                step(logits)
                before = syncs()
                with _Kernels() as kernels:
                    step(logits)
                row[name] = {"kernels_per_step": kernels.count}  # aten ops that are not views
                if name == "current":
                    row[name]["host_waits_per_step"] = syncs() - before
                if device.type == "cuda":
                    row[name]["cuda_kernels_per_step"] = cuda_kernels(step, logits)
            for _ in range(args.repeats):  # interleaved: drift hits both alike
                for name, make in makers.items():
                    runs[name].append(measure(make()[0], logits, args.steps, device))
            for name, values in runs.items():
                row[name]["wall_us_per_step"] = round(statistics.median(v[0] for v in values), 1)
                row[name]["cpu_us_per_step"] = round(statistics.median(v[1] for v in values), 1)
            results[mode] = row
            print(mode, json.dumps(row), flush=True)
    ops = None
    if device.type == "cuda":
        with torch.inference_mode():
            ops = op_breakdown(logits)
        print("logprobs ops, us a call:", json.dumps(ops), flush=True)
    for name in ("current", "baseline"):
        if name in results["off"]:
            off = results["off"][name]["cpu_us_per_step"]
            for mode in results:
                results[mode][name]["added_cpu_us_per_step"] = round(results[mode][name]["cpu_us_per_step"] - off, 1)
    head = git_commit()
    out = {"command": "python3 bench/sampling_step.py " + shlex.join(sys.argv[1:]),
           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({args.threads} thread)",
           "torch": torch.__version__, "commit": head.strip(), "baseline": args.baseline,
           "batch": args.batch, "vocab": args.vocab, "steps": args.steps, "repeats": args.repeats,
           "logprobs_path": "triton" if device.type == "cuda" else "torch", "modes": results,
           "logprobs_ops_us": ops}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
