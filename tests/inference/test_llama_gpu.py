"""The fused decoder's CUDA kernels (Triton, DeepSpeed) against the torch reference (needs a GPU).

Run on the device machine: ``scripts/gpu_bench.sh smoke`` (``pytest -m gpu``). Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from inference.config import ModelConfig
from inference.model_loader import load_model
from inference.ops import TorchOps, select_ops
from inference.runner import ModelRunner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REF = TorchOps()


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 2e-3) -> None:
    assert not got.isnan().any()
    error = float((got.float() - want.float()).norm() / want.float().norm())
    assert error < tol, error


@pytest.mark.parametrize("ops_name", ["triton", "deepspeed"])
def test_norms_and_gated_activation_match_the_reference(ops_name: str) -> None:
    ops = select_ops(ops_name, torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(1)
    for rows, width in ((1, 4096), (37, 3584), (256, 2048)):
        x = torch.randn(rows, 1, width, device="cuda", dtype=torch.float16, generator=gen)
        residual = torch.randn_like(x)
        weight = torch.rand(width, device="cuda", dtype=torch.float16, generator=gen) + 0.5
        _close(ops.rms_norm(x, weight, 1e-5), REF.rms_norm(x, weight, 1e-5))
        normed, total = ops.add_rms_norm(x, residual, weight, 1e-5)
        want_normed, want_total = REF.add_rms_norm(x, residual, weight, 1e-5)
        _close(normed, want_normed)
        assert torch.equal(total, want_total)
        gate_up = torch.randn(rows, 1, 2 * width, device="cuda", dtype=torch.float16, generator=gen)
        ordered = torch.cat(gate_up.chunk(2, -1)[::-1], -1) if ops.up_first else gate_up
        _close(ops.silu_mul(ordered), REF.silu_mul(gate_up))


def test_rotary_matches_the_reference_in_one_launch_or_two() -> None:
    ops = select_ops("triton", torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(2)
    rows, q_len, heads, kv_heads, dim = 3, 5, 8, 2, 128
    qkv = torch.randn(rows, q_len, heads + 2 * kv_heads, dim, device="cuda", dtype=torch.float16, generator=gen)
    cos = torch.rand(rows, q_len, dim, device="cuda", dtype=torch.float16, generator=gen)
    sin = torch.rand(rows, q_len, dim, device="cuda", dtype=torch.float16, generator=gen)
    want_q, want_k = REF.rotary(qkv[:, :, :heads], qkv[:, :, heads:heads + kv_heads], cos, sin)
    got_q, got_k = ops.rotary(qkv[:, :, :heads].clone(), qkv[:, :, heads:heads + kv_heads].clone(), cos, sin)
    _close(got_q, want_q)
    _close(got_k, want_k)
    got_q, got_k = ops.rotary(qkv[:, :, :heads], qkv[:, :, heads:heads + kv_heads], cos, sin)  # adjacent: in place
    _close(got_q, want_q)
    _close(got_k, want_k)


@pytest.mark.parametrize("rows,heads,kv_heads,dim,dtype", [(1, 32, 8, 128, torch.float16), (1, 32, 8, 128, torch.bfloat16),
                                                          (4, 28, 4, 128, torch.float16), (3, 32, 8, 64, torch.float16),
                                                          (2, 8, 8, 64, torch.float16)])
def test_decode_attention_kernel_matches_the_op_by_op_path(rows: int, heads: int, kv_heads: int, dim: int,
                                                           dtype: torch.dtype) -> None:
    """The one-kernel decode step (rotary + cache write + GQA attention) on the GPU at the 8B (batch 1),
    Qwen2.5-7B (group 7), 1B and plain multi-head shapes, against the op-by-op path: buckets with and
    without a split of the keys (the automatic one and forced ones), rows at different positions."""
    from inference import triton_kernels as tk
    from tests.inference.test_triton_decode_attention import _op_by_op

    gen = torch.Generator(device="cuda").manual_seed(3)
    max_len = 2048
    for kv_len, keys_per_split in ((64, None), (256, None), (2048, None), (2048, 128)):
        positions = torch.tensor([kv_len - 1, kv_len // 2, 0, 17][:rows], device="cuda").view(rows, 1)
        keys = torch.randn(rows, kv_heads, max_len, dim, device="cuda", dtype=dtype, generator=gen)
        values = torch.randn_like(keys)
        want_keys, want_values = keys.clone(), values.clone()
        qkv = torch.randn(rows, 1, heads + 2 * kv_heads, dim, device="cuda", dtype=dtype, generator=gen)
        angles = torch.randn(max_len, dim // 2, device="cuda", generator=gen) * 3
        cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
        sin = torch.cat([angles.sin()] * 2, -1).to(dtype)
        got = tk.decode_attention(qkv, heads, cos, sin, positions, keys, values, kv_len, dim ** -0.5, keys_per_split)
        want = _op_by_op(qkv, heads, cos, sin, positions, want_keys, want_values, dim ** -0.5)
        tol = 2e-3 if dtype == torch.float16 else 1e-2
        _close(got, want, tol)
        _close(keys, want_keys, tol)
        assert torch.equal(values, want_values)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_decode_kernel_passes_its_probe_and_is_on(dtype: torch.dtype) -> None:
    from inference.ops import DECODE_PROBE_TOLERANCE, decode_attention_error

    ops = select_ops("triton", torch.device("cuda"), dtype)
    assert ops.decode_attention is not None
    assert decode_attention_error(ops, torch.device("cuda"), dtype) < DECODE_PROBE_TOLERANCE / 4


def test_rotary_kv_kernel_matches_the_reference_on_gpu() -> None:
    from inference import triton_kernels as tk

    gen = torch.Generator(device="cuda").manual_seed(4)
    rows, q_len, heads, kv_heads, dim, max_len = 3, 130, 32, 8, 128, 256
    qkv = torch.randn(rows, q_len, heads + 2 * kv_heads, dim, device="cuda", dtype=torch.float16, generator=gen)
    angles = torch.randn(max_len, dim // 2, device="cuda", generator=gen)
    cos = torch.cat([angles.cos()] * 2, -1).half()
    sin = torch.cat([angles.sin()] * 2, -1).half()
    positions = torch.arange(q_len, device="cuda").expand(rows, q_len)
    caches = [torch.randn(2, rows, kv_heads, max_len, dim, device="cuda", dtype=torch.float16, generator=gen)]
    caches.append(caches[0].clone())
    want = REF.rotary_kv(qkv.clone(), heads, cos, sin, positions, caches[1][0], caches[1][1], positions)
    got = tk.rotary_kv(qkv, heads, cos, sin, positions, caches[0][0], caches[0][1], positions)
    _close(got, want)
    _close(caches[0], caches[1])


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-qwen2"])
def test_triton_decoder_greedy_equals_torch_decoder_with_cuda_graphs(name: str) -> None:
    def greedy(ops: str) -> list[list[int]]:
        loaded = load_model(ModelConfig(name=name, random_config=name, device="cuda", dtype="float16", ops=ops,
                                        use_deepspeed=False))
        runner = ModelRunner(loaded.module, loaded.attention, num_slots=3, max_len=128, dtype=loaded.dtype,
                             device=loaded.device, use_cuda_graphs=True)
        prompts = [[5, 17, 99, 3], list(range(40, 71)), [200, 1, 2, 3]]
        with torch.inference_mode():
            assert runner.capture_decode_graphs() > 0
            tokens = runner.prefill(0, prompts).argmax(-1).tolist()
            out = [[t] for t in tokens]
            for step in range(24):
                tokens = runner.decode(tokens, [len(p) + step for p in prompts]).argmax(-1).tolist()
                for row, token in enumerate(tokens):
                    out[row].append(token)
        return out

    assert greedy("triton") == greedy("torch")


def _hf_fp16(name: str, layers: int):
    from transformers import AutoModelForCausalLM

    from inference.model_configs import random_config

    config = random_config(name)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, torch_dtype=torch.float16, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("ops_name", ["torch", "triton"])
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen2.5-7b"])
def test_fused_decoder_logits_match_hf_on_gpu(name: str, ops_name: str, graphs: bool) -> None:
    """Teacher-forced prefill + decode logits against HF's fp16 forward (2 layers of the real shapes)."""
    import copy

    from inference.attention import SlotAttention
    from inference.llama import FusedLlama

    hf = _hf_fp16(name, 2)
    gen = torch.Generator().manual_seed(5)
    prompts = torch.randint(0, 5000, (3, 40), generator=gen).tolist()
    half = 24
    with torch.inference_mode():
        want = hf(torch.tensor(prompts, device="cuda")).logits.float()
        attention = SlotAttention()
        fused = FusedLlama(copy.deepcopy(hf), attention, select_ops(ops_name, torch.device("cuda")), 128)
        runner = ModelRunner(fused, attention, num_slots=3, max_len=128, dtype=torch.float16,
                             device=torch.device("cuda"), use_cuda_graphs=graphs)
        runner.capture_decode_graphs()
        got = [runner.prefill(0, [p[:half] for p in prompts]).float()]
        for step in range(half, 39):
            got.append(runner.decode([p[step] for p in prompts], [step] * 3).float())
    errors = [float((g - want[:, half - 1 + i]).norm() / want[:, half - 1 + i].norm()) for i, g in enumerate(got)]
    print(name, ops_name, "graphs" if graphs else "eager", [round(e, 5) for e in errors])
    assert max(errors) < 2e-2, errors
