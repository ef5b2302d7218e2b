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

import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests): fixed loop bounds


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
def _rotate_half(base, cos_row, sin_row, HALF: tl.constexpr):
    """Rotate-half rotary of the head at ``base`` by one row of the cos/sin tables, in fp32, rounded
    back to the head's dtype: its (first half, second half)."""
    offs = tl.arange(0, HALF)
    x1 = tl.load(base + offs)
    x2 = tl.load(base + HALF + offs)
    c1 = tl.load(cos_row + offs).to(tl.float32)
    c2 = tl.load(cos_row + HALF + offs).to(tl.float32)
    s1 = tl.load(sin_row + offs).to(tl.float32)
    s2 = tl.load(sin_row + HALF + offs).to(tl.float32)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    return (f1 * c1 - f2 * s1).to(x1.dtype), (f2 * c2 + f1 * s2).to(x1.dtype)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, token_stride, head_stride, HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    base = x_ptr + token * token_stride + head * head_stride
    r1, r2 = _rotate_half(base, cos_ptr + token * 2 * HALF, sin_ptr + token * 2 * HALF, HALF)
    offs = tl.arange(0, HALF)
    tl.store(base + offs, r1)
    tl.store(base + HALF + offs, r2)


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


# -- rotary + key/value cache write (one launch per layer) -----------------------------------------


@triton.jit
def _rotary_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, wpos_ptr, k_ptr, v_ptr, q_len,
                      qkv_row_stride, qkv_token_stride, qkv_head_stride,
                      pos_row_stride, pos_col_stride, wpos_row_stride, wpos_col_stride,
                      slot_stride, cache_head_stride, cache_pos_stride,
                      HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = token // q_len
    t = token % q_len
    base = qkv_ptr + row * qkv_row_stride + t * qkv_token_stride + head * qkv_head_stride
    pos = tl.load(pos_ptr + row * pos_row_stride + t * pos_col_stride).to(tl.int64)
    r1, r2 = _rotate_half(base, cos_ptr + pos * 2 * HALF, sin_ptr + pos * 2 * HALF, HALF)
    offs = tl.arange(0, HALF)
    if head < HEADS:  # a query head: rotated in place
        tl.store(base + offs, r1)
        tl.store(base + HALF + offs, r2)
    else:  # a key head: rotated into the cache, and its value head (KV_HEADS further on) copied there
        column = tl.load(wpos_ptr + row * wpos_row_stride + t * wpos_col_stride).to(tl.int64)
        dst = row * slot_stride + (head - HEADS) * cache_head_stride + column * cache_pos_stride
        tl.store(k_ptr + dst + offs, r1.to(k_ptr.dtype.element_ty))
        tl.store(k_ptr + dst + HALF + offs, r2.to(k_ptr.dtype.element_ty))
        dims = tl.arange(0, 2 * HALF)
        value = tl.load(base + KV_HEADS * qkv_head_stride + dims)
        tl.store(v_ptr + dst + dims, value.to(v_ptr.dtype.element_ty))


