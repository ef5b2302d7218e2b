"""Will a version fit? Estimate its weights + KV cache and compare with the device's free memory.

In: the ``ModelConfig`` of a version and its batch slots. Out: a :class:`MemoryEstimate`, and
:func:`check_fits`, which raises ``InsufficientMemory`` (saying both numbers) when the
estimate exceeds ``headroom`` times what is free: ``torch.cuda.mem_get_info`` on a GPU plus
what torch's caching allocator holds unused (a retired version's memory stays there, since
emptying the cache is a device-wide sync that stalls the serving version; an allocation that
finds no cached block fitting makes torch free them and retry), ``MemAvailable`` of
``/proc/meminfo`` on CPU. The weights are counted exactly by building the architecture on the
``meta`` device (no memory, no download: a local directory's ``config.json`` is enough); the KV cache is 2 x layers x KV heads x head size x slots x
context, as ``kv_cache.SlotKVCache`` allocates it. :class:`MemoryEstimator` remembers the weight
count per architecture and dtype, so a version of an architecture already counted (a new seed, a
fine-tune of the same shape) is not built again: the meta build is tens of milliseconds of Python
under the GIL, and on the H200 a serving version's prefill took 40-54 ms (not ~15) when a load
began beside it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from inference.config import ModelConfig
from inference.model_configs import random_config
from inference.model_loader import DEFAULT_MAX_MODEL_LEN, hf_skeleton, resolve_device, resolve_dtype
from inference.models.errors import InsufficientMemory


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_cache_bytes: int
    device: str

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes


def _hf_config(config: ModelConfig):  # noqa: ANN202 - a transformers PretrainedConfig
    if config.path is None:
        return random_config(config.random_config)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(config.path)


def _weight_count(hf, dtype: torch.dtype) -> int:  # noqa: ANN001 - a transformers PretrainedConfig
    module = hf_skeleton(hf, torch.device("meta"), dtype, attn_implementation=None)
    return sum(p.numel() for p in module.parameters())


class MemoryEstimator:
    """:func:`estimate` with the weight count of each architecture (its full config and dtype) kept:
    one per registry, the lifecycle's to own."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}

    def estimate(self, config: ModelConfig, slots: int) -> MemoryEstimate:
        return estimate(config, slots, self._count)

    def _count(self, hf, dtype: torch.dtype) -> int:  # noqa: ANN001 - a transformers PretrainedConfig
        key = (hf.to_json_string(use_diff=False), str(dtype))
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = _weight_count(hf, dtype)
        return count


def estimate(config: ModelConfig, slots: int, count=_weight_count) -> MemoryEstimate:  # noqa: ANN001
    """Weights + KV cache of ``config`` with ``slots`` batch slots (raises if the config cannot be read);
    ``count(hf_config, dtype)`` gives the number of weights (default: a meta build)."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    hf = _hf_config(config)
    element = torch.empty((), dtype=dtype).element_size()
    weights = count(hf, dtype) * element
    hf_text = getattr(hf, "text_config", hf)
    layers = int(getattr(hf_text, "num_hidden_layers", getattr(hf_text, "n_layer", 0)) or 0)
    heads = int(getattr(hf_text, "num_attention_heads", getattr(hf_text, "n_head", 1)) or 1)
    kv_heads = int(getattr(hf_text, "num_key_value_heads", None) or heads)
    hidden = int(getattr(hf_text, "hidden_size", getattr(hf_text, "n_embd", 0)) or 0)
    head_dim = int(getattr(hf_text, "head_dim", None) or (hidden // heads))
    context = int(getattr(hf_text, "max_position_embeddings", getattr(hf_text, "n_positions", 0))
                  or DEFAULT_MAX_MODEL_LEN)
    context = min(context, config.max_model_len or DEFAULT_MAX_MODEL_LEN)
    kv = 2 * layers * kv_heads * head_dim * slots * context * element
    return MemoryEstimate(weights_bytes=weights, kv_cache_bytes=kv, device=device.type)


def free_bytes(device: str) -> int:
    """Free memory of the device a version would load on."""
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return int(free) + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(name: str, est: MemoryEstimate, headroom: float) -> None:
    """Raise ``InsufficientMemory`` when ``est`` exceeds ``headroom`` x the device's free memory."""
    free = free_bytes(est.device)
    if est.total_bytes > headroom * free:
        raise InsufficientMemory(
            f"{name} needs about {est.total_bytes / 2**30:.2f} GiB on {est.device} (weights "
            f"{est.weights_bytes / 2**30:.2f} GiB + KV cache {est.kv_cache_bytes / 2**30:.2f} GiB) but "
            f"{free / 2**30:.2f} GiB is free ({headroom:.0%} usable); nothing was loaded")
