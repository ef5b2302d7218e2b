"""``/v1/completions`` served: one call from the request body to a response or a stream.

In: the raw body, the tenant and the request span. Out (in a :class:`~inference.openai.http.Served`, with
the engine streams it started): a ``text_completion`` object, or a
:class:`~inference.openai.serving.Stream` of chunks; a :class:`RequestError` for anything the
client must hear about (bad input, not ready, queue full, engine failure).
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry.trace import Span

from inference.openai import protocol
from inference.openai.http import Caller, Served
from inference.openai.completion.protocol import (completion_choice, completion_logprobs, completion_object,
                                                  parse_completion_request)
from inference.usage import apply_grant
from inference.openai.serving import Choice, GenerationModels, LogprobEntry, Submitted

OPERATION = "text_completion"  # gen_ai.operation.name


class CompletionServing:
    def __init__(self, generation: GenerationModels) -> None:
        self._generation = generation

    async def create(self, body: bytes, caller: Caller, span: Span) -> Served:
        started = time.monotonic()
        request = apply_grant(parse_completion_request(protocol.parse_json(body)), caller.grant)
        return await self._generation.generate(
            request.model, request.sampling, lambda preprocessor: preprocessor.completion(request), caller=caller, span=span,
            started=started, operation=OPERATION, id_prefix="cmpl", shapes=_Shapes())


class _Shapes:
    """``text_completion`` objects, whole or as chunks."""

    def whole(self, submitted: Submitted, choices: list[Choice], usage: dict[str, int]) -> dict[str, Any]:
        shaped = [completion_choice(c.index, c.prefix + c.text, c.finish_reason or "stop", _logprobs(c.logprobs, 0))
                  for c in choices]
        return completion_object(submitted.request_id, submitted.created, submitted.model, shaped, usage)

    def opening(self, submitted: Submitted) -> list[dict[str, Any]]:
        return []

    def chunk(self, submitted: Submitted, choice: Choice) -> dict[str, Any]:
        shaped = completion_choice(choice.index, choice.delta, choice.finish_reason,
                                   _logprobs(choice.delta_logprobs, choice.delta_offset))
        return completion_object(submitted.request_id, submitted.created, submitted.model, [shaped], None)

    def usage_chunk(self, submitted: Submitted, usage: dict[str, int]) -> dict[str, Any]:
        return completion_object(submitted.request_id, submitted.created, submitted.model, [], usage)


def _logprobs(entries: list[LogprobEntry] | None, text_offset: int) -> dict[str, Any] | None:
    if entries is None:
        return None
    return completion_logprobs([e.token for e in entries], [e.logprob for e in entries],
                               [None if e.top is None else dict(e.top) for e in entries], text_offset)