def rotary_kv(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
              keys: torch.Tensor, values: torch.Tensor, write_positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of the fused QKV projection and this step's key/value cache write, in one launch.

    ``qkv`` ``[rows, q_len, heads + 2 * kv_heads, head_dim]`` (head-contiguous): its query heads are
    rotated in place; key head ``j`` is rotated into ``keys[row, j, write_positions[row, t]]`` and value
    head ``j`` copied into ``values`` at the same place. ``cos``/``sin`` are the whole tables
    ``[max_len, head_dim]``, indexed by ``positions`` ``[rows, q_len]`` inside the kernel (no gather
    launch); ``keys``/``values`` are this batch's rows of one layer's cache ``[rows, kv_heads, max_len,
    head_dim]`` (same strides). Returns the rotated query heads (a view of ``qkv``).
    """
    rows, q_len, total, dim = qkv.shape
    kv_heads = (total - heads) // 2
    if (dim & (dim - 1) or qkv.stride(3) != 1 or qkv.stride(2) != dim or keys.stride() != values.stride()
            or keys.stride(3) != 1 or not cos.is_contiguous() or not sin.is_contiguous() or cos.shape[-1] != dim):
        raise ValueError(f"rotary_kv needs a power-of-two head_dim and head-contiguous qkv and cache, got qkv "
                         f"{tuple(qkv.shape)} strides {qkv.stride()}, cache strides {keys.stride()}")
    _rotary_kv_kernel[(rows * q_len, heads + kv_heads)](
        qkv, cos, sin, positions, write_positions, keys, values, q_len,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), positions.stride(0), positions.stride(1),
        write_positions.stride(0), write_positions.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        HEADS=heads, KV_HEADS=kv_heads, HALF=dim // 2, num_warps=1)
    return qkv[:, :, :heads]


# -- decode step: rotary + key/value cache write + grouped-query attention, one kernel per layer ----------

DECODE_BLOCK_N = 64          # keys per inner step
DECODE_TARGET_PROGRAMS = 64  # split a row's keys until (rows x kv heads x splits) reaches this ...
DECODE_MIN_SPLIT_KEYS = 256  # ... with at least this many keys per split (shorter: one program, no reduce)


@triton.jit
def _rotated(ptrs, swap_ptrs, cos, sin, sign, mask):
    """Rotate-half rotary of the vectors at ``ptrs`` (``swap_ptrs``: the same with halves swapped),
    in fp32, rounded back to their dtype as the op-by-op path stores them."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    swapped = tl.load(swap_ptrs, mask=mask, other=0.0).to(tl.float32)
    return (x.to(tl.float32) * cos + sign * swapped * sin).to(x.dtype)


@triton.jit
def _decode_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, out_ptr, part_ptr, m_ptr, l_ptr,
                   qkv_row_stride, pos_row_stride, slot_stride, cache_head_stride, cache_pos_stride,
                   keys_per_split, scale_log2,
                   HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                   DYNAMIC_LOOP: tl.constexpr, STATIC_KEYS: tl.constexpr):
    """Program (row, key/value head, split): rotate the row's new key and its GROUP query heads, write
    the new key and value into the cache at the row's position (split 0), attend over the split's
    cached columns below the position plus the new token's own column from registers (so no program
    reads what another writes in this launch); online softmax in fp32, base 2."""
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, D)
    swap = (d + HALF) % D
    sign = tl.where(d < HALF, -1.0, 1.0)
    pos = tl.load(pos_ptr + row * pos_row_stride).to(tl.int32)
    cos = tl.load(cos_ptr + pos.to(tl.int64) * D + d).to(tl.float32)
    sin = tl.load(sin_ptr + pos.to(tl.int64) * D + d).to(tl.float32)
    base = qkv_ptr + row * qkv_row_stride
    key_head = base + (HEADS + kv_head) * D
    k_new = _rotated(key_head + d, key_head + swap, cos, sin, sign, d < D)
    v_new = tl.load(base + (HEADS + KV_HEADS + kv_head) * D + d)
    cache = row * slot_stride + kv_head * cache_head_stride
    if split == 0:
        tl.store(k_ptr + cache + pos.to(tl.int64) * cache_pos_stride + d, k_new.to(k_ptr.dtype.element_ty))
        tl.store(v_ptr + cache + pos.to(tl.int64) * cache_pos_stride + d, v_new.to(v_ptr.dtype.element_ty))
    h = tl.arange(0, BLOCK_H)
    h_mask = h < GROUP
    q_heads = base + (kv_head * GROUP + h)[:, None] * D
    q = _rotated(q_heads + d[None, :], q_heads + swap[None, :], cos[None, :], sin[None, :], sign[None, :],
                 h_mask[:, None])
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, pos)  # cached columns of this split: below the position
    k_base = k_ptr + cache
    v_base = v_ptr + cache
    n = tl.arange(0, BLOCK_N)
    m = tl.full([BLOCK_H], -1.0e30, tl.float32)  # finite: a split without columns stays (-1e30, 0, 0), no NaN
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    if DYNAMIC_LOOP:  # on the GPU: only the blocks below this row's position run
        for n0 in range(start, end, BLOCK_N):
            m, l, acc = _attend_keys(q, k_base, v_base, n0 + n, end, cache_pos_stride, d, m, l, acc,
                                     scale_log2, IEEE)
    else:  # Triton's interpreter loops only to constant bounds: every block, masked past the position
        for n0 in range(0, STATIC_KEYS, BLOCK_N):
            m, l, acc = _attend_keys(q, k_base, v_base, start + n0 + n, end, cache_pos_stride, d, m, l, acc,
                                     scale_log2, IEEE)
    # the new token's own column, in the split that holds its position
    own = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale_log2
    own = tl.where((pos >= start) & (pos < start + keys_per_split), own, float("-inf"))
    m_new = tl.maximum(m, own)
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(own - m_new)
    acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
    l = l * alpha + p
    if SPLIT:  # the split's running max, sum and unnormalized output, merged by _decode_reduce_kernel
        slot = ((row * KV_HEADS + kv_head) * tl.num_programs(2) + split) * BLOCK_H + h
        tl.store(m_ptr + slot, m_new)
        tl.store(l_ptr + slot, l)
        tl.store(part_ptr + slot[:, None] * D + d[None, :], acc)
    else:
        out = acc / l[:, None]
        tl.store(out_ptr + row * HEADS * D + (kv_head * GROUP + h)[:, None] * D + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=h_mask[:, None])


@triton.jit
def _attend_keys(q, k_base, v_base, cols, end, cache_pos_stride, d, m, l, acc, scale_log2, IEEE: tl.constexpr):
    """One block of cached keys (columns ``cols`` below ``end``) into the running (max, sum, output)."""
    n_mask = cols < end
    k = tl.load(k_base + cols[:, None] * cache_pos_stride + d[None, :], mask=n_mask[:, None], other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(n_mask[None, :], s * scale_log2, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))  # m is finite, so a block without columns leaves it
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    v = tl.load(v_base + cols[:, None] * cache_pos_stride + d[None, :], mask=n_mask[:, None], other=0.0)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + pv


