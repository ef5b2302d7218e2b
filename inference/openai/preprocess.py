"""Tokenization, chat templates and context checks, run off the event loop before queueing.

Everything that can reject a request for its content happens here, so a request that
reaches the engine's queue is known to fit the model's context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inference.generation import Guide, SamplingParams
from inference.openai.chat.protocol import ChatCompletionRequest
from inference.openai.completion.protocol import CompletionRequest
from inference.openai.protocol import Prompt, RequestError, SamplingFields

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


@dataclass(frozen=True)
class PreparedPrompt:
    """One prompt, tokenized, with the sampling parameters it will run with."""

    token_ids: tuple[int, ...]
    params: SamplingParams
    echo: str = ""  # the prompt as text, when the client asked for it back (completions' echo)


class Preprocessor:
    """Turns parsed OpenAI requests into engine-ready prompts for one model."""

    def __init__(self, tokenizer: Any, max_model_len: int, vocab_size: int, max_sequences: int = 1,
                 grammars: Any = None) -> None:
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._vocab_size = vocab_size
        self._max_sequences = max_sequences
        self._grammars = grammars
        vocab = tokenizer.get_vocab()
        self._end_of_turn_ids = tuple(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tokenizer, "chat_template", None))

    def completion(self, request: CompletionRequest) -> list[PreparedPrompt]:
        prepared = []
        guide = self._guide(request.sampling)
        for index, prompt in enumerate(request.prompts):
            param = "prompt" if len(request.prompts) == 1 else f"prompt[{index}]"
            ids = self._encode(prompt, param)
            echo = "" if not request.sampling.echo else prompt if isinstance(prompt, str) else \
                self._tokenizer.decode(list(ids))
            prepared.append(PreparedPrompt(ids, self._params(request.sampling, len(ids), param, (), guide), echo))
        return prepared

    def chat(self, request: ChatCompletionRequest) -> PreparedPrompt:
        if not self.has_chat_template:
            raise RequestError(400, "this model has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        rendered = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tuple(self._tokenizer.encode(rendered, add_special_tokens=False))
        if not ids:
            raise RequestError(400, "'messages' render to an empty prompt", "messages")
        return PreparedPrompt(ids, self._params(request.sampling, len(ids), "messages", self._end_of_turn_ids,
                                                self._guide(request.sampling)))

    def _encode(self, prompt: Prompt, param: str) -> tuple[int, ...]:
        if isinstance(prompt, str):
            return tuple(self._tokenizer.encode(prompt, add_special_tokens=False))
        bad = [t for t in prompt if not 0 <= t < self._vocab_size]
        if bad:
            raise RequestError(400, f"token id {bad[0]} is outside the vocabulary (0..{self._vocab_size - 1})", param)
        return prompt

    def _guide(self, sampling: SamplingFields) -> Guide | None:
        fmt = sampling.response_format
        if fmt is None:
            return None
        if self._grammars is None:
            raise RequestError(400, "this server cannot constrain output to JSON (llguidance is not installed, or "
                                    "the tokenizer is not a fast one)", "response_format")
        try:
            return self._grammars.compile(fmt.kind, fmt.schema)
        except ValueError as exc:
            param = "response_format.json_schema.schema" if fmt.kind == "json_schema" else "response_format"
            raise RequestError(400, f"invalid {param}: {str(exc)[:500]}", param) from None

    def _params(self, sampling: SamplingFields, prompt_len: int, param: str,
                stop_token_ids: tuple[int, ...], guide: Guide | None) -> SamplingParams:
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
        if sampling.n > self._max_sequences:
            raise RequestError(400, f"'n' may be at most {self._max_sequences} here (the batch size)", "n")
        bad = [token for token, _ in sampling.logit_bias if token >= self._vocab_size]
        if bad:
            raise RequestError(400, f"'logit_bias' names token {bad[0]}, outside the vocabulary "
                                    f"(0..{self._vocab_size - 1})", "logit_bias")
        return SamplingParams(max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                              seed=sampling.seed, stop=sampling.stop, stop_token_ids=stop_token_ids,
                              ignore_eos=sampling.ignore_eos, n=sampling.n, logprobs=sampling.logprobs,
                              prompt_logprobs=sampling.logprobs if sampling.echo else None,
                              presence_penalty=sampling.presence_penalty,
                              frequency_penalty=sampling.frequency_penalty, logit_bias=sampling.logit_bias,
                              guide=guide)
