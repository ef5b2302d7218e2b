"""The key/value cache of the running batch: one fixed slot per sequence.

Token ``t`` of the sequence in slot ``s`` lives at column ``t`` of row ``s`` in every layer,
so each sequence keeps its own positions (no left padding, no shifting) and a sequence
can join or leave the batch between any two decode steps. Rows are kept dense (slots
``0..n-1`` are the running sequences) so a decode step reads one contiguous slice,
which is what lets it be captured as a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVGeometry:
    """Shape of one token's keys/values across the model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, hf_config: object) -> "KVGeometry":
        """Read the geometry off a Hugging Face config (GPT-2, OPT, Llama-style names)."""
        layers = _first_attr(hf_config, "num_hidden_layers", "n_layer")
        heads = _first_attr(hf_config, "num_attention_heads", "n_head")
        hidden = _first_attr(hf_config, "hidden_size", "n_embd")
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
        head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
        return cls(num_layers=int(layers), num_kv_heads=int(kv_heads), head_dim=int(head_dim))


def _first_attr(obj: object, *names: str) -> int:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    raise ValueError(f"model config has none of {names}")


class SlotKVCache:
    """Keys and values of every layer, ``[layers, 2, slots, kv_heads, max_len, head_dim]``."""

    def __init__(self, geometry: KVGeometry, num_slots: int, max_len: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.geometry = geometry
        self.num_slots = num_slots
        self.max_len = max_len
        self.storage = torch.zeros(geometry.num_layers, 2, num_slots, geometry.num_kv_heads, max_len,
                                   geometry.head_dim, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def keys(self, layer: int) -> torch.Tensor:
        return self.storage[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.storage[layer, 1]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` tokens of slot ``src`` into slot ``dst`` (keeps rows dense)."""
        self.storage[:, :, dst, :, :length].copy_(self.storage[:, :, src, :, :length])
