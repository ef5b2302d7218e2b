"""OpenAI-compatible request and response models, and validation into OpenAI-shaped errors.

Parsing is strict about what this server cannot honour (``n`` other than 1, ``logprobs``,
``echo``...): a client asking for it gets a 400 naming the parameter rather than a
silently different answer. Fields this server does not know are ignored, as OpenAI does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from common import strict_json


class RequestError(Exception):
    """An error to return to the client as ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- requests ---------------------------------------------------------------------------------

Prompt = str | tuple[int, ...]


@dataclass(frozen=True)
class SamplingFields:
    """The decoding fields shared by completions and chat completions."""

    max_tokens: int | None
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    ignore_eos: bool = False


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: tuple[Prompt, ...]
    sampling: SamplingFields


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ChatCompletionRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingFields


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str, ...]
    encoding_format: str


DEFAULT_COMPLETION_MAX_TOKENS = 16
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant"})
_UNSUPPORTED_IF_SET = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []), "dimensions": (None,),
}


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400."""
    try:
        data = strict_json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(400, "request body must be a JSON object")
    return data


def parse_completion_request(data: dict[str, Any]) -> CompletionRequest:
    _reject_unsupported(data)
    return CompletionRequest(model=_model(data), prompts=_prompts(data.get("prompt")),
                             sampling=_sampling(data, default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS))


def parse_chat_request(data: dict[str, Any]) -> ChatCompletionRequest:
    _reject_unsupported(data)
    fmt = data.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise RequestError(400, "only response_format {'type': 'text'} is supported", "response_format")
    sampling_data = dict(data)
    if sampling_data.get("max_tokens") is None and sampling_data.get("max_completion_tokens") is not None:
        sampling_data["max_tokens"] = sampling_data["max_completion_tokens"]
    return ChatCompletionRequest(model=_model(data), messages=_messages(data.get("messages")),
                                 sampling=_sampling(sampling_data, default_max_tokens=None))


def parse_embedding_request(data: dict[str, Any], max_inputs: int) -> EmbeddingRequest:
    _reject_unsupported(data)
    raw = data.get("input")
    if isinstance(raw, str):
        inputs: tuple[str, ...] = (raw,)
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = tuple(raw)
    else:
        raise RequestError(400, "'input' must be a non-empty string or a non-empty list of strings", "input")
    if any(not text for text in inputs):
        raise RequestError(400, "'input' must not contain empty strings", "input")
    if len(inputs) > max_inputs:
        raise RequestError(400, f"'input' may hold at most {max_inputs} items, got {len(inputs)}", "input")
    fmt = data.get("encoding_format", "float") or "float"
    if fmt not in ("float", "base64"):
        raise RequestError(400, "'encoding_format' must be 'float' or 'base64'", "encoding_format")
    return EmbeddingRequest(model=_model(data), inputs=inputs, encoding_format=fmt)


def _reject_unsupported(data: dict[str, Any]) -> None:
    n = data.get("n", 1)
    if n is not None and (not _is_int(n) or n != 1):
        raise RequestError(400, "only n=1 is supported", "n")
    for name, allowed in _UNSUPPORTED_IF_SET.items():
        if name in data and data[name] not in allowed:
            raise RequestError(400, f"'{name}' is not supported by this server", name)


def _model(data: dict[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "'model' is required and must be a string", "model")
    return model


def _prompts(raw: Any) -> tuple[Prompt, ...]:
    if isinstance(raw, str):
        prompts: list[Prompt] = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
        prompts = list(raw)
    elif isinstance(raw, list) and raw and all(_is_int(t) for t in raw):
        prompts = [tuple(raw)]
    elif (isinstance(raw, list) and raw and all(isinstance(p, list) and p and all(_is_int(t) for t in p)
                                                 for p in raw)):
        prompts = [tuple(p) for p in raw]
    else:
        raise RequestError(400, "'prompt' must be a string, a list of strings, or token id lists", "prompt")
    if any(len(p) == 0 for p in prompts):
        raise RequestError(400, "'prompt' must not be empty", "prompt")
    return tuple(prompts)


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


def _sampling(data: dict[str, Any], default_max_tokens: int | None) -> SamplingFields:
    max_tokens = data.get("max_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise RequestError(400, "'max_tokens' must be an integer >= 1", "max_tokens")
    temperature = _number(data, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(data, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0.0:
        raise RequestError(400, "'top_p' must be > 0 and <= 1", "top_p")
    seed = data.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError(400, "'seed' must be an integer", "seed")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be a boolean", "stream")
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise RequestError(400, "'stream_options' is only allowed with stream=true", "stream_options")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise RequestError(400, "'stream_options' must be {'include_usage': bool}", "stream_options")
        include_usage = options.get("include_usage", False)
    ignore_eos = data.get("ignore_eos", False)  # vLLM's extension, used by benchmarks
    if not isinstance(ignore_eos, bool):
        raise RequestError(400, "'ignore_eos' must be a boolean", "ignore_eos")
    return SamplingFields(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=_stop(data.get("stop")),
                          seed=seed, stream=stream, include_usage=include_usage, ignore_eos=ignore_eos)


def _stop(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        return (raw,) if raw else ()
    if isinstance(raw, list) and len(raw) <= 4 and all(isinstance(s, str) and s for s in raw):
        return tuple(raw)
    raise RequestError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")


def _number(data: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(400, f"'{name}' must be a number", name)
    if not low <= value <= high:
        raise RequestError(400, f"'{name}' must be between {low:g} and {high:g}, got {value}", name)
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- responses --------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def completion_object(response_id: str, created: int, model: str, choices: list[dict[str, Any]],
                      usage_: dict[str, int] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": response_id, "object": "text_completion", "created": created, "model": model,
                            "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def chat_delta_choice(index: int, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def chat_object(response_id: str, created: int, model: str, choices: list[dict[str, Any]],
                usage_: dict[str, int] | None, chunk: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"id": response_id, "object": "chat.completion.chunk" if chunk else "chat.completion",
                            "created": created, "model": model, "choices": choices}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def embedding_object(model: str, vectors: list[Any], prompt_tokens: int) -> dict[str, Any]:
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def model_list(models: list[tuple[str, int]], owner: str = "kernelgate") -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": owner}
                     for name, created in models]}
