"""Loading the generative model: local HF directory or seeded random weights, then the decoder that runs it.

Llama-family models (llama, qwen2, mistral) run on kernelgate's fused decoder
(``inference/llama.py``) unless ``model.decoder`` is ``hf``; on a tensor-parallel group each
rank keeps its shard of it. Other models (GPT-2, OPT, ...) run on Hugging Face layers.
On CUDA with ``use_deepspeed``, ``deepspeed.init_inference`` replaces the transformer layers
with DeepSpeed's fused kernels; the attention core inside them is then routed to the slot
KV cache (see ``attention.py``), and the injected model is checked against the plain one
on a probe batch before it is used. A model DeepSpeed cannot inject (it raises, e.g.
Llama's "'tuple' object has no attribute 'size'") or whose injected output does not match
is served on the plain Hugging Face path instead, with a log line saying why.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from inference.attention import SlotAttention, install_in_deepspeed_layers, install_in_hf_model
from inference.config import ModelConfig
from inference.demo_tokenizer import build_demo_tokenizer
from inference.llama import FusedLlama, TensorParallel, sliding_window, supports
from inference.model_configs import random_config
from inference.ops import select_ops
from inference.runner import ModelRunner

log = logging.getLogger("kernelgate.inference.model")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROBE_TOLERANCE = 0.05
DEFAULT_MAX_MODEL_LEN = 8192
# Serialises the construction of random-weight modules (see ``build_random``): it guards torch's
# process-wide state (torch.nn.init's functions, the default dtype), so it is process-wide too.
_CONSTRUCTION = threading.Lock()


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve, with what the engine and the preprocessor need to know of it."""

    module: torch.nn.Module
    attention: SlotAttention
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    backend: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def load_model(config: ModelConfig, max_batch_size: int = 1, tp: TensorParallel | None = None) -> LoadedModel:
    """Build the model described by ``config`` (blocking; run it on the engine thread).

    ``max_batch_size`` is the largest batch the engine will run: DeepSpeed sizes its
    workspace once, at the first forward pass, so the injection probe runs at that width.
    ``tp`` places this process in a tensor-parallel group (the fused decoder only).
    """
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cpu" and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    started = time.monotonic()
    tokenizer = _load_tokenizer(config)
    module = _build_plain(config, device, dtype)
    attention = SlotAttention()
    max_len = _context_length(module.config, config.max_model_len)
    fused = config.decoder == "fused" or (config.decoder == "auto" and supports(module.config))
    if config.decoder == "fused" and not supports(module.config):
        raise ValueError(f"model.decoder 'fused' runs llama, qwen2 and mistral models, not "
                         f"{getattr(module.config, 'model_type', '?')!r}")
    if config.tp_size > 1 and not fused:
        raise ValueError("model.tp_size > 1 needs the fused decoder (a llama, qwen2 or mistral model)")
    if config.numerics == "tp_invariant" and not fused:
        raise ValueError("model.numerics 'tp_invariant' needs the fused decoder (a llama, qwen2 or mistral model)")
    if fused:
        ops = select_ops(config.ops, device, dtype)
        model = FusedLlama(module, attention, ops, max_len, tp,
                           invariant_shards=config.numerics_shards if config.numerics == "tp_invariant" else None)
        del module
        numerics = "default" if model.shards is None else f"tp_invariant ({model.shards} shards)"
        log.info("model %s: %s on %s, context %d, fused decoder with %s kernels, numerics %s (rank %d of %d: "
                 "%.2f GB of weights), built in %.1fs", config.name, str(dtype).removeprefix("torch."), device,
                 max_len, ops.name, numerics, model.tp.rank, model.tp.world_size, model.weight_bytes / 1e9,
                 time.monotonic() - started)
        return LoadedModel(module=model, attention=attention, tokenizer=tokenizer, device=device, dtype=dtype,
                           max_model_len=max_len, vocab_size=int(model.config.vocab_size),
                           eos_token_ids=_eos_ids(model.config, tokenizer), backend=f"fused-{ops.name}")
    install_in_hf_model(module, attention)
    params = sum(p.numel() for p in module.parameters())
    log.info("model %s: %.1fM parameters, %s on %s, context %d, built in %.1fs", config.name, params / 1e6,
             str(dtype).removeprefix("torch."), device, max_len, time.monotonic() - started)
    backend = "hf"
    if config.use_deepspeed and device.type != "cuda":
        log.info("DeepSpeed kernel injection needs CUDA (device is %s): serving on the plain Hugging Face path",
                 device)
    elif config.use_deepspeed:
        module, backend = with_deepspeed(config, module, attention, device, dtype, max_len, max_batch_size)
    return LoadedModel(module=module, attention=attention, tokenizer=tokenizer, device=device, dtype=dtype,
                       max_model_len=max_len, vocab_size=int(module.config.vocab_size),
                       eos_token_ids=_eos_ids(module.config, tokenizer), backend=backend)


