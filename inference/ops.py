"""The elementwise kernels of a Llama-family decoder layer, in three interchangeable sets.

In: activations in the model's dtype. Out: the same, computed as transformers computes them
(RMSNorm in float32 then rounded, SiLU gate product, rotate-half rotary embedding).

* ``torch``: the reference, one torch op at a time (several kernels each); CPU and tests.
* ``triton``: one fused kernel each (residual add + RMSNorm, SiLU x up, rotary on query and
  key together), from :mod:`inference.triton_kernels`; the default on CUDA. A decode step
  (one token per row) also runs rotary, the KV-cache write and grouped-query attention as ONE
  kernel per layer (``decode_attention``), checked against the op-by-op path on a probe when
  the set is made (on a mismatch or a failure to compile it is left off, with a log line).
* ``deepspeed``: DeepSpeed's ``transformer_inference`` CUDA kernels (``pre_rms_norm``,
  ``rms_norm``, ``gated_activation``), JIT-built on first use (about a minute). DeepSpeed's
  rotary kernel keeps one position offset for the whole batch, which cannot express slots
  at different positions, so rotary stays on Triton in this set.

Matrix products are cuBLAS through ``F.linear`` in every set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

log = logging.getLogger("kernelgate.inference.ops")

OpsName = Literal["auto", "torch", "triton", "deepspeed"]


class DecoderOps(Protocol):
    name: str
    up_first: bool  # silu_mul takes [up | gate] instead of [gate | up]
    # One kernel for a decode step's rotary + KV-cache write + attention (None: op by op).
    # Signature of :func:`inference.triton_kernels.decode_attention`.
    decode_attention: Callable[..., torch.Tensor] | None

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rms_norm(x + residual), x + residual)``."""
        ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of ``gate_up = [gate | up]`` (``[up | gate]`` if ``up_first``) on the last dimension."""
        ...

    def rotary(self, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``query``/``key`` ``[rows, q_len, heads, head_dim]`` by ``cos``/``sin`` ``[rows, q_len, head_dim]``."""
        ...


