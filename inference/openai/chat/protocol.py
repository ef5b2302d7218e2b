"""``/v1/chat/completions``: the request as parsed and validated, and the response objects.

In: the request's JSON object. Out: a frozen :class:`ChatCompletionRequest`, or a
:class:`~inference.openai.protocol.RequestError` naming the bad parameter; and the
``chat.completion`` / ``chat.completion.chunk`` objects the serving layer fills.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from inference.openai.protocol import (RequestError, SamplingFields, parse_model, parse_sampling, parse_top_logprobs,
                                       reject_unsupported)

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant"})


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ChatCompletionRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingFields


def parse_chat_request(data: dict[str, Any]) -> ChatCompletionRequest:
    reject_unsupported(data)
    if data.get("echo") not in (None, False):
        raise RequestError(400, "'echo' is a /v1/completions parameter", "echo")
    sampling_data = dict(data)
    if sampling_data.get("max_tokens") is None and sampling_data.get("max_completion_tokens") is not None:
        sampling_data["max_tokens"] = sampling_data["max_completion_tokens"]
    sampling = parse_sampling(sampling_data, default_max_tokens=None)
    logprobs, top = data.get("logprobs"), data.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise RequestError(400, "'logprobs' must be a boolean", "logprobs")
    if top is not None and not logprobs:
        raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if logprobs:
        sampling = replace(sampling, logprobs=0 if top is None else parse_top_logprobs(top, "top_logprobs"))
    return ChatCompletionRequest(model=parse_model(data), messages=_messages(data.get("messages")), sampling=sampling)


def _messages(raw: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    messages = []
    for index, item in enumerate(raw):
        param = f"messages[{index}]"
        if not isinstance(item, dict):
            raise RequestError(400, f"{param} must be an object", param)
        role = item.get("role")
        if role not in CHAT_ROLES:
            raise RequestError(400, f"{param}.role must be one of {sorted(CHAT_ROLES)}", f"{param}.role")
        messages.append(ChatMessage(role=role, content=_content(item.get("content"), f"{param}.content")))
    return tuple(messages)


def _content(raw: Any, param: str) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                     and isinstance(p.get("text"), str) for p in raw):
        return "".join(p["text"] for p in raw)
    raise RequestError(400, f"{param} must be a string or a list of text parts", param)


def chat_choice(index: int, text: str, finish_reason: str | None,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_delta_choice(index: int, delta: dict[str, Any], finish_reason: str | None,
                      logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]]) -> dict[str, Any]:
    """``{"content": [{token, logprob, bytes, top_logprobs}]}`` from (token, logprob, alternatives)."""
    return {"content": [{"token": token, "logprob": logprob, "bytes": list(token.encode()),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]}
                        for token, logprob, top in entries]}


def chat_object(response_id: str, created: int, model: str, choices: list[dict[str, Any]],
                usage_: dict[str, int] | None, chunk: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"id": response_id, "object": "chat.completion.chunk" if chunk else "chat.completion",
                            "created": created, "model": model, "choices": choices}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body
