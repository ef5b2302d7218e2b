"""A decode step's attention part alone, per layer, old path against the Triton kernels (GPU).

In: a named shape (``--model``, default llama-3.1-8b: 32 query heads over 8 key/value heads of 128),
batch sizes and key-length buckets. For each, the attention part of all layers (random qkv, a full
slot cache) is captured in one CUDA graph, as in the real decode step (launch gaps included), and
replayed; the time per layer is the graph's median / layers. Variants:

* ``op_by_op``: Triton rotary + two ``index_put`` cache writes + the slot attention's masked SDPA
  (what the step ran before; ``model.ops: torch`` still does with torch rotary);
* ``rotary_kv+sdpa``: the rotary kernel that writes the cache + masked SDPA;
* ``decode_kernel``: rotary + cache write + attention in one kernel (the split ``decode_split``
  picks), and ``decode_kernel_kps<N>``: the same with N keys per split forced (2 launches when
  split), to see where splitting pays at this batch and context.

Then (``--gemv``, default on) the step's weight products at batch 1, the other half of #19's
launch count: cuBLAS (``F.linear``: split-K + a reduce kernel for the o and down projections at
M = 1) against a plain Triton GEMV (one launch, no split) in a few tile shapes, each over 32
distinct weight matrices in one CUDA graph (so nothing is served from L2), with the achieved GB/s
and the GEMV's error against cuBLAS: whether routing M = 1 products off cuBLAS would pay.

Out: JSON (``--out``) of µs per layer by (batch, kv bucket, variant), with the device and versions.
Run on the GPU (after the wheel install of scripts/gpu_bench.sh; ~20 s):
    python3 bench/decode_attention_gpu.py --out $OUT/decode_attention_gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--kv", default="256,1024,2048")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--out", required=True)
    parser.add_argument("--gemv", type=int, default=1, help="1: also time the weight products at batch 1")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (TRITON_INTERPRET=1, eager)")
    args = parser.parse_args()

    import torch
    import triton

    from inference import triton_kernels as tk
    from inference.attention import AttentionBatch, SlotAttention
    from inference.kv_cache import KVGeometry, SlotKVCache
    from inference.model_configs import random_config
    from inference.runner import additive_mask

    config = random_config(args.model)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    layers = args.layers
    max_kv = max(int(k) for k in args.kv.split(","))
    result: dict = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "model": args.model,
                    "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "layers_per_graph": layers,
                    "versions": {"torch": torch.__version__, "triton": triton.__version__}, "us_per_layer": {}}
    ops = tk  # the Triton kernels
    for batch in (int(b) for b in args.batches.split(",")):
        cache = SlotKVCache(KVGeometry(layers, kv_heads, dim), batch, max_kv, dtype, device)
        cache.storage.normal_()
        qkv = torch.randn(batch, 1, heads + 2 * kv_heads, dim, dtype=dtype, device=device)
        qkvs = [qkv.clone() for _ in range(layers)]  # rotated in place by the first two variants: no copy kernel
        angles = torch.randn(max_kv, dim // 2, device=device)
        cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
        sin = torch.cat([angles.sin()] * 2, -1).to(dtype)
        columns = torch.arange(max_kv, device=device)
        for kv_len in (int(k) for k in args.kv.split(",")):
            positions = torch.full((batch, 1), kv_len - 1, dtype=torch.long, device=device)  # the bucket's end
            allowed = columns[:kv_len].view(1, 1, 1, kv_len) <= positions.view(batch, 1, 1, 1)
            attention = SlotAttention()
            attention.cache = cache
            attention.batch = AttentionBatch(first_slot=0, num_rows=batch, kv_len=kv_len,
                                             row_index=torch.arange(batch, device=device).view(-1, 1),
                                             write_positions=positions, mask=additive_mask(allowed, dtype))
            scale = dim ** -0.5

            def op_by_op(layer: int) -> None:
                q = qkvs[layer]
                cs, sn = cos[positions], sin[positions]
                query, key = ops.rotary(q[:, :, :heads], q[:, :, heads:heads + kv_heads], cs, sn)
                attention.attend(layer, query.transpose(1, 2), key.transpose(1, 2),
                                 q[:, :, heads + kv_heads:].transpose(1, 2), scale)

            def rotary_kv_sdpa(layer: int) -> None:
                keys, values, b = attention.layer_cache(layer)
                query = ops.rotary_kv(qkvs[layer], heads, cos, sin, positions, keys, values, b.write_positions)
                attention.attend_cached(layer, query.transpose(1, 2), scale)

            def fused(keys_per_split: int | None):
                def run(layer: int) -> None:
                    keys, values, b = attention.layer_cache(layer)
                    tk.decode_attention(qkv, heads, cos, sin, b.write_positions, keys, values, kv_len, scale,
                                        keys_per_split)
                return run

            variants = {"op_by_op": op_by_op, "rotary_kv+sdpa": rotary_kv_sdpa, "decode_kernel": fused(None)}
            for kps in (64, 128, 256, 512, 1024):
                if kps < kv_len:
                    variants[f"decode_kernel_kps{kps}"] = fused(kps)
            row = result["us_per_layer"].setdefault(f"batch{batch}_kv{kv_len}", {})
            row["auto_split"] = list(tk.decode_split(batch, kv_heads, kv_len))
            for name, step in variants.items():
                row[name] = round(_graph_us(step, layers) if device.type == "cuda" else _eager_us(step, layers), 2)
            print(f"batch {batch:3d} kv {kv_len:5d}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
            Path(args.out).write_text(json.dumps(result, indent=2))  # each row as it comes (a timeout keeps them)
    if args.gemv:
        result["gemv_batch1"] = {}
        _gemv_table(config, device, dtype, layers, result["gemv_batch1"],
                    lambda: Path(args.out).write_text(json.dumps(result, indent=2)))
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


GEMV_TILES = ((8, 512, 4), (16, 512, 4), (4, 1024, 4), (16, 256, 4), (32, 256, 8), (64, 128, 8))


def _gemv_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(x_ptr, w_ptr, out_ptr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + (k0 + ks)[None, :])
            x = tl.load(x_ptr + k0 + ks).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty))

    return gemv


def _gemv_table(config, device, dtype, layers: int, table: dict, save) -> None:
    """µs and GB/s per product of the 8B-style weight shapes at M = 1, cuBLAS against Triton GEMV tiles, into
    ``table`` (``save()`` after each shape)."""
    import torch
    import torch.nn.functional as F

    gemv = _gemv_kernel()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    hidden, inner = config.hidden_size, config.intermediate_size
    shapes = {"qkv": ((heads + 2 * kv_heads) * dim, hidden), "o": (hidden, heads * dim),
              "gate_up": (2 * inner, hidden), "down": (hidden, inner)}
    for name, (n, k) in shapes.items():
        weights = [torch.randn(n, k, dtype=dtype, device=device) * 0.02 for _ in range(layers)]
        x = torch.randn(1, k, dtype=dtype, device=device)
        outs = [torch.empty(1, n, dtype=dtype, device=device) for _ in range(layers)]
        nbytes = n * k * weights[0].element_size()
        row = {"n": n, "k": k, "mb": round(nbytes / 1e6, 1)}
        timer = _graph_us if device.type == "cuda" else _eager_us
        cublas = timer(lambda layer: F.linear(x, weights[layer]), layers)  # as the decoder calls it
        row["cublas_us"] = round(cublas, 2)
        row["cublas_gbs"] = round(nbytes / cublas / 1e3, 1)
        want = F.linear(x, weights[0]).float()
        for block_n, block_k, warps in GEMV_TILES:
            if n % block_n or k % block_k:
                continue

            def run(layer: int, block_n=block_n, block_k=block_k, warps=warps) -> None:
                gemv[(n // block_n,)](x, weights[layer], outs[layer], K=k, BLOCK_N=block_n, BLOCK_K=block_k,
                                      num_warps=warps)

            us = timer(run, layers)
            run(0)
            error = float((outs[0].float() - want).norm() / want.norm())
            row[f"triton_{block_n}x{block_k}w{warps}"] = {"us": round(us, 2), "gbs": round(nbytes / us / 1e3, 1),
                                                         "rel_error": float(f"{error:.2e}")}
        print(f"gemv {name}: {row}", flush=True)
        table[name] = row
        save()
        del weights, outs
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _graph_us(step, layers: int) -> float:
    """µs per layer of ``step(layer)`` for every layer, captured as one CUDA graph (median of 30 replays)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for layer in range(layers):  # warm-up (Triton compiles) outside the graph
            step(layer)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layers):
            step(layer)
    times = []
    for _ in range(35):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[5:]) * 1000 / layers


def _eager_us(step, layers: int) -> float:
    """The CPU dry run: one eager pass (no meaning as a time)."""
    import time

    started = time.perf_counter()
    for layer in range(layers):
        step(layer)
    return (time.perf_counter() - started) * 1e6 / layers


if __name__ == "__main__":
    raise SystemExit(main())
