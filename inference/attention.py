"""Attention over the slot KV cache, plugged into a Hugging Face or DeepSpeed-injected model.

The model computes projections, norms and MLPs as usual (HF modules, or DeepSpeed's fused
kernels after injection); only the attention core is ours: it writes this step's keys and
values into the slots and attends over them. That is what makes iteration-level batching
possible with either backend: DeepSpeed's own attention keeps one shared position counter
for the whole batch, which cannot express sequences of different lengths joining and
leaving between steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from inference.kv_cache import SlotKVCache


@dataclass(frozen=True)
class AttentionBatch:
    """Where this step's tokens go in the cache and which cached columns each may see."""

    first_slot: int
    num_rows: int
    kv_len: int
    row_index: torch.Tensor        # [rows, 1] int64: 0..rows-1
    write_positions: torch.Tensor  # [rows, q_len] int64: cache column of each new token
    mask: torch.Tensor             # [rows, 1, q_len, kv_len]: additive bias (0 allowed, -inf not) or bool
    causal: bool = False           # every row attends causally over columns 0..q_len-1 (mask unused)


class SlotAttention:
    """The attention core shared by every layer of one model.

    The runner sets ``cache`` once and ``batch`` before each forward pass; layers call
    :meth:`attend` with their query/key/value projections ``[rows, heads, q_len, head_dim]``.
    """

    def __init__(self) -> None:
        self.cache: SlotKVCache | None = None
        self.batch: AttentionBatch | None = None

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None = None) -> torch.Tensor:
        """Store ``key``/``value`` and return the attention output ``[rows, q_len, heads, head_dim]``."""
        keys, values, batch = self.layer_cache(layer)
        keys[batch.row_index, :, batch.write_positions] = key.transpose(1, 2).to(keys.dtype)
        values[batch.row_index, :, batch.write_positions] = value.transpose(1, 2).to(values.dtype)
        return self.attend_cached(layer, query, scaling)

    def layer_cache(self, layer: int, kv_heads: slice | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch]:
        """This step's rows of ``layer``'s keys and values ``[rows, kv_heads, max_len, head_dim]``, and the batch.

        For a model that writes its keys/values into the cache itself (the fused decoder's
        ``rotary_kv`` kernel) before :meth:`attend_cached`. ``kv_heads``: only these key/value heads
        (views of the same cache; the fused decoder's ``tp_invariant`` numerics attend shard by shard).
        """
        cache, batch = self.cache, self.batch
        if cache is None or batch is None:
            raise RuntimeError("SlotAttention used outside a runner step")
        rows = slice(batch.first_slot, batch.first_slot + batch.num_rows)
        keys, values = cache.keys(layer)[rows], cache.values(layer)[rows]
        if kv_heads is not None:
            keys, values = keys[:, kv_heads], values[:, kv_heads]
        return keys, values, batch

    def attend_cached(self, layer: int, query: torch.Tensor, scaling: float | None = None,
                      kv_heads: slice | None = None) -> torch.Tensor:
        """Attention of ``query`` ``[rows, heads, q_len, head_dim]`` over the keys/values already in the cache
        (written by the model: :meth:`layer_cache`; ``kv_heads`` as there: those heads are copied out
        first, so SDPA sees the same shapes and strides whatever the cache's head count, i.e. the
        tensor-parallel size; its backend may plan by strides).
        Returns ``[rows, q_len, heads, head_dim]``."""
        keys, values, batch = self.layer_cache(layer, kv_heads)
        keys, values = keys[:, :, :batch.kv_len], values[:, :, :batch.kv_len]
        if kv_heads is not None:
            keys, values = keys.contiguous(), values.contiguous()
        if batch.causal:  # a prefill from column 0: flash attention, GQA native
            out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scaling,
                                                 enable_gqa=query.shape[1] != keys.shape[1])
            return out.transpose(1, 2)
        return _grouped_attention(query, keys, values, batch.mask, scaling)

    def is_decode(self, q_len: int) -> bool:
        """Whether this step is a decode step (one token per row, row ``r`` seeing columns
        ``0..write_positions[r]``): what a one-kernel decode attention (``DecoderOps.decode_attention``) runs."""
        batch = self.batch
        return batch is not None and not batch.causal and q_len == 1

    def attend_decode(self, layer: int, qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor,
                      scaling: float, kernel: Any, kv_heads: slice | None = None) -> torch.Tensor:
        """A decode step of ``layer`` in one ``kernel`` call: rotary on the fused projection ``qkv``
        ``[rows, 1, heads + 2 * kv_heads, head_dim]`` (``cos``/``sin`` whole tables), the key and value
        stored at each row's write position (also its rotary position: a decode token's position is its
        cache column), attention over the row's columns up to it (``kv_heads``: of those cache heads
        only, as in :meth:`layer_cache`). Returns ``[rows, 1, heads, head_dim]``."""
        keys, values, batch = self.layer_cache(layer, kv_heads)
        return kernel(qkv, heads, cos, sin, batch.write_positions, keys, values, batch.kv_len, scaling)


