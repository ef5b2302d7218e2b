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
  one all-reduce after each), the embedding and LM head replicated.

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
    """This process's place in a tensor-parallel group; ``all_reduce`` sums a tensor over the group."""

    rank: int = 0
    world_size: int = 1
    all_reduce: Any = None  # Callable[[torch.Tensor], None], in place; None when world_size == 1

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


class FusedLlama(torch.nn.Module):
    """A Llama-family causal LM: embedding, decoder layers over the slot cache, final norm, LM head."""

    def __init__(self, hf_model: torch.nn.Module, attention: SlotAttention, ops: DecoderOps, max_len: int,
                 tp: TensorParallel | None = None) -> None:
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
        self.kv_geometry = KVGeometry(num_layers=int(config.num_hidden_layers), num_kv_heads=self.kv_heads,
                                      head_dim=self.head_dim)
        self.eps = float(config.rms_norm_eps)
        self.scaling = self.head_dim ** -0.5
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"FusedLlama supports hidden_act 'silu', not {act!r}")

        backbone = hf_model.model
        d = self.head_dim
        q_rows = slice(head0 * d, (head0 + self.heads) * d)
        kv_rows = slice(kv0 * d, (kv0 + self.kv_heads) * d)
        inner_rows = slice(inner0, inner0 + inner)
        self._layers: list[_Layer] = []
        for hf_layer in backbone.layers:
            attn, mlp = hf_layer.self_attn, hf_layer.mlp
            qkv_bias = None
            if attn.q_proj.bias is not None:
                qkv_bias = torch.cat([attn.q_proj.bias[q_rows], attn.k_proj.bias[kv_rows], attn.v_proj.bias[kv_rows]])
            o_bias = attn.o_proj.bias
            gate_up = [mlp.gate_proj.weight[inner_rows], mlp.up_proj.weight[inner_rows]]
            if getattr(mlp.down_proj, "bias", None) is not None or getattr(mlp.gate_proj, "bias", None) is not None:
                raise ValueError("FusedLlama does not support MLP biases (mlp_bias=True)")
            self._layers.append(_Layer(
                input_norm=hf_layer.input_layernorm.weight.detach(),
                qkv_weight=torch.cat([attn.q_proj.weight[q_rows], attn.k_proj.weight[kv_rows],
                                      attn.v_proj.weight[kv_rows]]).detach(),
                qkv_bias=None if qkv_bias is None else qkv_bias.detach(),
                o_weight=attn.o_proj.weight[:, q_rows].detach().contiguous(),
                o_bias=None if o_bias is None else o_bias.detach(),
                post_norm=hf_layer.post_attention_layernorm.weight.detach(),
                gate_up_weight=torch.cat(gate_up[::-1] if ops.up_first else gate_up).detach(),
                down_weight=mlp.down_proj.weight[:, inner_rows].detach().contiguous()))
            # Free the HF copies layer by layer so peak memory stays near one model.
            for module in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                           mlp.down_proj):
                module.weight = None
        self.embed = backbone.embed_tokens.weight.detach()
        self.final_norm = backbone.norm.weight.detach()
        self.lm_head = hf_model.get_output_embeddings().weight.detach()
        self.cos, self.sin = rotary_tables(config, max_len, self.embed.device, self.embed.dtype)

    # -- what the runner calls ----------------------------------------------------------------

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``tokens``/``positions`` ``[rows, q_len]`` -> final-normed hidden states ``[rows, q_len, hidden]``.

        The runner has set the attention batch (which slots, which cache columns) beforehand.
        """
        ops = self._ops
        rows, q_len = tokens.shape
        d = self.head_dim
        hidden = F.embedding(tokens, self.embed)
        attention = self._attention
        # A decode step: rotary, cache write and attention as one kernel a layer where the op set has one.
        decode = ops.decode_attention if attention.is_decode(q_len) else None
        residual: torch.Tensor | None = None
        for index, layer in enumerate(self._layers):
            if residual is None:
                normed, residual = ops.rms_norm(hidden, layer.input_norm, self.eps), hidden
            else:
                normed, residual = ops.add_rms_norm(hidden, residual, layer.input_norm, self.eps)
            qkv = F.linear(normed, layer.qkv_weight, layer.qkv_bias).view(rows, q_len, self.heads + 2 * self.kv_heads, d)
            if decode is not None:
                context = attention.attend_decode(index, qkv, self.heads, self.cos, self.sin, self.scaling, decode)
            else:  # rotary with the key/value cache write, then attention over the cache
                keys, values, batch = attention.layer_cache(index)
                query = ops.rotary_kv(qkv, self.heads, self.cos, self.sin, positions, keys, values,
                                      batch.write_positions)
                context = attention.attend_cached(index, query.transpose(1, 2), self.scaling)
            hidden = self._row_parallel(context.reshape(rows, q_len, self.heads * d), layer.o_weight)
            if layer.o_bias is not None:
                hidden = hidden + layer.o_bias
            normed, residual = ops.add_rms_norm(hidden, residual, layer.post_norm, self.eps)
            hidden = self._row_parallel(ops.silu_mul(F.linear(normed, layer.gate_up_weight)), layer.down_weight)
        normed, _ = ops.add_rms_norm(hidden, residual, self.final_norm, self.eps)
        return normed

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head)

    def _row_parallel(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T`` summed over the tensor-parallel ranks (each holds a slice of the inner dim).

        On CUDA in half precision each rank's partial product stays fp32 through the all-reduce and
        is rounded once, as one GPU's GEMM rounds its output once (fp16 partials summed in fp16 were
        rounded three times). That alone did not make ``tp_size`` 2's greedy tokens equal one GPU's
        on the H200 pair: the summation order still differs, and the random-weight model's
        near-tied argmaxes flip on it (bench/results/inference_llama_gpu.json, ``tp2``).
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
        tensors = {t.data_ptr(): t for layer in self._layers for t in vars(layer).values() if t is not None}
        tensors.update({t.data_ptr(): t for t in (self.embed, self.final_norm, self.lm_head)})
        return sum(t.numel() * t.element_size() for t in tensors.values())


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
