"""``/v1/chat/completions`` served: one call from the request body to a response or a stream.

In: the raw body, the tenant and the request span. Out (in a :class:`~inference.openai.http.Served`, with
the engine streams it started): a ``chat.completion`` object, or a
:class:`~inference.openai.serving.Stream` of ``chat.completion.chunk`` objects; a
:class:`RequestError` for anything the client must hear about.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry.trace import Span

from inference.openai import protocol
from inference.openai.http import Caller, Served
from inference.openai.chat.protocol import (chat_choice, chat_delta_choice, chat_logprobs, chat_object,
                                            parse_chat_request)
from inference.usage import apply_grant
from inference.openai.serving import Choice, GenerationModels, LogprobEntry, Submitted

OPERATION = "chat"  # gen_ai.operation.name


class ChatServing:
    def __init__(self, generation: GenerationModels) -> None:
        self._generation = generation

    async def create(self, body: bytes, caller: Caller, span: Span) -> Served:
        started = time.monotonic()
        request = apply_grant(parse_chat_request(protocol.parse_json(body)), caller.grant)
        return await self._generation.generate(
            request.model, request.sampling, lambda preprocessor: [preprocessor.chat(request)], caller=caller,
            span=span, started=started, operation=OPERATION, id_prefix="chatcmpl", shapes=_Shapes())


class _Shapes:
    """``chat.completion`` objects, and ``chat.completion.chunk`` objects opened by the role delta."""

    def whole(self, submitted: Submitted, choices: list[Choice], usage: dict[str, int]) -> dict[str, Any]:
        shaped = [chat_choice(c.index, c.text, c.finish_reason or "stop", _logprobs(c.logprobs)) for c in choices]
        return chat_object(submitted.request_id, submitted.created, submitted.model, shaped, usage, chunk=False)

    def opening(self, submitted: Submitted) -> list[dict[str, Any]]:
        first = [chat_delta_choice(i, {"role": "assistant", "content": ""}, None) for i in range(submitted.choices)]
        return [chat_object(submitted.request_id, submitted.created, submitted.model, first, None, chunk=True)]

    def chunk(self, submitted: Submitted, choice: Choice) -> dict[str, Any]:
        delta = {"content": choice.delta} if choice.delta else {}
        shaped = chat_delta_choice(choice.index, delta, choice.finish_reason, _logprobs(choice.delta_logprobs))
        return chat_object(submitted.request_id, submitted.created, submitted.model, [shaped], None, chunk=True)

    def usage_chunk(self, submitted: Submitted, usage: dict[str, int]) -> dict[str, Any]:
        return chat_object(submitted.request_id, submitted.created, submitted.model, [], usage, chunk=True)


def _logprobs(entries: list[LogprobEntry] | None) -> dict[str, Any] | None:
    if entries is None:
        return None
    return chat_logprobs([(e.token, e.logprob or 0.0, list(e.top or ())) for e in entries])
