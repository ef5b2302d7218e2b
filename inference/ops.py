"""The elementwise kernels of a Llama-family decoder layer, in three interchangeable sets.

In: activations in the model's dtype. Out: the same, computed as transformers computes them
(RMSNorm in float32 then rounded, SiLU gate product, rotate-half rotary embedding).

* ``torch``: the reference, one torch op at a time (several kernels each); CPU and tests.
* ``triton``: one fused kernel each (residual add + RMSNorm, SiLU x up, rotary on query and
  key together), from :mod:`inference.triton_kernels`; the default on CUDA. The cache write is
  fused too: ``rotary_kv`` rotates and writes the step's keys and values into the slot cache in
  one launch (no ``index_put``), and a decode step (one token per row) runs rotary, cache write
  and grouped-query attention as one kernel per layer (``decode_attention``, split over the keys
  with a small reduce where a row's keys are many and the rows few); prefill keeps flash SDPA.
  ``select_ops`` checks that kernel against the op-by-op path first (:func:`decode_attention_error`)
  and leaves it off, logged, where it fails.
* ``deepspeed``: DeepSpeed's ``transformer_inference`` CUDA kernels (``pre_rms_norm``,
  ``rms_norm``, ``gated_activation``), JIT-built on first use (about a minute). DeepSpeed's
  rotary kernel keeps one position offset for the whole batch, which cannot express slots
  at different positions, so rotary stays on Triton in this set.

Matrix products are cuBLAS through ``F.linear`` in every set. ``model.ops: torch`` (and CPU
serving) keeps every op, the cache write and attention on torch; ``triton``/``deepspeed``/
``auto`` on CUDA use the Triton cache write and decode attention.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

log = logging.getLogger("kernelgate.inference.ops")

OpsName = Literal["auto", "torch", "triton", "deepspeed"]


class DecoderOps(Protocol):
    name: str
    up_first: bool  # silu_mul takes [up | gate] instead of [gate | up]
    # A decode step's rotary + cache write + attention in one kernel (signature of
    # :func:`inference.triton_kernels.decode_attention`), or None: rotary_kv, then the slot attention.
    decode_attention: Any

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

    def rotary_kv(self, qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  keys: torch.Tensor, values: torch.Tensor, write_positions: torch.Tensor) -> torch.Tensor:
        """Rotary on the fused projection ``qkv`` ``[rows, q_len, heads + 2 * kv_heads, head_dim]`` at
        ``positions`` (``cos``/``sin``: whole tables ``[max_len, head_dim]``); the rotated keys and the values
        written into ``keys``/``values`` (this batch's rows of a layer's cache ``[rows, kv_heads, max_len,
        head_dim]``) at ``write_positions`` ``[rows, q_len]``. Returns the rotated query heads."""
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

    def rotary_kv(self, qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  keys: torch.Tensor, values: torch.Tensor, write_positions: torch.Tensor) -> torch.Tensor:
        kv_heads = (qkv.shape[2] - heads) // 2
        query, key = self.rotary(qkv[:, :, :heads], qkv[:, :, heads:heads + kv_heads], cos[positions], sin[positions])
        rows = torch.arange(qkv.shape[0], device=qkv.device).view(-1, 1)
        keys[rows, :, write_positions] = key.to(keys.dtype)
        values[rows, :, write_positions] = qkv[:, :, heads + kv_heads:].to(values.dtype)
        return query


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
        self.decode_attention = triton_kernels.decode_attention

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

    def rotary_kv(self, qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  keys: torch.Tensor, values: torch.Tensor, write_positions: torch.Tensor) -> torch.Tensor:
        return self._k.rotary_kv(qkv, heads, cos, sin, positions, keys, values, write_positions)


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


def select_ops(name: OpsName, device: torch.device, dtype: torch.dtype = torch.float16) -> DecoderOps:
    """The op set ``name`` (``auto``: Triton on CUDA when importable, torch otherwise).

    A set with a decode-attention kernel has it checked first (:func:`decode_attention_error`, in the
    model's ``dtype``): a kernel that fails to build on this device or differs from the op-by-op path is
    left off (logged) and decode steps attend op by op, rather than the server failing at its first step.
    """
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
    if ops.decode_attention is not None:
        try:
            error = decode_attention_error(ops, device, dtype)
        except Exception:  # noqa: BLE001 - a kernel that does not build must not stop serving
            log.exception("the Triton decode-attention kernel failed on %s; decode steps attend op by op", device)
            ops.decode_attention = None
        else:
            if error > DECODE_PROBE_TOLERANCE:
                log.error("the Triton decode-attention kernel differs from the op-by-op path by %.3g on %s; "
                          "decode steps attend op by op", error, device)
                ops.decode_attention = None
    return ops


DECODE_PROBE_TOLERANCE = 2e-2


def decode_attention_error(ops: DecoderOps, device: torch.device, dtype: torch.dtype) -> float:
    """Largest difference (relative to the largest value) between ``ops.decode_attention`` and the op-by-op path (``TorchOps.rotary_kv``,
    masked grouped SDPA) on a random probe, outputs and the cache left behind: 3 rows at positions 0, 129
    and 300 of a 512-key bucket (the kernel splits it), 8 query heads over 2 key/value heads of 64."""
    from inference.attention import _grouped_attention

    gen = torch.Generator(device="cpu").manual_seed(0)
    rows, heads, kv_heads, dim, kv_len = 3, 8, 2, 64, 512
    positions = torch.tensor([[0], [129], [300]], device=device)
    qkv = torch.randn(rows, 1, heads + 2 * kv_heads, dim, generator=gen).to(device, dtype)
    angles = torch.randn(kv_len, dim // 2, generator=gen)
    cos = torch.cat([angles.cos()] * 2, -1).to(device, dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(device, dtype)
    cache = torch.randn(2, 2, rows, kv_heads, kv_len, dim, generator=gen).to(device, dtype)  # [kernel|reference]
    cache[1] = cache[0]
    got = ops.decode_attention(qkv, heads, cos, sin, positions, cache[0, 0], cache[0, 1], kv_len, dim ** -0.5)
    query = TorchOps().rotary_kv(qkv.clone(), heads, cos, sin, positions, cache[1, 0], cache[1, 1], positions)
    hidden = torch.arange(kv_len, device=device).view(1, 1, 1, -1) > positions.view(rows, 1, 1, 1)
    mask = torch.zeros(rows, 1, 1, kv_len, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))
    want = _grouped_attention(query.transpose(1, 2), cache[1, 0], cache[1, 1], mask, dim ** -0.5)
    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

    return max(relative(got, want), relative(cache[0], cache[1]))
