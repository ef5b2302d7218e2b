"""Where a batch-1 decode step's time goes on the GPU: kernels by name, their sum against the step.

In: a named random-weight shape (``--model``, default llama-3.1-8b), the op set (``--ops``).
Out: JSON (``--out``) with the CUDA-graph step time (events, median of 30), the eager step time, the
per-kernel table of one profiled eager step (name, launches, total µs, bytes read where the kernel is a
weight GEMV/GEMM and its achieved GB/s), the sum of kernel times, and the copy bandwidth of the device —
so ``graph step - sum(kernels)`` is the time between kernels and ``weight bytes / sum(GEMM times)`` is how
close the matrix kernels run to the bandwidth. Where the op set has the one-kernel decode attention
(``ops.decode_attention``), the graph step is also timed with attention op by op, interleaved with the fused one.

Run on the GPU (after the wheel install of scripts/gpu_bench.sh):
    python3 bench/decode_step_profile.py --model llama-3.1-8b --out $OUT/decode_step_profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from inference_llama_gpu import copy_bandwidth_gbs, hf_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--ops", default="auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=255)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from inference.attention import SlotAttention
    from inference.llama import FusedLlama
    from inference.ops import select_ops
    from inference.runner import ModelRunner

    device = torch.device("cuda")
    bandwidth = copy_bandwidth_gbs("cuda")
    model = hf_model(args.model, "cuda")
    attention = SlotAttention()
    ops = select_ops(args.ops, device)
    fused_kernel = getattr(ops, "decode_attention", None)
    fused = FusedLlama(model, attention, ops, 2048)
    del model
    torch.cuda.empty_cache()
    batch = args.batch
    tokens, positions = [1] * batch, [args.context] * batch
    result: dict = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(0), "model": args.model,
                    "ops": args.ops, "batch": batch, "context": args.context,
                    "weight_bytes": fused.weight_bytes, "copy_bandwidth_gbs": round(bandwidth, 1),
                    "floor_ms": round(fused.weight_bytes / bandwidth / 1e6, 4), "versions": {"torch": torch.__version__}}

    def timed(runner, n: int = 30) -> float:
        times = []
        for _ in range(n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner.decode(tokens, positions)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times[5:])

    with torch.inference_mode():
        eager = ModelRunner(fused, attention, num_slots=batch, max_len=512, dtype=torch.float16, device=device,
                            use_cuda_graphs=False)
        result["eager_step_ms"] = round(timed(eager), 4)
        for _ in range(3):
            eager.decode(tokens, positions)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                eager.decode(tokens, positions)
            torch.cuda.synchronize()
        del eager
        graphed = ModelRunner(fused, attention, num_slots=batch, max_len=512, dtype=torch.float16, device=device,
                              use_cuda_graphs=True)
        graphed.capture_decode_graphs()
        result["graph_step_ms"] = round(timed(graphed), 4)
        started = time.perf_counter()
        for _ in range(50):
            graphed.decode(tokens, positions)
        torch.cuda.synchronize()
        result["graph_step_ms_back_to_back"] = round((time.perf_counter() - started) * 1000 / 50, 4)
        result["fused_decode_attention"] = fused_kernel is not None
        if fused_kernel is not None:  # the same step with attention op by op (graphs captured so), side by side
            ops.decode_attention = None
            unfused = ModelRunner(fused, attention, num_slots=batch, max_len=512, dtype=torch.float16,
                                  device=device, use_cuda_graphs=True)
            unfused.capture_decode_graphs()
            ops.decode_attention = fused_kernel
            pairs = [(timed(graphed, 15), timed(unfused, 15)) for _ in range(4)]
            result["graph_step_ms_fused_vs_op_by_op"] = [[round(a, 4), round(b, 4)] for a, b in pairs]
            result["graph_step_ms_attention_op_by_op"] = round(statistics.median(b for _, b in pairs), 4)
            result["attention_op_by_op_over_fused"] = round(
                statistics.median(b for _, b in pairs) / statistics.median(a for a, _ in pairs), 4)

    kernels: dict[str, dict] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        row = kernels.setdefault(event.name, {"name": event.name[:160], "launches": 0, "total_us": 0.0})
        row["launches"] += 1
        row["total_us"] += event.device_time
    rows = sorted(kernels.values(), key=lambda r: -r["total_us"])
    for row in rows:
        row["launches"] //= 5
        row["total_us"] = round(row["total_us"] / 5, 2)
    total = sum(r["total_us"] for r in rows)
    result["kernels_per_step"] = sum(r["launches"] for r in rows)
    result["kernel_sum_ms"] = round(total / 1000, 4)
    result["between_kernels_ms_graph"] = round(result["graph_step_ms"] - total / 1000, 4)
    gemm = sum(r["total_us"] for r in rows if "gemv" in r["name"].lower() or "gemm" in r["name"].lower()
               or "sm90" in r["name"].lower() or "cutlass" in r["name"].lower())
    result["gemm_ms"] = round(gemm / 1000, 4)
    result["gemm_gbs_if_all_weights"] = round(fused.weight_bytes / (gemm / 1e6) / 1e9, 1) if gemm else None
    result["kernels"] = rows[:40]
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "kernels"}, indent=2))
    for row in rows[:25]:
        print(f"{row['launches']:5d} {row['total_us']:10.1f} us  {row['name'][:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
