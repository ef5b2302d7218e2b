"""``/v1/embeddings`` served: one call from the request body to the response object.

In: the raw body, the tenant and the request span. Out: the ``list`` of embeddings with the prompt
tokens it counted (a :class:`~inference.openai.http.Served`), or a
:class:`RequestError` (bad input, unknown model, encoder not ready).
"""

from __future__ import annotations

from typing import Any, Protocol

from opentelemetry.trace import Span

from inference.openai import protocol
from inference.openai.embeddings.protocol import embedding_object, parse_embedding_request
from inference.openai.protocol import RequestError
from inference.openai.http import Caller, Served
from inference.openai.serving import ServedModels, not_started
from otel import names


class EmbeddingBackend(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def ready(self) -> bool: ...

    async def embed(self, texts: list[str], encoding_format: str) -> Any: ...


class EmbeddingServing:
    def __init__(self, encoder: EmbeddingBackend | None, models: ServedModels, max_inputs: int,
                 retry_after_s: int) -> None:
        self._encoder = encoder
        self._models = models
        self._max_inputs = max_inputs
        self._retry_after_s = retry_after_s

    async def create(self, body: bytes, caller: Caller, span: Span) -> Served:
        request = parse_embedding_request(protocol.parse_json(body), self._max_inputs)
        encoder = self._encoder
        if encoder is None or request.model != encoder.name:
            if request.model in self._models.generation:
                raise RequestError(400, f"model '{request.model}' does not support embeddings", "model")
            raise RequestError(404, f"model '{request.model}' does not exist", "model", code="model_not_found")
        span.set_attribute(names.GEN_AI_REQUEST_MODEL, request.model)
        if not encoder.ready:
            raise RequestError(503, "embeddings model is not ready", type="service_unavailable", code="not_ready",
                               headers=not_started(self._retry_after_s))
        result = await encoder.embed(list(request.inputs), request.encoding_format)
        span.set_attribute(names.GEN_AI_USAGE_INPUT_TOKENS, result.prompt_tokens)
        return Served(embedding_object(request.model, result.vectors, result.prompt_tokens),
                      prompt_tokens=result.prompt_tokens)
