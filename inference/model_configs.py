"""Named architectures for random-weight models (demo, tests, GPU benchmark).

Shapes follow the public checkpoints of the same name; weights are drawn from a seeded
generator, so no download is ever needed. The ``tiny-*`` entries are sized for CPU tests
and use the demo byte-level tokenizer's vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import GPT2Config, LlamaConfig, OPTConfig, PretrainedConfig

DEMO_VOCAB = 259
DEMO_EOS = 256


def _tiny_gpt2() -> PretrainedConfig:
    return GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=512, vocab_size=DEMO_VOCAB,
                      bos_token_id=DEMO_EOS, eos_token_id=DEMO_EOS)


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


def _gpt2_medium() -> PretrainedConfig:
    return GPT2Config(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257,
                      bos_token_id=50256, eos_token_id=50256)


def _opt_1_3b() -> PretrainedConfig:
    return OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                     max_position_embeddings=2048, vocab_size=50272, word_embed_proj_dim=2048,
                     do_layer_norm_before=True, bos_token_id=2, eos_token_id=2, pad_token_id=1)


RANDOM_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-gpt2": _tiny_gpt2,
    "tiny-opt": _tiny_opt,
    "tiny-llama": _tiny_llama,
    "small-gpt2": _small_gpt2,
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
