"""Named architectures for random-weight models (demo, tests, GPU benchmark).

Shapes follow the public checkpoints of the same name (their config.json: layers, widths,
heads and key/value heads, rope theta and scaling, norm epsilon, tied embeddings); weights
are drawn from a seeded generator, so no download is ever needed. The ``tiny-*`` entries
are sized for CPU tests and use the demo byte-level tokenizer's vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, PretrainedConfig, Qwen2Config

DEMO_VOCAB = 259
DEMO_EOS = 256


def _tiny_gpt2() -> PretrainedConfig:
    return GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=512, vocab_size=DEMO_VOCAB,
                      bos_token_id=DEMO_EOS, eos_token_id=DEMO_EOS)


def _tiny_gpt2_sharp() -> PretrainedConfig:
    """tiny-gpt2 with a wide initialisation (std 1 instead of 0.02): its random logits are far apart, so a
    greedy choice is not a near-tie. For checks that compare two versions' outputs (the shadow run of a new
    version): two versions with *other* weights then disagree for sure, and the same weights agree even
    when the batches around them differ (rounding cannot flip a choice)."""
    config = _tiny_gpt2()
    config.initializer_range = 1.0
    return config


def _tiny_opt() -> PretrainedConfig:
    return OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=2,
                     max_position_embeddings=512, vocab_size=DEMO_VOCAB, word_embed_proj_dim=64,
                     bos_token_id=DEMO_EOS, eos_token_id=DEMO_EOS, pad_token_id=DEMO_EOS)


def _tiny_llama() -> PretrainedConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, vocab_size=DEMO_VOCAB,
                       bos_token_id=DEMO_EOS, eos_token_id=DEMO_EOS)


def _small_gpt2() -> PretrainedConfig:
    """A deeper, wider GPT-2 on the demo vocabulary: several times slower a token than tiny-gpt2 on CPU
    (a bigger model to degrade from, or a slow replica, in CPU tests)."""
    return GPT2Config(n_layer=12, n_embd=512, n_head=8, n_positions=1024, vocab_size=DEMO_VOCAB,
                      bos_token_id=DEMO_EOS, eos_token_id=DEMO_EOS)


def _tiny_qwen2() -> PretrainedConfig:
    """Qwen2's layout at test size: QKV biases, 6 query heads over 2 key/value heads, tied embeddings."""
    return Qwen2Config(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                       num_key_value_heads=2, max_position_embeddings=512, vocab_size=DEMO_VOCAB, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=DEMO_EOS, eos_token_id=DEMO_EOS)


def _tiny_llama3() -> PretrainedConfig:
    """Llama 3's rope scaling ("llama3") and a 64-wide head at test size."""
    return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=1, max_position_embeddings=512, vocab_size=DEMO_VOCAB, rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                       rms_norm_eps=1e-5, bos_token_id=DEMO_EOS, eos_token_id=DEMO_EOS)


def _tiny_llama_kv4() -> PretrainedConfig:
    """Four key/value heads at test size: tensor parallel over four ranks (tests of ``tp_invariant`` numerics)."""
    return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=4, max_position_embeddings=512, vocab_size=DEMO_VOCAB,
                       bos_token_id=DEMO_EOS, eos_token_id=DEMO_EOS)


def _tiny_mistral() -> PretrainedConfig:
    """Mistral's layout at test size (its sliding window caps the served context)."""
    return MistralConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=256,
                         vocab_size=DEMO_VOCAB, bos_token_id=DEMO_EOS, eos_token_id=DEMO_EOS)


_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _llama_3_2_1b() -> PretrainedConfig:
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                       rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)


def _llama_3_1_8b() -> PretrainedConfig:
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                       rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


def _qwen2_5_7b() -> PretrainedConfig:
    return Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                       bos_token_id=151643, eos_token_id=151643)


def _gpt2_medium() -> PretrainedConfig:
    return GPT2Config(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257,
                      bos_token_id=50256, eos_token_id=50256)


def _opt_1_3b() -> PretrainedConfig:
    return OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                     max_position_embeddings=2048, vocab_size=50272, word_embed_proj_dim=2048,
                     do_layer_norm_before=True, bos_token_id=2, eos_token_id=2, pad_token_id=1)


RANDOM_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-gpt2": _tiny_gpt2,
    "tiny-gpt2-sharp": _tiny_gpt2_sharp,
    "tiny-opt": _tiny_opt,
    "tiny-llama": _tiny_llama,
    "small-gpt2": _small_gpt2,
    "tiny-llama3": _tiny_llama3,
    "tiny-llama-kv4": _tiny_llama_kv4,
    "tiny-qwen2": _tiny_qwen2,
    "tiny-mistral": _tiny_mistral,
    "llama-3.2-1b": _llama_3_2_1b,
    "llama-3.1-8b": _llama_3_1_8b,
    "qwen2.5-7b": _qwen2_5_7b,
    "gpt2-medium": _gpt2_medium,
    "opt-1.3b": _opt_1_3b,
}


def random_config(name: str) -> PretrainedConfig:
    """The config of a named random-weight architecture; ValueError names the known ones."""
    try:
        factory = RANDOM_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown random_config {name!r} (known: {', '.join(sorted(RANDOM_CONFIGS))})") from None
    return factory()
