"""The fused decoder's cache-writing Triton kernels, run in Triton's interpreter on the CPU.

* ``triton_kernels.decode_attention``: a decode step's rotary, key/value cache write and
  grouped-query attention in one launch per layer (split over the keys with a reduce launch when
  asked), against the op-by-op path (torch rotary, ``index_put`` cache write, the slot attention's
  masked SDPA): GQA groups 4, 3 (not a power of two) and 1, head sizes 16 to 128, rows at
  different positions (0, the bucket's last column, between), key-length buckets past every row
  (padding), one split and several (some empty), float32 and float16; the cache it leaves behind
  and the projection it must not change are compared too; the probe ``select_ops`` runs before it
  enables the kernel on a device passes, and fails a kernel that forgets rotary. bfloat16 is checked
  on the GPU only (tests/inference/test_llama_gpu.py): Triton's interpreter gets bf16 arithmetic
  wrong (its RMSNorm kernel too).
* ``triton_kernels.rotary_kv``: rotary with the cache write for prefill (several tokens a row,
  positions broadcast over rows as the runner passes them), against ``TorchOps.rotary_kv``.
* a whole decoder (tiny Llama-3 and Qwen2 shapes) through the runner on the Triton op set against
  the torch op set: prefill and decode logits and greedy tokens, across a key-length bucket.

On CUDA they replace two ``index_put`` launches, the rotary launch and cuDNN's SDPA per layer of a
decode step; here they run under ``TRITON_INTERPRET=1`` in a subprocess (the variable must be set
before the kernels are defined, and must not leak into other tests). They are also compiled for
the H200 (sm_90), which needs no GPU. tests/inference/test_llama_gpu.py runs them on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _op_by_op(qkv, heads, cos, sin, positions, keys, values, scale):
    """The torch path of one decode layer: rotary, index_put into the cache, masked grouped SDPA."""
    import torch

    from inference.attention import _grouped_attention
    from inference.ops import TorchOps

    rows, _, _, _ = qkv.shape
    query = TorchOps().rotary_kv(qkv.clone(), heads, cos, sin, positions, keys, values, positions)
    length = keys.shape[2]
    hidden = torch.arange(length, device=qkv.device).view(1, 1, 1, -1) > positions.view(rows, 1, 1, 1)
    mask = torch.zeros(rows, 1, 1, length, dtype=qkv.dtype, device=qkv.device).masked_fill_(hidden, float("-inf"))
    return _grouped_attention(query.transpose(1, 2), keys, values, mask, scale)


def check_decode_kernel() -> None:
    import torch

    from inference import triton_kernels as tk

    gen = torch.Generator().manual_seed(0)
    max_len = 512
    cases = [  # rows, heads, kv_heads, head_dim, kv_len (the bucket), keys_per_split, positions
        (3, 8, 2, 32, 256, None, [255, 5, 128]),      # GQA 4, one split, a row at the bucket's end
        (3, 6, 2, 16, 256, 64, [0, 64, 130]),         # group 3, 4 splits: row 0 sees only itself, empty splits
        (2, 4, 4, 64, 512, 128, [300, 127]),          # no GQA, 4 splits, position at a split's last column
        (1, 32, 8, 128, 256, None, [200]),            # Llama-3.1-8B's heads at batch 1, bucket padding
        (3, 7, 1, 16, 64, None, [63, 1, 0]),          # one key/value head for 7 query heads (MQA)
        (2, 8, 2, 32, 512, None, [511, 256]),         # the automatic split (2 x 256 keys)
    ]
    assert tk.decode_split(2, 2, 512) == (256, 2) and tk.decode_split(1, 8, 256) == (256, 1)
    assert tk.decode_split(1, 8, 2048)[1] == 8 and tk.decode_split(64, 8, 2048)[1] == 1
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 4e-3)):
        for rows, heads, kv_heads, dim, kv_len, keys_per_split, positions in cases:
            keys = torch.randn(rows, kv_heads, max_len, dim, generator=gen).to(dtype)
            values = torch.randn(rows, kv_heads, max_len, dim, generator=gen).to(dtype)
            want_keys, want_values = keys.clone(), values.clone()
            qkv = torch.randn(rows, 1, heads + 2 * kv_heads, dim, generator=gen).to(dtype)
            angles = torch.randn(max_len, dim // 2, generator=gen) * 3
            cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
            sin = torch.cat([angles.sin()] * 2, -1).to(dtype)
            pos = torch.tensor(positions).view(rows, 1)
            before = qkv.clone()
            got = tk.decode_attention(qkv, heads, cos, sin, pos, keys, values, kv_len, dim ** -0.5, keys_per_split)
            want = _op_by_op(qkv, heads, cos, sin, pos, want_keys, want_values, dim ** -0.5)
            case = (dtype, rows, heads, kv_heads, dim, kv_len, keys_per_split)
            assert got.shape == (rows, 1, heads, dim) and got.dtype == dtype, case
            assert torch.equal(qkv, before), case
            assert (got.float() - want.float()).abs().max().item() < tol, case
            # the cache: the new key (rotated in fp32 and rounded once: within one fp16 step of torch's
            # two roundings) and value at each row's position, nothing else touched
            assert torch.equal(values, want_values), case
            assert (keys.float() - want_keys.float()).abs().max().item() <= (0 if dtype == torch.float32 else 4e-3)
            keys[torch.arange(rows), :, pos.view(-1)] = want_keys[torch.arange(rows), :, pos.view(-1)]
            assert torch.equal(keys, want_keys), case
    # the probe select_ops runs before it enables the kernel on a device: passes, and catches a wrong kernel
    from inference.ops import DECODE_PROBE_TOLERANCE, TritonOps, decode_attention_error

    ops = TritonOps()
    for dtype in (torch.float32, torch.float16):  # bf16: on the GPU (the interpreter's bf16 arithmetic is off)
        assert decode_attention_error(ops, torch.device("cpu"), dtype) < DECODE_PROBE_TOLERANCE / 4, dtype
    right = ops.decode_attention
    ops.decode_attention = lambda qkv, heads, cos, sin, *rest: right(qkv, heads, cos * 0 + 1, sin * 0, *rest)
    assert decode_attention_error(ops, torch.device("cpu"), torch.float16) > DECODE_PROBE_TOLERANCE  # no rotary
    try:
        tk.decode_attention(torch.zeros(1, 2, 12, 32), 8, cos, sin, pos, keys, values, 64, 1.0)
    except ValueError as error:
        assert "one token per row" in str(error)
    else:
        raise AssertionError("two tokens a row were accepted")


def check_rotary_kv() -> None:
    import torch

    from inference import triton_kernels as tk
    from inference.ops import TorchOps

    gen = torch.Generator().manual_seed(1)
    max_len = 96
    for dtype in (torch.float32, torch.float16):
        for rows, q_len, heads, kv_heads, dim in ((3, 17, 8, 2, 32), (2, 5, 6, 2, 16), (1, 1, 32, 8, 128)):
            qkv = torch.randn(rows, q_len, heads + 2 * kv_heads, dim, generator=gen).to(dtype)
            angles = torch.randn(max_len, dim // 2, generator=gen) * 3
            cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
            sin = torch.cat([angles.sin()] * 2, -1).to(dtype)
            positions = torch.arange(q_len).expand(rows, q_len)  # a prefill's (stride 0 over rows)
            caches = [torch.randn(2, rows, kv_heads, max_len, dim, generator=gen).to(dtype)]
            caches.append(caches[0].clone())
            want = TorchOps().rotary_kv(qkv.clone(), heads, cos, sin, positions, caches[1][0], caches[1][1], positions)
            got = tk.rotary_kv(qkv, heads, cos, sin, positions, caches[0][0], caches[0][1], positions)
            tol = 0 if dtype == torch.float32 else 4e-3
            assert got.data_ptr() == qkv.data_ptr()  # the query heads, rotated in place
            assert (got.float() - want.float()).abs().max().item() <= tol + 1e-6
            assert (caches[0].float() - caches[1].float()).abs().max().item() <= tol + 1e-6
            assert torch.equal(caches[0][1], caches[1][1])  # values: copied exactly


def counted_triton_ops(calls: list, what: Any = lambda args: args[0].shape[0]) -> Any:
    """The Triton op set, its decode kernel appending ``what(args)`` of each call to ``calls`` (default: rows)."""
    from inference.ops import TritonOps

    ops = TritonOps()
    kernel = ops.decode_attention

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(what(args))
        return kernel(*args, **kwargs)

    ops.decode_attention = counted
    return ops


def check_decoder() -> None:
    """Tiny Llama-3 (GQA 4:1, head 32) and Qwen2 (biases, GQA 3:1, head 16) shapes through the runner:
    the Triton op set (its decode kernel counted) against the torch op set, float32."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from inference import triton_kernels
    from inference.attention import SlotAttention
    from inference.llama import FusedLlama
    from inference.model_configs import random_config
    from inference.ops import TorchOps
    from inference.runner import ModelRunner

    prompts = [[5, 17, 99, 3], list(range(40, 100)), [200, 1, 2]]  # the second crosses the 64-key bucket
    for name in ("tiny-llama3", "tiny-qwen2"):
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(random_config(name)).eval()
        calls: list[int] = []
        triton_ops = counted_triton_ops(calls)
        results = []
        for ops in (TorchOps(), triton_ops):
            attention = SlotAttention()
            model = FusedLlama(copy.deepcopy(hf), attention, ops, 256)
            runner = ModelRunner(model, attention, num_slots=3, max_len=256, dtype=torch.float32,
                                 device=torch.device("cpu"), use_cuda_graphs=False)
            with torch.inference_mode():
                logits = [runner.prefill(0, prompts)]
                tokens = logits[0].argmax(-1).tolist()
                for step in range(8):
                    logits.append(runner.decode(tokens, [len(p) + step for p in prompts]))
                    tokens = logits[-1].argmax(-1).tolist()
            results.append(logits)
        assert len(calls) == 8 * model.config.num_hidden_layers and set(calls) == {3}, calls
        for want, got in zip(*results):
            assert torch.equal(want.argmax(-1), got.argmax(-1)), name
            assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item(), name


