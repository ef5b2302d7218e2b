"""What one sampling step costs the engine thread, with each #20 option on vs off (no model, no HTTP).

A batch of ``--batch`` greedy sequences over a ``--vocab`` vocabulary (gpt2's 50257 by default)
samples ``--steps`` steps from fixed random logits, as the engine does after each decode step:
off, logprobs 5, penalties (presence and frequency 0.5), logit_bias (10 ids), and all of them.
For each mode: wall and CPU time per step (median of ``--repeats`` runs), kernels launched per
step (aten ops that are not views, counted with a dispatch mode) and device waits per step.
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


def current(params: SamplingParams, args: argparse.Namespace, device: torch.device) -> tuple[Callable, Callable]:
    sampling = SlotSampling(args.batch, args.vocab, device)
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
            params = SamplingParams(max_tokens=1 << 30, temperature=0.0, **extra)
            runs: dict[str, list[tuple[float, float]]] = {"current": []}
            makers = {"current": lambda: current(params, args, device)}
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
                row[name] = {"kernels_per_step": kernels.count}
                if name == "current":
                    row[name]["host_waits_per_step"] = syncs() - before
            for _ in range(args.repeats):  # interleaved: drift hits both alike
                for name, make in makers.items():
                    runs[name].append(measure(make()[0], logits, args.steps, device))
            for name, values in runs.items():
                row[name]["wall_us_per_step"] = round(statistics.median(v[0] for v in values), 1)
                row[name]["cpu_us_per_step"] = round(statistics.median(v[1] for v in values), 1)
            results[mode] = row
            print(mode, json.dumps(row), flush=True)
    for name in ("current", "baseline"):
        if name in results["off"]:
            off = results["off"][name]["cpu_us_per_step"]
            for mode in MODES:
                results[mode][name]["added_cpu_us_per_step"] = round(results[mode][name]["cpu_us_per_step"] - off, 1)
    head = git_commit()
    out = {"command": "python3 bench/sampling_step.py " + shlex.join(sys.argv[1:]),
           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({args.threads} thread)",
           "torch": torch.__version__, "commit": head.strip(), "baseline": args.baseline,
           "batch": args.batch, "vocab": args.vocab, "steps": args.steps, "repeats": args.repeats,
           "modes": results}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
