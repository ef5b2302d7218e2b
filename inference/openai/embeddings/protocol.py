"""``/v1/embeddings``: the request as parsed and validated, and the response object.

In: the request's JSON object and the configured bound on inputs. Out: a frozen
:class:`EmbeddingRequest` (or a 400 naming the parameter), and the ``list`` response object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inference.openai.protocol import RequestError, parse_model, reject_unsupported


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str, ...]
    encoding_format: str


def parse_embedding_request(data: dict[str, Any], max_inputs: int) -> EmbeddingRequest:
    reject_unsupported(data)
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
    return EmbeddingRequest(model=parse_model(data), inputs=inputs, encoding_format=fmt)


def embedding_object(model: str, vectors: list[Any], prompt_tokens: int) -> dict[str, Any]:
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