def _load_tokenizer(config: ModelConfig) -> Any:
    if config.path is None:
        return build_demo_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.path)


def _build_plain(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if config.path is not None:
        log.info("loading model %s from %s", config.name, config.path)
        module = AutoModelForCausalLM.from_pretrained(config.path, torch_dtype=dtype, attn_implementation="sdpa")
        module = module.to(device)
    else:
        log.info("building random-weight model %s from config %r (seed %d)", config.name, config.random_config,
                 config.seed)
        module = build_random(random_config(config.random_config), config.seed, device, dtype)
    return module.eval()


def build_random(hf_config: Any, seed: int, device: torch.device, dtype: torch.dtype,
                 attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A Hugging Face module of ``hf_config`` with random weights that depend on ``seed`` alone.

    The weights are drawn from this build's own ``torch.Generator``, never from torch's global
    one: versions load on their own engine threads, beside each other (the configured models at
    start-up) and beside serving ones (a hot swap), and a global ``manual_seed`` + init let any
    other thread's draw in between, so "the same config and seed" gave other weights (#15: a
    version loaded with the active one's seed failed its shadow run). Hugging Face's own init is
    skipped (:func:`hf_skeleton`): it draws from the global generator, and on a 1B model it is
    hundreds of kernels and a walk of every module in Python; here it is one ``normal_`` per
    matrix. The scheme is Hugging Face's: matrices ~ N(0, ``initializer_range``), biases 0, norm
    weights 1 (GPT-2's scaled output projections are not scaled).
    """
    module = hf_skeleton(hf_config, device, dtype, attn_implementation)
    init_random_weights(module, seed, float(getattr(hf_config, "initializer_range", 0.02)))
    return module


def hf_skeleton(hf_config: Any, device: torch.device, dtype: torch.dtype,
                attn_implementation: str | None = "sdpa") -> torch.nn.Module:
    """``hf_config``'s module on ``device`` with its buffers, its parameters allocated but not
    initialised (tied embeddings tied). ``no_init_weights`` swaps torch.nn.init's functions for
    no-ops and ``from_config`` sets torch's default dtype, both process-wide: one construction
    at a time (the memory check builds on ``meta`` from executor threads too)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with _CONSTRUCTION, no_init_weights(), torch.device(device):
        module = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, **kwargs)
    module.tie_weights()
    return module


def init_random_weights(module: torch.nn.Module, seed: int, std: float) -> None:
    """Fill every parameter of ``module`` from a generator seeded with ``seed`` (tied ones once)."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2:
                generator = generators.get(param.device)
                if generator is None:
                    generator = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
                param.normal_(0.0, std, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:  # LayerNorm / RMSNorm scales
                param.fill_(1.0)


def _context_length(hf_config: Any, limit: int | None) -> int:
    """The context served: the model's own, within its sliding window (the slot cache attends over
    all of a sequence) and ``model.max_model_len``; unset, at most DEFAULT_MAX_MODEL_LEN, since
    the slot cache holds that many tokens for every slot (a 128k context would not fit)."""
    native = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None) or 2048
    window = sliding_window(hf_config)
    native = min(int(native), window) if window else int(native)
    if limit:
        return min(native, limit)
    if native > DEFAULT_MAX_MODEL_LEN:
        log.info("serving a context of %d tokens of the model's %d (set model.max_model_len for more)",
                 DEFAULT_MAX_MODEL_LEN, native)
    return min(native, DEFAULT_MAX_MODEL_LEN)


def _eos_ids(hf_config: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    for value in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))


Injector = Callable[[ModelConfig, torch.nn.Module, SlotAttention, torch.dtype, int], torch.nn.Module]


def with_deepspeed(config: ModelConfig, module: torch.nn.Module, attention: SlotAttention, device: torch.device,
                   dtype: torch.dtype, max_len: int, max_batch_size: int = 2,
                   inject: Injector | None = None) -> tuple[torch.nn.Module, str]:
    """Inject DeepSpeed kernels and verify them on a probe; on any failure rebuild the plain model."""
    inject = inject or _inject
    rows = max(2, max_batch_size)
    reference = _probe_logits(module, attention, dtype, device, rows)
    started = time.monotonic()
    try:
        injected = inject(config, module, attention, dtype, max_len)
        error = _relative_error(_probe_logits(injected, attention, dtype, device, rows), reference)
    except Exception as exc:  # noqa: BLE001 - any failure to inject means: serve without it
        log.warning("DeepSpeed cannot inject %s (%s: %s); falling back to the plain Hugging Face path",
                    config.name, type(exc).__name__, exc)
    else:
        if error <= PROBE_TOLERANCE:
            log.info("DeepSpeed kernel injection on for %s (probe relative error %.2g, %.1fs)", config.name,
                     error, time.monotonic() - started)
            return injected, "deepspeed" if config.kernel_inject else "deepspeed-autotp"
        log.warning("DeepSpeed-injected %s disagrees with the plain model (probe relative error %.2g > %.2g); "
                    "falling back to the plain Hugging Face path", config.name, error, PROBE_TOLERANCE)
    del module
    if device.type == "cuda":
        torch.cuda.empty_cache()
    plain = _build_plain(config, device, dtype)
    install_in_hf_model(plain, attention)
    return plain, "hf"


def _inject(config: ModelConfig, module: torch.nn.Module, attention: SlotAttention, dtype: torch.dtype,
            max_len: int) -> torch.nn.Module:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _cuda_arch())
    if config.tp_size == 1:  # one process: no launcher has set these
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)
    import deepspeed
    from deepspeed.model_implementations.transformers.ds_transformer import DeepSpeedTransformerInference

    engine = deepspeed.init_inference(module, dtype=dtype, replace_with_kernel_inject=config.kernel_inject,
                                      tensor_parallel={"tp_size": config.tp_size}, enable_cuda_graph=False,
                                      max_out_tokens=max_len)
    injected = engine.module
    layers = [m for m in injected.modules() if isinstance(m, DeepSpeedTransformerInference)]
    if config.kernel_inject:
        if not layers:
            raise RuntimeError("no layer was replaced by a DeepSpeed kernel")
        install_in_deepspeed_layers(layers, attention)
        log.info("DeepSpeed replaced %d transformer layers with fused kernels", len(layers))
    return injected


def _cuda_arch() -> str:
    """The op builder needs a plain arch ('9.0'): Hopper reports '9.0a' otherwise and the build dies."""
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _probe_logits(module: torch.nn.Module, attention: SlotAttention, dtype: torch.dtype, device: torch.device,
                  rows: int) -> list[torch.Tensor]:
    """Logits of a fixed ``rows``-sequence prefill (lengths 3..13) and three teacher-forced decode steps.

    The first forward pass through an injected model must be as wide as the widest batch
    the engine will run: DeepSpeed allocates its workspace once, sized by that first call,
    and a wider batch later would write past it.
    """
    vocab = min(int(module.config.vocab_size), 256)
    prompts = [[(7 * i + 3 * r + 1) % vocab for i in range(3 + r % 11)] for r in range(rows)]
    runner = ModelRunner(module, attention, num_slots=rows, max_len=64, dtype=dtype, device=device,
                         use_cuda_graphs=False)
    with torch.inference_mode():
        steps = [runner.prefill(0, prompts).float()]
        for step in range(3):
            positions = [len(p) + step for p in prompts]
            steps.append(runner.decode([(11 + step + r) % vocab for r in range(rows)], positions).float())
    return steps


def _relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((g - w).norm() / w.norm().clamp_min(1e-6)) for g, w in zip(got, want))