def _grouped_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                       scaling: float | None) -> torch.Tensor:
    """Attention with fewer key/value heads than query heads, without repeating keys and values.

    Query head ``h`` reads key/value head ``h // group`` (transformers' ``repeat_kv`` order), so
    the ``group`` query heads of one key/value head are folded into its query length: one
    SDPA call over ``[rows, kv_heads, group * q_len, head_dim]`` (a kernel with a mask, on
    CUDA) instead of ``enable_gqa`` (which falls back to the math path with a mask) or a copy
    of the cache. Returns ``[rows, q_len, heads, head_dim]``.
    """
    rows, heads, q_len, dim = query.shape
    kv_heads = keys.shape[1]
    if heads == kv_heads:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling).transpose(1, 2)
    group = heads // kv_heads
    folded = query.reshape(rows, kv_heads, group * q_len, dim)
    if q_len > 1:
        mask = mask.expand(rows, 1, q_len, mask.shape[-1]).repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scaling)
    return out.view(rows, kv_heads, group, q_len, dim).reshape(rows, heads, q_len, dim).transpose(1, 2)


def install_in_hf_model(model: torch.nn.Module, attention: SlotAttention) -> str:
    """Route the attention of every layer of a Hugging Face model through ``attention``.

    Registers a uniquely named attention function with transformers' AttentionInterface and
    selects it on the model's config; returns that name.
    """
    from transformers import AttentionInterface

    def slot_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
                               **_: Any) -> tuple[torch.Tensor, None]:
        return attention.attend(module.layer_idx, query, key, value, scaling), None

    name = f"kernelgate_slots_{id(attention):x}"
    AttentionInterface.register(name, slot_attention_forward)
    model.config._attn_implementation = name
    for sub in model.modules():
        config = getattr(sub, "config", None)
        if config is not None and config is not model.config and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name
    return name


def install_in_deepspeed_layers(layers: list[torch.nn.Module], attention: SlotAttention) -> None:
    """Replace the attention core of DeepSpeed-injected layers (in model order) with ``attention``.

    DeepSpeed's fused QKV GEMM (with its layer norm), output projection and MLP kernels
    stay; its ``compute_attention`` receives the fused ``[rows, q_len, 3*hidden]``
    projection (query, key, value blocks, heads in order) and must return
    ``(context [rows, q_len, hidden], key, value)``.
    """
    for index, layer in enumerate(layers):
        ds_attention = layer.attention
        heads = ds_attention.num_attention_heads_per_partition
        hidden = ds_attention.hidden_size_per_partition
        ds_attention.compute_attention = _deepspeed_attention_core(attention, index, heads, hidden // heads)


def _deepspeed_attention_core(attention: SlotAttention, layer: int, heads: int, head_dim: int):
    def compute_attention(qkv_out: Any, *_: Any, **__: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(qkv_out, (list, tuple)):
            qkv_out = qkv_out[0]
        rows, q_len, _ = qkv_out.shape
        query, key, value = qkv_out.view(rows, q_len, 3, heads, head_dim).unbind(2)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        context = attention.attend(layer, query, key, value, head_dim ** -0.5)
        return context.reshape(rows, q_len, heads * head_dim), key, value

    return compute_attention
