"""What every OpenAI endpoint shares: the error shape, JSON parsing, sampling fields, usage.

Parsing is strict about what this server cannot honour (``best_of``, ``suffix``, tools...):
a client asking for it gets a 400 naming the parameter rather than a silently different
answer, as does every invalid value or combination. Fields this server does not know are
ignored, as OpenAI does.
Endpoint-specific requests and responses live in each endpoint's ``protocol`` module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

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
    n: int = 1
    logprobs: int | None = None  # how many alternatives per token (None: no log-probabilities)
    echo: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    response_format: ResponseFormat | None = None


@dataclass(frozen=True)
class ResponseFormat:
    """``response_format`` other than text: any JSON object, or JSON valid against ``schema``."""

    kind: Literal["json_object", "json_schema"]
    schema: dict[str, Any] | None = None


MAX_N = 128
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024
_UNSUPPORTED_IF_SET = {
    "best_of": (None, 1), "suffix": (None, ""), "tools": (None, []), "functions": (None, []),
    "dimensions": (None,),
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


def reject_unsupported(data: dict[str, Any]) -> None:
    for name, allowed in _UNSUPPORTED_IF_SET.items():
        if name in data and data[name] not in allowed:
            raise RequestError(400, f"'{name}' is not supported by this server", name)


def parse_model(data: dict[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "'model' is required and must be a string", "model")
    return model


def parse_sampling(data: dict[str, Any], default_max_tokens: int | None) -> SamplingFields:
    max_tokens = data.get("max_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif not is_int(max_tokens) or max_tokens < 1:
        raise RequestError(400, "'max_tokens' must be an integer >= 1", "max_tokens")
    temperature = _number(data, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(data, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0.0:
        raise RequestError(400, "'top_p' must be > 0 and <= 1", "top_p")
    seed = data.get("seed")
    if seed is not None and not is_int(seed):
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
    n = data.get("n")
    if n is None:
        n = 1
    elif not is_int(n) or not 1 <= n <= MAX_N:
        raise RequestError(400, f"'n' must be an integer between 1 and {MAX_N}", "n")
    return SamplingFields(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=_stop(data.get("stop")),
                          seed=seed, stream=stream, include_usage=include_usage, ignore_eos=ignore_eos, n=n,
                          presence_penalty=_number(data, "presence_penalty", 0.0, -2.0, 2.0),
                          frequency_penalty=_number(data, "frequency_penalty", 0.0, -2.0, 2.0),
                          logit_bias=_logit_bias(data.get("logit_bias")),
                          response_format=_response_format(data.get("response_format")))


def parse_top_logprobs(value: Any, name: str) -> int:
    """A count of alternatives per token: an integer 0..MAX_LOGPROBS."""
    if not is_int(value) or not 0 <= value <= MAX_LOGPROBS:
        raise RequestError(400, f"'{name}' must be an integer between 0 and {MAX_LOGPROBS}", name)
    return value


def _logit_bias(raw: Any) -> tuple[tuple[int, float], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or len(raw) > MAX_LOGIT_BIAS:
        raise RequestError(400, f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids",
                           "logit_bias")
    bias = []
    for key, value in raw.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise RequestError(400, f"'logit_bias' keys must be token ids, got {key[:32]!r}", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise RequestError(400, f"'logit_bias' values must be numbers between -100 and 100 (token {key})",
                               "logit_bias")
        bias.append((int(key), float(value)))
    return tuple(sorted(bias))


def _response_format(raw: Any) -> ResponseFormat | None:
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise RequestError(400, "'response_format.json_schema' must be an object whose 'schema' is a JSON "
                                    "Schema object", "response_format.json_schema")
        return ResponseFormat("json_schema", spec.get("schema", {}))
    raise RequestError(400, "'response_format.type' must be 'text', 'json_object' or 'json_schema'",
                       "response_format.type")


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


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- responses --------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_list(models: list[tuple[str, int]], owner: str = "kernelgate") -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": owner}
                     for name, created in models]}
