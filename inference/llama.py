"""kernelgate's decoder for the Llama family (Llama 2/3.x, Qwen2/2.5, Mistral) over the slot KV cache.

In: a Hugging Face model of one of these architectures (random weights or a local directory,
already on its device) and where this process sits in a tensor-parallel group.
Out: :class:`FusedLlama`, which the runner drives like any model (``hidden_states`` then
``logits``) and which owns the only copy of the weights (the HF modules are consumed).

What it changes against the HF layers, and why (decode at batch 1 is weight-bandwidth bound,
so every kernel launch and every extra pass over the activations shows):

* one GEMM for query/key/value (weights concatenated, Qwen's biases too) and one for
  gate/up, instead of three and two;
* residual add fused into the RMSNorm that follows it, SiLU fused with the gate product,
  rotary embedding applied to query and key in one pass together with the step's key/value
  cache write, through :mod:`inference.ops` (Triton kernels on CUDA, DeepSpeed's
  ``transformer_inference`` kernels on request, plain torch as reference and on CPU);
* in a decode step with a Triton op set: rotary, the cache write and grouped-query attention
  as one kernel per layer (``DecoderOps.decode_attention``); prefill keeps flash SDPA;
* grouped-query attention over the slot cache without repeating keys and values
  (:class:`inference.attention.SlotAttention`);
* tensor parallelism in the Megatron layout: heads and the MLP's inner width are split
  across ranks (column-parallel QKV and gate/up, row-parallel output and down projections,
  one all-reduce after each), the embedding and LM head replicated;
* optionally (``model.numerics: tp_invariant``) numerics that do not depend on the number of
  ranks: every ``tp_size`` computes each layer as the same fixed set of shards (heads and MLP
  width split ``S`` ways whatever the rank count; a rank runs ``S / tp_size`` of them), one GEMM
  and one attention call per shard, so tp 1 and tp N issue identical kernel shapes; each shard's
  output/down projection is an fp32 partial, and the partials are gathered and summed in shard
  order (an all-reduce's order is the collective's, not fixed beyond two ranks). Logits are then
  bitwise equal across tensor-parallel sizes (:meth:`FusedLlama.hidden_states`).

Greedy output matches ``transformers``' ``generate`` on the same weights (tests/inference/
test_llama.py on CPU; bench/inference_llama_gpu.py checks logits and tokens at the 1B shape
on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from inference.attention import SlotAttention
from inference.kv_cache import KVGeometry
from inference.ops import DecoderOps

SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2", "mistral"})


def supports(hf_config: Any) -> bool:
    """Whether ``hf_config`` describes a model this decoder runs exactly."""
    return getattr(hf_config, "model_type", None) in SUPPORTED_MODEL_TYPES


def sliding_window(hf_config: Any) -> int | None:
    """The attention window of a Mistral/Qwen2 config that uses one (the loader caps the context there)."""
    if getattr(hf_config, "model_type", None) == "qwen2" and not getattr(hf_config, "use_sliding_window", False):
        return None
    window = getattr(hf_config, "sliding_window", None)
    return int(window) if window else None


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group; ``all_reduce`` sums a tensor over the group,
    ``all_gather(out, local)`` fills ``out`` ``[world_size * n, ...]`` with every rank's ``local``
    ``[n, ...]`` in rank order."""

    rank: int = 0
    world_size: int = 1
    all_reduce: Any = None  # Callable[[torch.Tensor], None], in place; None when world_size == 1
    all_gather: Any = None  # Callable[[torch.Tensor, torch.Tensor], None]; None when world_size == 1

    def split(self, total: int, what: str) -> tuple[int, int]:
        """Start and size of this rank's share of ``total`` (which must divide evenly)."""
        if total % self.world_size:
            raise ValueError(f"tensor parallel size {self.world_size} does not divide the model's {what} ({total})")
        size = total // self.world_size
        return self.rank * size, size


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up_weight: torch.Tensor  # [2 * inner, hidden]: gate rows then up rows (up first if ops.up_first)
    down_weight: torch.Tensor


