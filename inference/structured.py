"""Constrained decoding for ``response_format`` json_object / json_schema, through llguidance.

In: the server's Hugging Face (fast) tokenizer once, then a response format per request.
Out: a :class:`~inference.generation.Guide` (the compiled grammar, validated against the
tokenizer, so a bad schema is a 400 before the request is queued), and per sequence a
:class:`GrammarMatcher` that gives the sampler the mask of allowed next tokens and follows
the tokens chosen.

Why llguidance: it works from the tokenizer itself (any fast HF tokenizer, byte-level or
not), computes a mask in ~50 us for a 128k vocabulary with no per-schema compile step to
cache (xgrammar compiles each schema first; outlines-core builds an index per schema, slow
for large schemas), has the widest JSON Schema coverage of the three in JSONSchemaBench,
and is a wheel with no runtime dependencies; vLLM, SGLang and llama.cpp ship it as a
backend. JSON is generated without free whitespace (``whitespace_flexible: false``): the
output is the same JSON, in fewer tokens, and a model cannot stall in a run of spaces.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Hashable
from typing import Any, Literal

import torch

from inference.generation import Guide

_BITS = 32

JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """The response format cannot be compiled (the message says why)."""


class Grammars:
    """Grammars for one tokenizer: compiles response formats, makes matchers."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        import llguidance
        import llguidance.hf

        self._llguidance = llguidance
        self._vocab_size = vocab_size
        # End-of-sequence ids the tokenizer knows (a random-weight model's config may name one beyond it).
        eos = [t for t in eos_token_ids if t < len(hf_tokenizer)]
        self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos or None)

    def compile(self, kind: Literal["json_object", "json_schema"], schema: dict[str, Any] | None) -> Guide:
        """The grammar of a response format; GrammarError when it is not usable."""
        matcher = self._llguidance.LLMatcher
        target = {"type": "object"} if kind == "json_object" else schema
        try:
            grammar = matcher.grammar_from_json_schema(json.dumps(target), defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
        error = matcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise GrammarError(error)
        return Guide(kind=kind, grammar=grammar)

    def matcher(self, guide: Guide) -> GrammarMatcher:
        return GrammarMatcher(self._llguidance.LLMatcher(self._tokenizer, guide.grammar, log_level=0),
                              self._vocab_size)


# The files a Hugging Face tokenizer directory may define the tokenizer with (a tokenizer's identity).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "merges.txt", "tokenizer.model")


def tokenizer_key(path: str | None, vocab_size: int, eos_token_ids: tuple[int, ...]) -> Hashable:
    """What :class:`Grammars` depend on: the tokenizer (``path`` None: the built-in demo tokenizer; a
    directory: the digest of its tokenizer files, so two versions in two directories with the same
    tokenizer share), the model's vocabulary size and its end-of-sequence ids."""
    if path is None:
        source: Hashable = "demo"
    else:
        digest = hashlib.sha256()
        found = False
        for name in _TOKENIZER_FILES:
            try:
                with open(os.path.join(path, name), "rb") as f:
                    digest.update(name.encode() + b"\0" + f.read() + b"\0")
                found = True
            except OSError:
                continue
        source = ("files", digest.hexdigest()) if found else ("path", os.path.realpath(path))
    return (source, int(vocab_size), tuple(eos_token_ids))


class GrammarTables:
    """The :class:`Grammars` of every tokenizer the server serves, built once per :func:`tokenizer_key`.

    Building them (llguidance's tables of the tokenizer) is one native call that holds the GIL for
    ~200 ms on a 128k vocabulary; a version loaded beside a serving one (a hot swap, #15) used to
    build its own, and the serving engine thread stalled that long (a 225 ms prefill on the H200).
    One object per server, owned by it and handed to each engine it builds; versions of one tokenizer
    share the tables (llguidance's tokenizer is immutable: a matcher per sequence is made from it on
    any thread). ``builds`` counts the builds (one per key)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[Hashable, Grammars | None] = {}
        self._building: dict[Hashable, threading.Lock] = {}
        self.builds = 0

    def get(self, key: Hashable, build: Callable[[], Grammars | None]) -> tuple[Grammars | None, bool]:
        """The tables of ``key`` and whether they were shared (False: built now by ``build``, which
        returns None when constrained decoding is unavailable for the tokenizer; that is kept too).
        Two engines asking for one key at once: one builds, the other waits for it."""
        with self._lock:
            if key in self._tables:
                return self._tables[key], True
            building = self._building.setdefault(key, threading.Lock())
        with building:
            with self._lock:
                if key in self._tables:
                    return self._tables[key], True
            tables = build()
            with self._lock:
                self._tables[key] = tables
                self.builds += 1
        return tables, False


class GrammarMatcher:
    """Where one sequence stands in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.words = (vocab_size + 31) // 32

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into ``row`` (host int32 ``[words]``, bit ``t % 32`` of word ``t // 32``)."""
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def accept(self, token: int) -> None:
        self._matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete (or broken): nothing more may be generated."""
        return self._matcher.is_stopped() or self._matcher.is_error()


def allowed(matchers: list[GrammarMatcher], width: int, device: torch.device) -> torch.Tensor:
    """``[len(matchers), width]`` booleans on ``device``: each row's allowed next tokens.

    The masks are computed on the host into one int32 bitmask (1/32 of the bytes), copied
    once, and unpacked on the device.
    """
    words = max(m.words for m in matchers)
    bitmask = torch.zeros(len(matchers), words, dtype=torch.int32, pin_memory=device.type == "cuda")
    for row, matcher in enumerate(matchers):
        matcher.fill(bitmask[row])
    bits = torch.arange(_BITS, dtype=torch.int32, device=device)
    unpacked = (bitmask.to(device, non_blocking=True).unsqueeze(-1) >> bits) & 1
    mask = unpacked.view(len(matchers), -1).bool()
    if mask.shape[1] >= width:
        return mask[:, :width]
    return torch.cat([mask, mask.new_zeros(len(matchers), width - mask.shape[1])], dim=1)
