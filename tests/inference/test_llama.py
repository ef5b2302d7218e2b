"""The fused Llama-family decoder against transformers on the same weights (CPU, float32).

Greedy tokens through the engine (continuous batching over the slot cache) must equal
``generate`` of the Hugging Face model built from the same seed or the same directory, for
Llama (GQA), Llama 3 (llama3 rope scaling, one key/value head), Qwen2 (QKV biases, tied
embeddings) and Mistral layouts.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from inference.attention import _grouped_attention
from inference.config import BatchingConfig, ModelConfig
from inference.model_configs import DEMO_EOS, random_config
from inference.model_loader import build_random, load_model
from inference.runner import ModelRunner
from tests.inference.helpers import generate, started_engine, tiny_config

LLAMA_FAMILY = ["tiny-llama", "tiny-llama3", "tiny-qwen2", "tiny-mistral"]
PROMPTS = [[5, 17, 99, 3], list(range(40, 71)), [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


def _config(name: str, **changes: object) -> ModelConfig:
    return replace(ModelConfig(name=name, random_config=name, device="cpu", use_deepspeed=False), **changes)


def _hf_model(name: str, seed: int = 0) -> torch.nn.Module:
    """Hugging Face's module with the weights ``load_model`` gives ``name`` at ``seed``, on its eager attention."""
    return build_random(random_config(name), seed, torch.device("cpu"), torch.float32,
                        attn_implementation="eager").eval()


def _hf_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """``generate``'s greedy continuation, up to and including EOS as the engine reports it."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    return tokens[:tokens.index(DEMO_EOS) + 1] if DEMO_EOS in tokens else tokens


@pytest.mark.parametrize("name", LLAMA_FAMILY)
def test_fused_decoder_is_chosen_for_llama_family(name: str) -> None:
    loaded = load_model(_config(name))
    assert loaded.backend == "fused-torch"
    assert loaded.module.kv_geometry.num_kv_heads == random_config(name).num_key_value_heads


@pytest.mark.parametrize("name", LLAMA_FAMILY)
def test_prefill_and_decode_logits_match_transformers(name: str) -> None:
    """Teacher-forced logits of the fused decoder over the slot cache equal HF's full forward."""
    loaded = load_model(_config(name))
    hf = _hf_model(name)
    runner = ModelRunner(loaded.module, loaded.attention, num_slots=3, max_len=64, dtype=torch.float32,
                         device=torch.device("cpu"), use_cuda_graphs=False)
    prompts = [p[:12] for p in PROMPTS]
    nexts = [[7, 8, 9], [10, 11, 12], [13, 14, 15]]
    with torch.inference_mode():
        got = [runner.prefill(0, prompts)]
        for step in range(3):
            got.append(runner.decode([n[step] for n in nexts], [len(p) + step for p in prompts]))
        for row, prompt in enumerate(prompts):
            full = torch.tensor([prompt + nexts[row]])
            want = hf(full).logits[0]
            for step in range(4):
                reference = want[len(prompt) - 1 + step]
                assert torch.allclose(got[step][row], reference, atol=1e-4, rtol=1e-4), (name, row, step)


@pytest.mark.parametrize("name", LLAMA_FAMILY)
async def test_greedy_through_the_engine_equals_hf_generate(name: str) -> None:
    """Three prompts of different lengths decoded together in one continuous batch."""
    engine = started_engine(tiny_config(model=_config(name), batching=BatchingConfig(max_batch_size=4)))
    try:
        assert engine.info.backend == "fused-torch"
        got = await asyncio.gather(*(generate(engine, p, 20) for p in PROMPTS))
    finally:
        engine.shutdown(10)
    hf = _hf_model(name)
    for prompt, result in zip(PROMPTS, got):
        assert result.token_ids == _hf_greedy(hf, prompt, 20)


async def test_local_directory_serves_the_same_tokens_as_hf(tmp_path: Path) -> None:
    """A Qwen2-layout model saved with save_pretrained (safetensors) and served from that directory."""
    from inference.demo_tokenizer import build_demo_tokenizer

    hf = _hf_model("tiny-qwen2", seed=3)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    build_demo_tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    engine = started_engine(tiny_config(model=ModelConfig(name="local-qwen", path=str(tmp_path), device="cpu",
                                                          use_deepspeed=False)))
    try:
        assert engine.info.backend == "fused-torch"
        got = await generate(engine, PROMPTS[1], 16)
    finally:
        engine.shutdown(10)
    assert got.token_ids == _hf_greedy(hf, PROMPTS[1], 16)


def test_hf_decoder_can_still_be_chosen() -> None:
    assert load_model(_config("tiny-llama", decoder="hf")).backend == "hf"


def test_fused_decoder_rejects_other_architectures() -> None:
    with pytest.raises(ValueError, match="model.decoder 'fused' runs llama, qwen2 and mistral models, not 'gpt2'"):
        load_model(_config("tiny-gpt2", decoder="fused"))


def test_gpu_kernels_on_cpu_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="model.ops 'triton' needs CUDA"):
        load_model(_config("tiny-llama", ops="triton"))


def test_context_is_capped_when_unset() -> None:
    from inference.model_loader import DEFAULT_MAX_MODEL_LEN, _context_length

    assert _context_length(random_config("llama-3.1-8b"), None) == DEFAULT_MAX_MODEL_LEN
    assert _context_length(random_config("llama-3.1-8b"), 1024) == 1024
    assert _context_length(random_config("tiny-llama"), None) == 512
    assert _context_length(random_config("tiny-mistral"), None) == 256  # its sliding window


@pytest.mark.parametrize("q_len", [1, 5])
def test_grouped_attention_equals_repeated_keys(q_len: int) -> None:
    """Folding query groups into the query length is the same function as repeating keys/values."""
    gen = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, kv_len, dim = 3, 8, 2, 16, 32
    query = torch.randn(rows, heads, q_len, dim, generator=gen)
    keys = torch.randn(rows, kv_heads, kv_len, dim, generator=gen)
    values = torch.randn(rows, kv_heads, kv_len, dim, generator=gen)
    allowed = torch.rand(rows, 1, q_len, kv_len, generator=gen) > 0.3
    allowed[..., 0] = True
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    got = _grouped_attention(query, keys, values, mask, None)
    group = heads // kv_heads
    want = F.scaled_dot_product_attention(query, keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1),
                                          attn_mask=mask).transpose(1, 2)
    assert got.shape == (rows, q_len, heads, dim)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b", "qwen2.5-7b"])
def test_named_shapes_match_the_public_checkpoints(name: str) -> None:
    """Parameter counts of the named random configs are those of the checkpoints they stand for."""
    config = random_config(name)
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    bias = (q + 2 * kv) if config.model_type == "qwen2" else 0
    per_layer = hidden * (q + 2 * kv) + bias + q * hidden + 3 * hidden * inner + 2 * hidden
    embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    total = layers * per_layer + embeddings + hidden
    expected = {"llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512}[name]
    assert total == expected
