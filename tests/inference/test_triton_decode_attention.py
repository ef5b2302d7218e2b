"""The one-kernel decode attention (``inference.triton_kernels.decode_attention``: rotary, KV-cache
write and grouped-query attention of a decode step), run in Triton's interpreter on the CPU.

On CUDA it replaces the op-by-op path of every layer of a decode step; here it runs under
``TRITON_INTERPRET=1`` in a subprocess (the variable must be set before the kernels are
defined, and must not leak into other tests) and is compared with that op-by-op path (the torch
rotary, the slot attention's cache write and grouped attention): the probe the op set runs
before enabling it, and a whole tiny-llama decoder's decode steps with and without the kernel.
It is also compiled for the H200 (sm_90), which needs no GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def check_probe() -> None:
    import torch

    from inference import triton_kernels
    from inference.ops import TorchOps, decode_attention_error

    for dtype in (torch.float32, torch.float16):
        error = decode_attention_error(triton_kernels.decode_attention, TorchOps(), torch.device("cpu"), dtype)
        assert error < (1e-4 if dtype == torch.float32 else 2e-2), (dtype, error)

    def wrong(qkv, keys, values, positions, cos, sin, heads, kv_heads, scaling, kv_len):  # forgets rotary
        return triton_kernels.decode_attention(qkv, keys, values, positions, torch.ones_like(cos),
                                               torch.zeros_like(sin), heads, kv_heads, scaling, kv_len)

    assert decode_attention_error(wrong, TorchOps(), torch.device("cpu"), torch.float32) > 1e-2


def check_decoder() -> None:
    """A small Llama (GQA: 4 query heads over 2, head_dim 32, 2 layers) through the runner: decode
    steps with the kernel give the logits and tokens of the op-by-op path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from inference import triton_kernels
    from inference.attention import SlotAttention
    from inference.llama import FusedLlama
    from inference.ops import TorchOps
    from inference.runner import ModelRunner

    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    prompts = [[5, 17, 99, 3], list(range(40, 166)), [200, 1, 2]]
    outputs, calls = [], []

    def counted(*args):
        calls.append(args[0].shape[0])
        return triton_kernels.decode_attention(*args)

    with torch.inference_mode():
        for kernel in (None, counted):
            torch.manual_seed(0)
            attention = SlotAttention()
            ops = TorchOps()
            ops.decode_attention = kernel
            model = FusedLlama(LlamaForCausalLM(config).eval(), attention, ops, 256)
            runner = ModelRunner(model, attention, num_slots=3, max_len=256, dtype=torch.float32,
                                 device=torch.device("cpu"), use_cuda_graphs=False)
            logits = runner.prefill(0, prompts)
            tokens, positions, steps = logits.argmax(-1), [len(p) for p in prompts], []
            for _ in range(6):  # row 1 crosses from the second key block into the third
                logits = runner.decode(tokens.tolist(), positions)
                steps.append(logits)
                tokens, positions = logits.argmax(-1), [p + 1 for p in positions]
            outputs.append(torch.stack(steps))
    assert calls == [3] * 6 * 2  # every decode step of both layers went through the kernel, none of the prefill
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(outputs[1].argmax(-1), outputs[0].argmax(-1))


def check_compiles() -> None:
    """The kernel compiles to a cubin for the H200 (sm_90) at the 8B shape (32 heads over 8, head_dim
    128) and the 1B shape (head_dim 64), fp16 and bf16: a kernel that would fail on the device fails here."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from inference import triton_kernels as t

    for dtype in ("*fp16", "*bf16"):
        for heads, kv_heads, dim in ((32, 8, 128), (32, 8, 64), (28, 4, 128)):
            group = heads // kv_heads
            constexprs = {"BLOCKS": 4, "HEADS": heads, "KV_HEADS": kv_heads, "GROUP": group,
                          "GROUP_PAD": max(16, triton.next_power_of_2(group)), "DIM": dim, "BLOCK_N": 64}
            signature = {"qkv_ptr": dtype, "k_cache_ptr": dtype, "v_cache_ptr": dtype, "pos_ptr": "*i64",
                         "cos_ptr": dtype, "sin_ptr": dtype, "out_ptr": dtype, "qkv_row_stride": "i32",
                         "cache_slot_stride": "i32", "cache_head_stride": "i32", "scaling": "fp32",
                         **{name: "constexpr" for name in constexprs}}
            source = ASTSource(fn=t._decode_attention_kernel, constexprs=constexprs, signature=signature)
            assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["cubin"]


@pytest.mark.parametrize("check", ["check_probe", "check_decoder", "check_compiles"])
def test_against_the_op_by_op_path_in_the_triton_interpreter_and_compiled_for_sm90(check: str, tmp_path: Path) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    if check != "check_compiles":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c",
                           f"from tests.inference.test_triton_decode_attention import {check}; {check}()"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
