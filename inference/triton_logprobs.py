"""A decode step's log-probabilities in two Triton launches (CUDA; the tests run them in Triton's interpreter on the CPU).

In: ``logits`` ``[rows, vocab]`` (fp16/bf16/fp32, unit stride along the vocabulary), the step's
chosen tokens ``[rows]`` and ``k`` (0..:data:`MAX_TOP`). Out: one fp32 table ``[rows, 2 + 2k]``:
the token id, its log-probability, the ``k`` largest log-probabilities (descending; ties go to
the lower id) and their ids (ids < 2^24 are exact in fp32).

Why (#20, logprobs overhead): the op-by-op path (fp32 log-softmax over the whole vocabulary,
gather, ``torch.topk``, casts, cat) took 315 us a step at ``[16, 50257]`` on an H200, most of it
in ``topk``, a multi-kernel radix select plus a sort, and in writing a 3 MB fp32 log-softmax.
The k largest logits are the k largest log-probabilities, in the same order (log-softmax
subtracts one number per row), so nothing vocabulary-wide is written here:

1. :func:`_chunk_kernel`, one program per (row, chunk of ``CHUNK`` logits): the chunk's max, its
   sum of ``exp(x - max)``, and its k largest logits with their ids (k max/argmax passes over
   the chunk in registers).
2. :func:`_merge_kernel`, one program per row: the row's logsumexp from its chunks' (max, sum),
   the chosen token's logit minus it, and the k largest of the chunks' candidates minus it,
   written straight into the table the step copies to the host.

``k`` is a runtime bound of an unrolled loop of :data:`MAX_TOP` passes, so one compiled pair serves
every ``k`` of a vocabulary size (no JIT compile on the first request that asks for a new ``k``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TOP = 20  # OpenAI's top_logprobs limit
CHUNK = 2048


@triton.jit(do_not_specialize=["k"])  # one compiled kernel for every k (1 would be specialized)
def _chunk_kernel(logits_ptr, row_stride, vocab, chunks, k, max_ptr, sum_ptr, top_v_ptr, top_i_ptr,
                  CHUNK: tl.constexpr, MAX_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = tl.arange(0, CHUNK)
    cols = chunk * CHUNK + offs
    x = tl.load(logits_ptr + row * row_stride + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    top = tl.max(x, axis=0)
    total = tl.sum(tl.where(x != float("-inf"), tl.exp(x - top), 0.0), axis=0)
    at = row * chunks + chunk
    tl.store(max_ptr + at, top)
    tl.store(sum_ptr + at, total)
    for j in tl.static_range(MAX_K):  # unrolled; k is a runtime bound, so one compiled kernel serves every k
        if j < k:
            best, where = tl.max(x, axis=0, return_indices=True)  # one reduction; ties: the lowest index
            tl.store(top_v_ptr + at * k + j, best)
            tl.store(top_i_ptr + at * k + j, chunk * CHUNK + where)
            x = tl.where(offs == where, float("-inf"), x)


@triton.jit(do_not_specialize=["k"])
def _merge_kernel(logits_ptr, row_stride, choices_ptr, chunks, k, max_ptr, sum_ptr, top_v_ptr, top_i_ptr, out_ptr,
                  CHUNKS: tl.constexpr, CANDIDATES: tl.constexpr, MAX_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CHUNKS)
    tops = tl.load(max_ptr + row * chunks + c, mask=c < chunks, other=float("-inf"))
    sums = tl.load(sum_ptr + row * chunks + c, mask=c < chunks, other=0.0)
    top = tl.max(tops, axis=0)
    lse = top + tl.log(tl.sum(tl.where(c < chunks, sums * tl.exp(tops - top), 0.0), axis=0))
    token = tl.load(choices_ptr + row)
    chosen = tl.load(logits_ptr + row * row_stride + token).to(tl.float32)
    out = out_ptr + row * (2 + 2 * k)
    tl.store(out, token.to(tl.float32))
    tl.store(out + 1, chosen - lse)
    n = chunks * k
    p = tl.arange(0, CANDIDATES)
    values = tl.load(top_v_ptr + row * n + p, mask=p < n, other=float("-inf"))
    ids = tl.load(top_i_ptr + row * n + p, mask=p < n, other=0)
    for j in tl.static_range(MAX_K):  # candidates are chunk-major, so ties still go to the lower id
        if j < k:
            best, where = tl.max(values, axis=0, return_indices=True)
            tl.store(out + 2 + j, best - lse)
            tl.store(out + 2 + k + j, tl.sum(tl.where(p == where, ids, 0), axis=0).to(tl.float32))
            values = tl.where(p == where, float("-inf"), values)


def logprob_table(logits: torch.Tensor, choices: torch.Tensor, k: int) -> torch.Tensor:
    """``[rows, 2 + 2k]`` fp32: token, its log-probability, top-k log-probabilities, their ids."""
    rows, vocab = logits.shape
    if not 0 <= k <= MAX_TOP or k > vocab:
        raise ValueError(f"top-k of {k} over a vocabulary of {vocab} (at most {MAX_TOP})")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    chunk = min(CHUNK, triton.next_power_of_2(vocab))
    chunks = triton.cdiv(vocab, chunk)
    # One allocation, cut into the scratch and the table; each part starts 128-byte aligned, as
    # Triton's compiled kernel (specialized on 16-byte pointer alignment) expects whatever the rows.
    sizes = [rows * chunks, rows * chunks, rows * chunks * k, rows * chunks * k, rows * (2 + 2 * k)]
    padded = [-(-size // 32) * 32 for size in sizes]
    space = torch.empty(sum(padded), dtype=torch.float32, device=logits.device)
    tops, sums, top_v, top_i, out = (part[:size] for part, size in zip(space.split(padded), sizes))
    top_i = top_i.view(torch.int32)  # same element size
    out = out.view(rows, 2 + 2 * k)
    choices = choices.reshape(rows)
    _chunk_kernel[(rows, chunks)](logits, logits.stride(0), vocab, chunks, k, tops, sums, top_v, top_i,
                                  CHUNK=chunk, MAX_K=MAX_TOP, num_warps=4)
    _merge_kernel[(rows,)](logits, logits.stride(0), choices, chunks, k, tops, sums, top_v, top_i, out,
                           CHUNKS=triton.next_power_of_2(chunks),
                           CANDIDATES=triton.next_power_of_2(chunks * MAX_TOP), MAX_K=MAX_TOP, num_warps=4)
    return out