@triton.jit
def _decode_reduce_kernel(part_ptr, m_ptr, l_ptr, out_ptr, num_splits,
                          HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                          BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    s_mask = s < num_splits
    slot = ((row * KV_HEADS + head // GROUP) * num_splits + s) * BLOCK_H + head % GROUP
    m = tl.load(m_ptr + slot, mask=s_mask, other=-1.0e30)
    l = tl.load(l_ptr + slot, mask=s_mask, other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))  # a split without columns (m = -1e30, l = 0) weighs 0
    part = tl.load(part_ptr + slot[:, None] * D + d[None, :], mask=s_mask[:, None], other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + row * HEADS * D + head * D + d, out.to(out_ptr.dtype.element_ty))


def decode_split(rows: int, kv_heads: int, kv_len: int, keys_per_split: int | None = None) -> tuple[int, int]:
    """``(keys_per_split, splits)`` of a decode step over at most ``kv_len`` columns.

    At batch 1 there are few (row, key/value head) programs (8 for Llama-3.1-8B) for 132 SMs, so a
    long row's keys are split until about ``DECODE_TARGET_PROGRAMS`` programs run, each over at least
    ``DECODE_MIN_SPLIT_KEYS`` keys; with one split the kernel writes the output itself (no reduce).
    """
    if keys_per_split is None:
        want = max(1, DECODE_TARGET_PROGRAMS // max(1, rows * kv_heads))
        splits = max(1, min(want, kv_len // DECODE_MIN_SPLIT_KEYS))
        keys_per_split = triton.cdiv(triton.cdiv(kv_len, splits), DECODE_BLOCK_N) * DECODE_BLOCK_N
    return keys_per_split, triton.cdiv(kv_len, keys_per_split)


def decode_attention(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, kv_len: int, scale: float,
                     keys_per_split: int | None = None) -> torch.Tensor:
    """A decode step's attention for one layer: rotary, the key/value cache write and grouped-query
    attention in one launch (two when a row's keys are split: see :func:`decode_split`).

    ``qkv`` ``[rows, 1, heads + 2 * kv_heads, head_dim]``: the fused projection (bias added), heads
    contiguous. ``cos``/``sin`` the whole tables ``[max_len, head_dim]``. ``positions`` ``[rows, 1]``:
    each row's new token's position, which is also its cache column (the runner's decode: row ``r``
    sees columns ``0..positions[r]``). ``keys``/``values`` this batch's rows of the layer's cache
    ``[rows, kv_heads, max_len, head_dim]``. ``kv_len`` bounds every position + 1 (the graph's
    key-length bucket; it fixes the split, so one captured graph serves every position below it).
    Query head ``h`` reads key/value head ``h // (heads // kv_heads)`` (no repeat). ``qkv`` is not
    changed. Returns the context ``[rows, 1, heads, head_dim]``.
    """
    rows, q_len, total, dim = qkv.shape
    kv_heads = (total - heads) // 2
    if (q_len != 1 or heads % kv_heads or dim & (dim - 1) or dim < 16 or qkv.stride(3) != 1
            or qkv.stride(2) != dim or keys.stride() != values.stride() or keys.stride(3) != 1
            or not cos.is_contiguous() or not sin.is_contiguous() or cos.shape[-1] != dim):
        raise ValueError(f"decode_attention needs one token per row, a power-of-two head_dim >= 16 and "
                         f"head-contiguous tensors, got qkv {tuple(qkv.shape)} {qkv.stride()}, cache "
                         f"{tuple(keys.shape)} {keys.stride()}")
    group = heads // kv_heads
    block_h = max(16, triton.next_power_of_2(group))  # tl.dot wants >= 16 rows; padded heads are masked
    keys_per_split, splits = decode_split(rows, kv_heads, kv_len, keys_per_split)
    out = torch.empty(rows, 1, heads, dim, dtype=qkv.dtype, device=qkv.device)
    if splits > 1:
        slots = rows * kv_heads * splits * block_h
        part = torch.empty(slots, dim, dtype=torch.float32, device=qkv.device)
        m, l = torch.empty(2, slots, dtype=torch.float32, device=qkv.device)
    else:
        part = m = l = out  # unused
    consts = dict(HEADS=heads, KV_HEADS=kv_heads, GROUP=group, BLOCK_H=block_h, D=dim)
    _decode_kernel[(rows, kv_heads, splits)](
        qkv, cos, sin, positions, keys, values, out, part, m, l, qkv.stride(0), positions.stride(0),
        keys.stride(0), keys.stride(1), keys.stride(2), keys_per_split, scale * 1.4426950408889634,
        BLOCK_N=DECODE_BLOCK_N, SPLIT=splits > 1, IEEE=qkv.dtype == torch.float32, DYNAMIC_LOOP=not _INTERPRETED,
        STATIC_KEYS=keys_per_split if _INTERPRETED else 0, num_warps=4, **consts)
    if splits > 1:
        _decode_reduce_kernel[(rows, heads)](part, m, l, out, splits, BLOCK_S=triton.next_power_of_2(splits),
                                             num_warps=4, **consts)
    return out
