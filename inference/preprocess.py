"""Tokenization, chat templates and context checks, run off the event loop before queueing.

Everything that can reject a request for its content happens here, so a request that
reaches the engine's queue is known to fit the model's context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inference.generation import SamplingParams
from inference.protocol import ChatCompletionRequest, CompletionRequest, Prompt, RequestError, SamplingFields

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


@dataclass(frozen=True)
class PreparedPrompt:
    """One prompt, tokenized, with the sampling parameters it will run with."""

    token_ids: tuple[int, ...]
    params: SamplingParams


class Preprocessor:
    """Turns parsed OpenAI requests into engine-ready prompts for one model."""

    def __init__(self, tokenizer: Any, max_model_len: int, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._vocab_size = vocab_size
        vocab = tokenizer.get_vocab()
        self._end_of_turn_ids = tuple(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tokenizer, "chat_template", None))

    def completion(self, request: CompletionRequest) -> list[PreparedPrompt]:
        prepared = []
        for index, prompt in enumerate(request.prompts):
            param = "prompt" if len(request.prompts) == 1 else f"prompt[{index}]"
            ids = self._encode(prompt, param)
            prepared.append(PreparedPrompt(ids, self._params(request.sampling, len(ids), param, ())))
        return prepared

    def chat(self, request: ChatCompletionRequest) -> PreparedPrompt:
        if not self.has_chat_template:
            raise RequestError(400, "this model has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        rendered = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tuple(self._tokenizer.encode(rendered, add_special_tokens=False))
        if not ids:
            raise RequestError(400, "'messages' render to an empty prompt", "messages")
        return PreparedPrompt(ids, self._params(request.sampling, len(ids), "messages", self._end_of_turn_ids))

    def _encode(self, prompt: Prompt, param: str) -> tuple[int, ...]:
        if isinstance(prompt, str):
            return tuple(self._tokenizer.encode(prompt, add_special_tokens=False))
        bad = [t for t in prompt if not 0 <= t < self._vocab_size]
        if bad:
            raise RequestError(400, f"token id {bad[0]} is outside the vocabulary (0..{self._vocab_size - 1})", param)
        return prompt

    def _params(self, sampling: SamplingFields, prompt_len: int, param: str,
                stop_token_ids: tuple[int, ...]) -> SamplingParams:
        limit = self._max_model_len
        if prompt_len >= limit:
            raise RequestError(400, f"This model's maximum context length is {limit} tokens, but the prompt has "
                                    f"{prompt_len} tokens.", param, code="context_length_exceeded")
        max_tokens = sampling.max_tokens if sampling.max_tokens is not None else limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise RequestError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                    f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for "
                                    "the completion). Please reduce the prompt or max_tokens.", "max_tokens",
                               code="context_length_exceeded")
        return SamplingParams(max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                              seed=sampling.seed, stop=sampling.stop, stop_token_ids=stop_token_ids,
                              ignore_eos=sampling.ignore_eos)