def numerics_shards(config: Any, requested: int, world_size: int) -> int:
    """The shard count ``S`` of ``tp_invariant`` numerics for an HF ``config``: ``requested``, or (0) the
    largest of 8, 4, 2, 1 that divides the attention heads, key/value heads and MLP width (a function of
    the model alone, so every ``tp_size`` picks the same). ``S`` must divide those and be a multiple of
    ``world_size`` (each rank runs ``S / world_size`` whole shards)."""
    heads = int(config.num_attention_heads)
    widths = {"attention heads": heads, "key/value heads": int(config.num_key_value_heads or heads),
              "intermediate size": int(config.intermediate_size)}
    shards = requested or next(s for s in (8, 4, 2, 1) if all(w % s == 0 for w in widths.values()))
    for what, width in widths.items():
        if width % shards:
            raise ValueError(f"model.numerics_shards {shards} does not divide the model's {what} ({width})")
    if shards % world_size:
        raise ValueError(f"tp_invariant numerics with {shards} shards cannot run on {world_size} ranks: the "
                         f"shard count must be a multiple of model.tp_size (set model.numerics_shards)")
    return shards


class FusedLlama(torch.nn.Module):
    """A Llama-family causal LM: embedding, decoder layers over the slot cache, final norm, LM head."""

    def __init__(self, hf_model: torch.nn.Module, attention: SlotAttention, ops: DecoderOps, max_len: int,
                 tp: TensorParallel | None = None, invariant_shards: int | None = None) -> None:
        """``invariant_shards``: None for the default numerics; a shard count (0: :func:`numerics_shards`
        picks it) for ``tp_invariant`` numerics."""
        super().__init__()
        config = hf_model.config
        if not supports(config):
            raise ValueError(f"FusedLlama runs {sorted(SUPPORTED_MODEL_TYPES)}, not {config.model_type!r}")
        tp = tp or TensorParallel()
        self.config = config
        self._attention = attention
        self._ops = ops
        self.tp = tp
        heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads or config.num_attention_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        head0, self.heads = tp.split(heads, "attention heads")
        kv0, self.kv_heads = tp.split(kv_heads, "key/value heads")
        inner0, inner = tp.split(int(config.intermediate_size), "intermediate size")
        # The slices of the weights this rank computes with, one GEMM each: its whole share (default
        # numerics), or its S / world_size shards of S (tp_invariant), each (first head, heads, first kv
        # head, kv heads, first inner column, inner columns).
        if invariant_shards is None:
            self.shards = None
            slices = [(head0, self.heads, kv0, self.kv_heads, inner0, inner)]
        else:
            self.shards = numerics_shards(config, invariant_shards, tp.world_size)
            hs, kvs, ins = heads // self.shards, kv_heads // self.shards, int(config.intermediate_size) // self.shards
            first = tp.rank * (self.shards // tp.world_size)
            slices = [(s * hs, hs, s * kvs, kvs, s * ins, ins)
                      for s in range(first, first + self.shards // tp.world_size)]
            self.shard_heads, self.shard_kv_heads = hs, kvs
        self.kv_geometry = KVGeometry(num_layers=int(config.num_hidden_layers), num_kv_heads=self.kv_heads,
                                      head_dim=self.head_dim)
        self.eps = float(config.rms_norm_eps)
        self.scaling = self.head_dim ** -0.5
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"FusedLlama supports hidden_act 'silu', not {act!r}")

        backbone = hf_model.model
        # Per layer, one _Layer per slice (the o_proj bias only in the first: it is added once).
        self._sliced: list[list[_Layer]] = []
        for hf_layer in backbone.layers:
            mlp = hf_layer.mlp
            if getattr(mlp.down_proj, "bias", None) is not None or getattr(mlp.gate_proj, "bias", None) is not None:
                raise ValueError("FusedLlama does not support MLP biases (mlp_bias=True)")
            self._sliced.append([_slice_layer(hf_layer, self.head_dim, part, ops.up_first, index == 0)
                                 for index, part in enumerate(slices)])
            # Free the HF copies layer by layer so peak memory stays near one model.
            attn = hf_layer.self_attn
            for module in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                           mlp.down_proj):
                module.weight = None
        # The default numerics' layers: one slice each.
        self._layers: list[_Layer] = [layer[0] for layer in self._sliced] if self.shards is None else []
        self.embed = backbone.embed_tokens.weight.detach()
        self.final_norm = backbone.norm.weight.detach()
        self.lm_head = hf_model.get_output_embeddings().weight.detach()
        self.cos, self.sin = rotary_tables(config, max_len, self.embed.device, self.embed.dtype)

    # -- what the runner calls ----------------------------------------------------------------

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``tokens``/``positions`` ``[rows, q_len]`` -> final-normed hidden states ``[rows, q_len, hidden]``.

        The runner has set the attention batch (which slots, which cache columns) beforehand.
        """
        if self.shards is not None:
            return self._invariant_hidden_states(tokens, positions)
        ops = self._ops
        rows, q_len = tokens.shape
        d = self.head_dim
        hidden = F.embedding(tokens, self.embed)
        # A decode step: rotary, cache write and attention as one kernel a layer where the op set has one.
        decode = ops.decode_attention if self._attention.is_decode(q_len) else None
        residual: torch.Tensor | None = None
        for index, layer in enumerate(self._layers):
            if residual is None:
                normed, residual = ops.rms_norm(hidden, layer.input_norm, self.eps), hidden
            else:
                normed, residual = ops.add_rms_norm(hidden, residual, layer.input_norm, self.eps)
            qkv = F.linear(normed, layer.qkv_weight, layer.qkv_bias).view(rows, q_len, self.heads + 2 * self.kv_heads, d)
            context = self._attend(index, qkv, positions, decode, self.heads)
            hidden = self._row_parallel(context.reshape(rows, q_len, self.heads * d), layer.o_weight)
            if layer.o_bias is not None:
                hidden = hidden + layer.o_bias
            normed, residual = ops.add_rms_norm(hidden, residual, layer.post_norm, self.eps)
            hidden = self._row_parallel(ops.silu_mul(F.linear(normed, layer.gate_up_weight)), layer.down_weight)
        normed, _ = ops.add_rms_norm(hidden, residual, self.final_norm, self.eps)
        return normed

    def _attend(self, index: int, qkv: torch.Tensor, positions: torch.Tensor, decode: Any, heads: int,
                kv_heads: slice | None = None) -> torch.Tensor:
        """Rotary, the key/value cache write and attention of layer ``index`` for the fused projection
        ``qkv`` ``[rows, q_len, heads + 2 * kv, head_dim]`` (``kv_heads``: which of this rank's cache heads
        its keys/values are; all by default): one kernel in a decode step where the op set has one
        (``decode``), else ``rotary_kv`` then attention over the cache."""
        attention = self._attention
        if decode is not None:
            return attention.attend_decode(index, qkv, heads, self.cos, self.sin, self.scaling, decode, kv_heads)
        keys, values, batch = attention.layer_cache(index, kv_heads)
        query = self._ops.rotary_kv(qkv, heads, self.cos, self.sin, positions, keys, values, batch.write_positions)
        return attention.attend_cached(index, query.transpose(1, 2), self.scaling, kv_heads)

    def _invariant_hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``hidden_states`` with ``tp_invariant`` numerics: this rank's shards one at a time, each with
        kernels of the shard's own shapes (the same at every ``tp_size``); the output and down
        projections as one fp32 partial per shard, summed in shard order over all ranks
        (:meth:`_shard_sum`). Everything between (norms, residuals, embedding, LM head) is replicated
        at full width, so its shapes do not depend on the rank count either."""
        ops = self._ops
        rows, q_len = tokens.shape
        d, heads, kv_heads = self.head_dim, self.shard_heads, self.shard_kv_heads
        hidden = F.embedding(tokens, self.embed)
        decode = ops.decode_attention if self._attention.is_decode(q_len) else None
        residual: torch.Tensor | None = None
        for index, shards in enumerate(self._sliced):
            first = shards[0]
            if residual is None:
                normed, residual = ops.rms_norm(hidden, first.input_norm, self.eps), hidden
            else:
                normed, residual = ops.add_rms_norm(hidden, residual, first.input_norm, self.eps)
            partials = []
            for at, layer in enumerate(shards):
                qkv = F.linear(normed, layer.qkv_weight, layer.qkv_bias).view(rows, q_len, heads + 2 * kv_heads, d)
                context = self._attend(index, qkv, positions, decode, heads, slice(at * kv_heads, (at + 1) * kv_heads))
                partials.append(_fp32_product(context.reshape(rows * q_len, heads * d), layer.o_weight))
            hidden = self._shard_sum(partials, normed.dtype).view(rows, q_len, -1)
            if first.o_bias is not None:
                hidden = hidden + first.o_bias
            normed, residual = ops.add_rms_norm(hidden, residual, first.post_norm, self.eps)
            partials = [_fp32_product(ops.silu_mul(F.linear(normed, layer.gate_up_weight)).reshape(rows * q_len, -1),
                                      layer.down_weight) for layer in shards]
            hidden = self._shard_sum(partials, normed.dtype).view(rows, q_len, -1)
        normed, _ = ops.add_rms_norm(hidden, residual, self.final_norm, self.eps)
        return normed

    def _shard_sum(self, partials: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The sum of every shard's fp32 partial ``[tokens, hidden]`` (``partials``: this rank's, in shard
        order), added one by one in shard order and rounded to ``dtype`` once. Across ranks the partials
        are gathered first (rank r holds shards r * S/N ..), so every rank, at every ``tp_size``, adds the
        same numbers in the same order."""
        gather = self.tp.all_gather
        if gather is not None:
            local = torch.stack(partials)
            everyone = local.new_empty((self.tp.world_size * local.shape[0], *local.shape[1:]))
            gather(everyone, local)
            partials = list(everyone.unbind(0))
        total = partials[0]
        for part in partials[1:]:
            total = total + part
        return total.to(dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head)

    def _row_parallel(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T`` summed over the tensor-parallel ranks (each holds a slice of the inner dim).

        On CUDA in half precision each rank's partial product stays fp32 through the all-reduce and
        is rounded once, as one GPU's GEMM rounds its output once (fp16 partials summed in fp16 were
        rounded three times). That alone did not make ``tp_size`` 2's greedy tokens equal one GPU's
        on the H200 pair: the summation order still differs, and the random-weight model's
        near-tied argmaxes flip on it (bench/results/inference_llama_gpu.json, ``tp2``). ``tp_invariant``
        numerics fix the order instead (:meth:`_shard_sum`).
        """
        all_reduce = self.tp.all_reduce
        if all_reduce is None:
            return F.linear(x, weight)
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            out = torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32)
            all_reduce(out)
            return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
        out = F.linear(x, weight)
        all_reduce(out)
        return out

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights this rank holds (the embedding and LM head counted once when tied)."""
        tensors = {t.data_ptr(): t for layer in self._sliced for part in layer for t in vars(part).values()
                   if t is not None}
        tensors.update({t.data_ptr(): t for t in (self.embed, self.final_norm, self.lm_head)})
        return sum(t.numel() * t.element_size() for t in tensors.values())


def _slice_layer(hf_layer: torch.nn.Module, d: int, part: tuple[int, int, int, int, int, int], up_first: bool,
                 with_o_bias: bool) -> _Layer:
    """One slice of an HF decoder layer's weights: query heads ``[h0, h0 + h)``, key/value heads ``[k0, k0 + k)``
    and MLP columns ``[i0, i0 + i)`` (``part``), QKV and gate/up concatenated (Qwen's QKV biases too)."""
    h0, h, k0, k, i0, i = part
    attn, mlp = hf_layer.self_attn, hf_layer.mlp
    q_rows, kv_rows, inner_rows = slice(h0 * d, (h0 + h) * d), slice(k0 * d, (k0 + k) * d), slice(i0, i0 + i)
    qkv_bias = None
    if attn.q_proj.bias is not None:
        qkv_bias = torch.cat([attn.q_proj.bias[q_rows], attn.k_proj.bias[kv_rows], attn.v_proj.bias[kv_rows]])
    o_bias = attn.o_proj.bias if with_o_bias else None
    gate_up = [mlp.gate_proj.weight[inner_rows], mlp.up_proj.weight[inner_rows]]
    return _Layer(
        input_norm=hf_layer.input_layernorm.weight.detach(),
        qkv_weight=torch.cat([attn.q_proj.weight[q_rows], attn.k_proj.weight[kv_rows],
                              attn.v_proj.weight[kv_rows]]).detach(),
        qkv_bias=None if qkv_bias is None else qkv_bias.detach(),
        o_weight=attn.o_proj.weight[:, q_rows].detach().contiguous(),
        o_bias=None if o_bias is None else o_bias.detach(),
        post_norm=hf_layer.post_attention_layernorm.weight.detach(),
        gate_up_weight=torch.cat(gate_up[::-1] if up_first else gate_up).detach(),
        down_weight=mlp.down_proj.weight[:, inner_rows].detach().contiguous())


def _fp32_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` ``[tokens, out]`` in fp32: a half-precision GEMM with fp32 output on CUDA (the
    accumulator is not rounded to half), exact products with fp32 sums on the CPU (which has no such GEMM)."""
    if x.dtype == torch.float32:
        return torch.mm(x, weight.t())
    if x.is_cuda:
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return torch.mm(x.float(), weight.float().t())


def rotary_tables(config: Any, max_len: int, device: torch.device, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[max_len, head_dim]`` exactly as transformers computes them (rope scaling included)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = getattr(config, "rope_scaling", None) or {}
    init = ROPE_INIT_FUNCTIONS[scaling.get("rope_type", scaling.get("type", "default"))]
    inv_freq, attention_scaling = init(config, device)
    positions = torch.arange(max_len, device=device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)
