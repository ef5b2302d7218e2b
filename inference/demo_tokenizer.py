"""A byte-level tokenizer built in code, for random-weight models (nothing to download).

Every byte is one token (ids 0..255), followed by three special tokens; a ChatML-style
chat template makes ``/v1/chat/completions`` work with the demo model.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """Return the byte-level demo tokenizer (259 tokens: 256 bytes + 3 specials)."""
    vocab = {chr(codepoint): byte for byte, codepoint in enumerate(_gpt2_byte_to_codepoint())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                        pad_token=EOS_TOKEN, additional_special_tokens=[IM_START, IM_END])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _gpt2_byte_to_codepoint() -> list[int]:
    """GPT-2's byte-to-symbol table (the one ByteLevel uses), so token id == byte value."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    extra = 0
    mapping = []
    for byte in range(256):
        if byte in printable:
            mapping.append(byte)
        else:
            mapping.append(256 + extra)
            extra += 1
    return mapping