def check_compiles() -> None:
    """The kernels compile to a cubin for the H200 (sm_90) with Triton's own ptxas, in the variants the
    GPU runs (the loop to each row's position, one split and several): no GPU needed, so a kernel that
    would fail only at the engine's start-up on the device fails here."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from inference import triton_kernels as tk

    target = GPUTarget("cuda", 90, 32)
    for act in ("*fp16", "*bf16", "*fp32"):
        for split in (False, True):
            consts = {"HEADS": 32, "KV_HEADS": 8, "GROUP": 4, "BLOCK_H": 16, "D": 128, "BLOCK_N": tk.DECODE_BLOCK_N,
                      "SPLIT": split, "IEEE": act == "*fp32", "DYNAMIC_LOOP": True, "STATIC_KEYS": 0}
            signature = {"qkv_ptr": act, "cos_ptr": act, "sin_ptr": act, "pos_ptr": "*i64", "k_ptr": act,
                         "v_ptr": act, "out_ptr": act, "part_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
                         "qkv_row_stride": "i32", "pos_row_stride": "i32", "slot_stride": "i32",
                         "cache_head_stride": "i32", "cache_pos_stride": "i32", "keys_per_split": "i32",
                         "scale_log2": "fp32", **{k: "constexpr" for k in consts}}
            source = ASTSource(fn=tk._decode_kernel, constexprs=consts, signature=signature)
            assert triton.compile(source, target=target, options={"num_warps": 4}).asm["cubin"]
        consts = {"HEADS": 32, "KV_HEADS": 8, "GROUP": 4, "BLOCK_H": 16, "D": 128, "BLOCK_S": 8}
        reduce = ASTSource(fn=tk._decode_reduce_kernel, constexprs=consts,
                           signature={"part_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "out_ptr": act,
                                      "num_splits": "i32", **{k: "constexpr" for k in consts}})
        assert triton.compile(reduce, target=target, options={"num_warps": 4}).asm["cubin"]
        consts = {"HEADS": 32, "KV_HEADS": 8, "HALF": 64}
        rotary = ASTSource(fn=tk._rotary_kv_kernel, constexprs=consts, signature={
            "qkv_ptr": act, "cos_ptr": act, "sin_ptr": act, "pos_ptr": "*i64", "wpos_ptr": "*i64", "k_ptr": act,
            "v_ptr": act, "q_len": "i32", "qkv_row_stride": "i32", "qkv_token_stride": "i32",
            "qkv_head_stride": "i32", "pos_row_stride": "i32", "pos_col_stride": "i32", "wpos_row_stride": "i32",
            "wpos_col_stride": "i32", "slot_stride": "i32", "cache_head_stride": "i32", "cache_pos_stride": "i32",
            **{k: "constexpr" for k in consts}})
        assert triton.compile(rotary, target=target, options={"num_warps": 1}).asm["cubin"]


@pytest.mark.parametrize("check", ["check_decode_kernel", "check_rotary_kv", "check_decoder", "check_compiles"])
def test_against_torch_in_the_triton_interpreter_and_compiled_for_sm90(check: str, tmp_path: Path) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    if check != "check_compiles":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", f"from tests.inference.test_triton_decode_attention import {check}; {check}()"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_the_torch_op_set_keeps_torch_attention() -> None:
    """``model.ops: torch`` (and CPU serving) has no decode kernel: rotary, ``index_put`` and SDPA."""
    from inference.ops import TorchOps

    assert TorchOps().decode_attention is None