class TorchOps:
    """Reference set: the same arithmetic as transformers' Llama modules, op by op."""

    name = "torch"
    up_first = False
    decode_attention = None

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        total = residual + x
        return self.rms_norm(total, weight, eps), total

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotary(self, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TritonOps:
    """One fused Triton kernel per op (CUDA only)."""

    name = "triton"
    up_first = False

    def __init__(self) -> None:
        from inference import triton_kernels

        self._k = triton_kernels
        self.decode_attention: Callable[..., torch.Tensor] | None = None

    def enable_decode_attention(self, device: torch.device, dtype: torch.dtype = torch.float16) -> bool:
        """Use the one-kernel decode attention if it compiles here and matches the op-by-op path on a
        probe in the model's ``dtype`` (GQA, rows at different positions); otherwise keep op by op (logged)."""
        try:
            error = decode_attention_error(self._k.decode_attention, self, device, dtype)
        except Exception:  # noqa: BLE001 - a kernel that does not build must not stop serving
            log.exception("the fused decode-attention kernel failed; decoding attention op by op")
            return False
        if error > 2e-2:
            log.error("the fused decode-attention kernel differs from the op-by-op path by %.3g; not used", error)
            return False
        self.decode_attention = self._k.decode_attention
        return True

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._k.rms_norm(x, None, weight, eps)[0]

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k.rms_norm(x, residual, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._k.silu_mul(gate_up)

    def rotary(self, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k.rotary(query, key, cos, sin)


class DeepSpeedOps(TritonOps):
    """DeepSpeed's transformer_inference kernels for the norms and the gated activation."""

    name = "deepspeed"
    up_first = True

    def __init__(self) -> None:
        super().__init__()
        import os

        from deepspeed.ops.op_builder import InferenceBuilder

        # The op builder parses TORCH_CUDA_ARCH_LIST as numbers: Hopper's "9.0a" kills the build.
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"

        self._ds = InferenceBuilder().load()
        self._no_bias: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._ds.rms_norm(x, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        normed, total = self._ds.pre_rms_norm(x, residual, weight, eps)
        return normed, total

    def silu_mul(self, up_gate: torch.Tensor) -> torch.Tensor:
        # DeepSpeed's gated activation computes first_half * act(second_half), hence up_first.
        from deepspeed.utils.types import ActivationFuncType

        key = (up_gate.shape[-1], up_gate.dtype, up_gate.device)
        if key not in self._no_bias:
            self._no_bias[key] = torch.zeros(key[0], dtype=up_gate.dtype, device=up_gate.device)
        return self._ds.gated_activation(up_gate, self._no_bias[key], ActivationFuncType.GATED_SILU)


def decode_attention_error(kernel: Callable[..., torch.Tensor], ops: DecoderOps, device: torch.device,
                           dtype: torch.dtype = torch.float16) -> float:
    """Largest difference between ``kernel`` and the op-by-op decode path (``ops.rotary``, then the
    slot attention's cache write and grouped attention) on a random probe: 3 rows at positions 0,
    70 and 129 (one, two and three key blocks), 8 query heads over 2 key/value heads, head_dim 64;
    the cache contents the two leave behind are compared too."""
    from inference.attention import AttentionBatch, SlotAttention
    from inference.kv_cache import KVGeometry, SlotKVCache

    gen = torch.Generator(device="cpu").manual_seed(0)
    rows, heads, kv_heads, dim, max_len = 3, 8, 2, 64, 192
    positions = torch.tensor([[0], [70], [129]], device=device)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=gen).to(device, dtype)
    angles = torch.randn(rows, dim // 2, generator=gen)
    cos = torch.cat([angles.cos()] * 2, -1).to(device, dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(device, dtype)
    caches = []
    for _ in range(2):
        cache = SlotKVCache(KVGeometry(1, kv_heads, dim), rows, max_len, dtype, device)
        cache.storage.copy_(torch.randn(cache.storage.shape, generator=gen).to(device, dtype))
        caches.append(cache)
    caches[1].storage.copy_(caches[0].storage)
    fused = kernel(qkv.clone(), caches[0].keys(0), caches[0].values(0), positions.view(-1), cos, sin, heads,
                   kv_heads, dim ** -0.5, max_len)
    attention = SlotAttention()
    attention.cache = caches[1]
    columns = torch.arange(max_len, device=device)
    attention.batch = AttentionBatch(first_slot=0, num_rows=rows, kv_len=max_len,
                                     row_index=torch.arange(rows, device=device).view(-1, 1),
                                     write_positions=positions,
                                     mask=torch.zeros(rows, 1, 1, max_len, dtype=dtype, device=device).masked_fill_(
                                         columns.view(1, 1, 1, -1) > positions.view(rows, 1, 1, 1), float("-inf")))
    view = qkv.clone().view(rows, 1, heads + 2 * kv_heads, dim)
    query, key = ops.rotary(view[:, :, :heads], view[:, :, heads:heads + kv_heads], cos.view(rows, 1, dim),
                            sin.view(rows, 1, dim))
    value = view[:, :, heads + kv_heads:]
    reference = attention.attend(0, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dim ** -0.5)
    error = (fused.float() - reference.reshape(rows, heads * dim).float()).abs().max().item()
    return max(error, (caches[0].storage.float() - caches[1].storage.float()).abs().max().item())


def select_ops(name: OpsName, device: torch.device, dtype: torch.dtype = torch.float16) -> DecoderOps:
    """The op set ``name`` (``auto``: Triton on CUDA when importable, torch otherwise), for a model in ``dtype``."""
    if name == "auto":
        if device.type != "cuda":
            return TorchOps()
        try:
            ops: DecoderOps = TritonOps()
        except ImportError:
            return TorchOps()
    elif name != "torch" and device.type != "cuda":
        raise ValueError(f"model.ops {name!r} needs CUDA (device is {device})")
    else:
        ops = {"torch": TorchOps, "triton": TritonOps, "deepspeed": DeepSpeedOps}[name]()
    if isinstance(ops, TritonOps):
        ops.enable_decode_attention(device, dtype)
    return ops
