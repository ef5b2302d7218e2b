"""``/v1/completions``: the request as parsed and validated, and the response objects.

In: the request's JSON object. Out: a frozen :class:`CompletionRequest`, or a
:class:`~inference.openai.protocol.RequestError` naming the bad parameter; and the
``text_completion`` objects (whole response or stream chunk) the serving layer fills.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from inference.openai.protocol import (Prompt, RequestError, SamplingFields, is_int, parse_model, parse_sampling,
                                       parse_top_logprobs, reject_unsupported)

DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: tuple[Prompt, ...]
    sampling: SamplingFields


def parse_completion_request(data: dict[str, Any]) -> CompletionRequest:
    reject_unsupported(data)
    sampling = parse_sampling(data, default_max_tokens=DEFAULT_MAX_TOKENS)
    logprobs = data.get("logprobs")
    echo = data.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise RequestError(400, "'echo' must be a boolean", "echo")
    sampling = replace(sampling, logprobs=None if logprobs is None else parse_top_logprobs(logprobs, "logprobs"),
                       echo=bool(echo))
    return CompletionRequest(model=parse_model(data), prompts=_prompts(data.get("prompt")), sampling=sampling)


def _prompts(raw: Any) -> tuple[Prompt, ...]:
    if isinstance(raw, str):
        prompts: list[Prompt] = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
        prompts = list(raw)
    elif isinstance(raw, list) and raw and all(is_int(t) for t in raw):
        prompts = [tuple(raw)]
    elif (isinstance(raw, list) and raw and all(isinstance(p, list) and p and all(is_int(t) for t in p)
                                                 for p in raw)):
        prompts = [tuple(p) for p in raw]
    else:
        raise RequestError(400, "'prompt' must be a string, a list of strings, or token id lists", "prompt")
    if any(len(p) == 0 for p in prompts):
        raise RequestError(400, "'prompt' must not be empty", "prompt")
    return tuple(prompts)


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_logprobs(tokens: list[str], logprobs: list[float | None], top: list[dict[str, float] | None],
                        text_offset: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, ``text_offset`` counted from ``text_offset``."""
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def completion_object(response_id: str, created: int, model: str, choices: list[dict[str, Any]],
                      usage_: dict[str, int] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": response_id, "object": "text_completion", "created": created, "model": model,
                            "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body
