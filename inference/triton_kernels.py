"""Fused Triton kernels of the Llama-family decoder (CUDA only; imported by ``inference.ops``).

In: fp16/bf16/fp32 activations on a CUDA device. Out: the same dtype, with the rounding
points of transformers' modules kept (the sum before the norm, the normalized value before
the weight, SiLU before the product), so greedy tokens match the op-by-op reference.

* :func:`rms_norm`: optional residual add, then RMSNorm; one program per token row.
* :func:`silu_mul`: ``silu(gate) * up`` over ``[gate | up]``.
* :func:`rotary`: rotate-half rotary embedding of query and key, in place, one launch for both
  when key directly follows query in the fused QKV output (as in :class:`inference.llama.FusedLlama`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, width, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * width + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(res_ptr + row * width + cols, mask=mask, other=0.0)
        tl.store(sum_ptr + row * width + cols, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / width
    normed = (xf * (1.0 / tl.sqrt(variance + eps))).to(x.dtype)
    weight = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * width + cols, weight * normed, mask=mask)


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x [+ residual]) * weight, x [+ residual])`` over the last dimension."""
    width = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else x
    rows = x.numel() // width
    block = triton.next_power_of_2(width)
    _rms_norm_kernel[(rows,)](x, residual.contiguous() if residual is not None else x, weight, out, total, width,
                              eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
                              num_warps=min(16, max(4, block // 256)))
    return out, total


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, inner, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inner
    gate = tl.load(gate_up_ptr + row * 2 * inner + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * 2 * inner + inner + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(up.dtype)
    tl.store(out_ptr + row * inner + cols, silu * up, mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate_up = gate_up.contiguous()
    inner = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], inner, dtype=gate_up.dtype, device=gate_up.device)
    rows = gate_up.numel() // (2 * inner)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(inner, block))](gate_up, out, inner, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, token_stride, head_stride, HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    base = x_ptr + token * token_stride + head * head_stride
    offs = tl.arange(0, HALF)
    x1 = tl.load(base + offs)
    x2 = tl.load(base + HALF + offs)
    c1 = tl.load(cos_ptr + token * 2 * HALF + offs).to(tl.float32)
    c2 = tl.load(cos_ptr + token * 2 * HALF + HALF + offs).to(tl.float32)
    s1 = tl.load(sin_ptr + token * 2 * HALF + offs).to(tl.float32)
    s2 = tl.load(sin_ptr + token * 2 * HALF + HALF + offs).to(tl.float32)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base + offs, (f1 * c1 - f2 * s1).to(x1.dtype))
    tl.store(base + HALF + offs, (f2 * c2 + f1 * s2).to(x1.dtype))


def _rotate_in_place(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate ``heads`` heads starting at ``x`` (``[rows, q_len, heads, head_dim]`` strided view)."""
    rows, q_len, _, dim = x.shape
    _rotary_kernel[(rows * q_len, heads)](x, cos, sin, x.stride(1), x.stride(2), HALF=dim // 2, num_warps=1)


def rotary(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``query``/``key`` ``[rows, q_len, heads, head_dim]`` in place; ``cos``/``sin`` ``[rows, q_len, head_dim]``."""
    rows, q_len, heads, dim = query.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    if dim & (dim - 1) or query.stride(1) * q_len != query.stride(0) or query.stride(3) != 1:
        raise ValueError(f"rotary kernel needs a power-of-two head_dim and token-major rows, got {tuple(query.shape)}")
    adjacent = (key.stride() == query.stride() and query.stride(2) == dim
                and key.data_ptr() == query.data_ptr() + heads * dim * query.element_size())
    if adjacent:  # one launch for query and key heads together
        _rotate_in_place(query, heads + key.shape[2], cos, sin)
    else:
        _rotate_in_place(query, heads, cos, sin)
        _rotate_in_place(key, key.shape[2], cos, sin)
    return query, key
