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


@triton.jit
def _decode_attention_kernel(qkv_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr,
                             qkv_row_stride, cache_slot_stride, cache_head_stride, scaling,
                             BLOCKS: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                             GROUP_PAD: tl.constexpr, DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (row, key/value head): rotate its query heads and its new key, write the new key and
    value into the cache at the row's position, attend over columns 0..position (online softmax in
    fp32; the new token's own column from registers, so no program reads what it just wrote).
    ``BLOCKS`` key blocks cover the step's key-length bucket; columns at or past the row's
    position are masked (the loop bound is the bucket's, not the row's: a constant of each graph)."""
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    HALF: tl.constexpr = DIM // 2
    pos = tl.load(pos_ptr + row)
    half = tl.arange(0, HALF)
    dims = tl.arange(0, DIM)
    c1 = tl.load(cos_ptr + row * DIM + half).to(tl.float32)
    c2 = tl.load(cos_ptr + row * DIM + HALF + half).to(tl.float32)
    s1 = tl.load(sin_ptr + row * DIM + half).to(tl.float32)
    s2 = tl.load(sin_ptr + row * DIM + HALF + half).to(tl.float32)
    base = qkv_ptr + row * qkv_row_stride
    # the new key (rotated, rounded to the cache's dtype as the op-by-op path stores it) and value
    k_base = base + (HEADS + kv_head) * DIM
    k1 = tl.load(k_base + half)
    k2 = tl.load(k_base + HALF + half)
    f1, f2 = k1.to(tl.float32), k2.to(tl.float32)
    k1 = (f1 * c1 - f2 * s1).to(k1.dtype)
    k2 = (f2 * c2 + f1 * s2).to(k2.dtype)
    v_new = tl.load(base + (HEADS + KV_HEADS + kv_head) * DIM + dims)
    cache_off = row * cache_slot_stride + kv_head * cache_head_stride
    tl.store(k_cache_ptr + cache_off + pos * DIM + half, k1)
    tl.store(k_cache_ptr + cache_off + pos * DIM + HALF + half, k2)
    tl.store(v_cache_ptr + cache_off + pos * DIM + dims, v_new)
    # the GROUP query heads of this key/value head, rotated and rounded like the op-by-op path
    g = tl.arange(0, GROUP_PAD)
    g_mask = g < GROUP
    q_base = base + (kv_head * GROUP + g)[:, None] * DIM
    q1 = tl.load(q_base + half[None, :], mask=g_mask[:, None], other=0.0)
    q2 = tl.load(q_base + HALF + half[None, :], mask=g_mask[:, None], other=0.0)
    f1, f2 = q1.to(tl.float32), q2.to(tl.float32)
    q1 = (f1 * c1[None, :] - f2 * s1[None, :]).to(q1.dtype)
    q2 = (f2 * c2[None, :] + f1 * s2[None, :]).to(q2.dtype)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for block in range(0, BLOCKS):
        at = block * BLOCK_N + cols
        valid = at < pos
        k_rows = k_cache_ptr + cache_off + at[:, None] * DIM
        kc1 = tl.load(k_rows + half[None, :], mask=valid[:, None], other=0.0)
        kc2 = tl.load(k_rows + HALF + half[None, :], mask=valid[:, None], other=0.0)
        scores = (tl.dot(q1, tl.trans(kc1)) + tl.dot(q2, tl.trans(kc2))) * scaling
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no column yet: exp(-inf) = 0, not NaN
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        vc = tl.load(v_cache_ptr + cache_off + at[:, None] * DIM + dims[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vc.dtype), vc)
        total = total * alpha + tl.sum(p, axis=1)
        m = m_new
    own = (tl.sum(q1.to(tl.float32) * k1.to(tl.float32)[None, :], axis=1)
           + tl.sum(q2.to(tl.float32) * k2.to(tl.float32)[None, :], axis=1)) * scaling
    m_new = tl.maximum(m, own)
    p = tl.exp(own - m_new)
    alpha = tl.exp(m - m_new)
    acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
    total = total * alpha + p
    out = acc / total[:, None]
    out_base = out_ptr + row * (HEADS * DIM) + (kv_head * GROUP + g)[:, None] * DIM + dims[None, :]
    tl.store(out_base, out.to(v_new.dtype), mask=g_mask[:, None])


def decode_attention(qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, scaling: float,
                     kv_len: int) -> torch.Tensor:
    """One decode token per row: rotary on its query and key, key and value written into the cache
    at ``positions``, grouped-query attention over columns ``0..position``; one launch per layer.

    ``qkv`` ``[rows, (heads + 2 kv_heads) * head_dim]`` (the fused projection, bias added); ``keys``/
    ``values`` the rows' cache slots ``[rows, kv_heads, max_len, head_dim]``; ``positions`` ``[rows]``
    int64 on the device (a graph's static input); ``cos``/``sin`` ``[rows, head_dim]``; ``kv_len``
    bounds every row's position + 1 (the step's key-length bucket). Returns the context
    ``[rows, heads * head_dim]``.
    """
    rows = qkv.shape[0]
    dim = keys.shape[-1]
    group = heads // kv_heads
    if dim & (dim - 1) or dim < 32 or qkv.stride(-1) != 1 or keys.stride(-1) != 1 or keys.stride() != values.stride():
        raise ValueError(f"decode attention kernel needs a power-of-two head_dim >= 32 and contiguous rows, "
                         f"got {tuple(qkv.shape)} / {tuple(keys.shape)}")
    out = torch.empty(rows, heads * dim, dtype=qkv.dtype, device=qkv.device)
    _decode_attention_kernel[(rows, kv_heads)](
        qkv, keys, values, positions, cos.contiguous(), sin.contiguous(), out, qkv.stride(0), keys.stride(0),
        keys.stride(1), scaling, BLOCKS=triton.cdiv(kv_len, 64), HEADS=heads, KV_HEADS=kv_heads, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), DIM=dim, BLOCK_N=64, num_warps=4)
    return out
