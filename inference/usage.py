"""Usage reports: what the GPU spent for each decision, told to the sidecar when a response ends.

In: the request's ``x-kernelgate-decision-id`` (put there by the sidecar on every allowed
request), the engine streams the request started (their final ``Spent`` counts, which the
engine gives however they end: finished, stop sequence, client gone, error, timeout) and how the
response ended. Out: one report per decision, ``{decision_id, prompt_tokens, completion_tokens,
ending}``, on the sidecar's gRPC settlement channel; a request rejected before the engine
reports zero, so its reservation is refunded at once. A lost report is not retried forever: the
sidecar's reservation expires and stays charged as reserved.

Also here: ``apply_grant``, the server's half of mid-stream enforcement: a request the sidecar
admitted with ``x-kernelgate-max-tokens`` generates no more than that, ends with
``finish_reason: "length"`` and, when streamed, always carries the usage chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2

from inference.generation import RequestStream

log = logging.getLogger("kernelgate.inference.usage")

SETTLE_METHOD = "/kernelgate.settlement.v1.Settlement/Settle"
DECISION_HEADER = "x-kernelgate-decision-id"
MAX_TOKENS_HEADER = "x-kernelgate-max-tokens"
_DECISION_ID = re.compile(r"^[0-9a-f]{32}$")
# How long to wait for the engine to let an aborted request go (it does so at the next step).
SPENT_WAIT_S = 30.0
R = TypeVar("R")


class UsageTracker:
    """One request's usage; ``finish`` reports it. Does nothing without a decision id."""

    def __init__(self, reporter: UsageReporter | None, decision_id: str | None) -> None:
        self._reporter = reporter if decision_id else None
        self.decision_id = decision_id
        self._streams: list[RequestStream] = []
        self._extra = (0, 0)

    def watch(self, streams: Iterable[RequestStream]) -> None:
        """Engine streams whose final counts make up this request's usage."""
        self._streams.extend(streams)

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Usage counted outside the engine streams (embeddings)."""
        self._extra = (self._extra[0] + prompt_tokens, self._extra[1] + completion_tokens)

    async def finish(self, ending: str) -> None:
        if self._reporter is None:
            return
        prompt, completion = self._extra
        for stream in self._streams:
            spent = await stream.spent(SPENT_WAIT_S)
            if spent is None:
                log.warning("engine gave no final count for %s; its reservation will expire", stream.request_id)
                return
            prompt += spent.prompt_tokens
            completion += spent.completion_tokens
        await self._reporter.report(self.decision_id or "", prompt, completion, ending)


class UsageReporter:
    """Sends reports to the sidecar at ``address`` (its gRPC listener), a few tries each."""

    def __init__(self, address: str, timeout_s: float = 5.0, attempts: int = 4) -> None:
        self._address = address
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._channel: grpc.aio.Channel | None = None
        self._settle: Any = None
        self._pending: set[asyncio.Task[None]] = set()

    def track(self, headers: Mapping[str, str]) -> UsageTracker:
        decision_id = headers.get(DECISION_HEADER)
        return UsageTracker(self, decision_id if decision_id and _DECISION_ID.match(decision_id) else None)

    async def report(self, decision_id: str, prompt_tokens: int, completion_tokens: int, ending: str) -> None:
        if self._settle is None:
            self._channel = grpc.aio.insecure_channel(self._address)
            self._settle = self._channel.unary_unary(SETTLE_METHOD,
                                                     request_serializer=struct_pb2.Struct.SerializeToString,
                                                     response_deserializer=struct_pb2.Struct.FromString)
        message = struct_pb2.Struct()
        message.update({"decision_id": decision_id, "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens, "ending": ending})
        for attempt in range(self._attempts):
            try:
                await self._settle(message, timeout=self._timeout_s)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED):
                    # a bad report, or a sidecar with settlement off (authz.ratelimit.settle: false):
                    # trying again cannot help
                    log.error("usage report for %s refused: %s", decision_id, exc.code().name)
                    return
                if attempt + 1 == self._attempts:
                    log.warning("usage report for %s lost (%s); its reservation will expire", decision_id,
                                exc.code().name)
                    return
                await asyncio.sleep(0.1 * 2 ** attempt)

    def finish_soon(self, tracker: UsageTracker, ending: str) -> asyncio.Task[None]:
        """Report in the background (the response is not held up); ``close`` waits for these."""
        task = asyncio.get_running_loop().create_task(tracker.finish(ending))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=SPENT_WAIT_S)
        if self._channel is not None:
            await self._channel.close()


async def finish_usage(tracker: UsageTracker, reporter: UsageReporter | None, ending: str, wait_s: float) -> None:
    """Report, waiting up to ``wait_s`` (a non-streamed response then goes out already settled);
    past that the report carries on in the background."""
    if reporter is None or tracker.decision_id is None:
        return
    task = reporter.finish_soon(tracker, ending)
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(task), wait_s)


def ending_of(status: int, client_closed: bool) -> str:
    if client_closed:
        return "disconnect"
    if status == 504:
        return "timeout"
    if status >= 500:
        return "error"
    if status >= 400:
        return "rejected"
    return "stop"


def grant_of(headers: Mapping[str, str]) -> int | None:
    """The sidecar's token grant for this request (``x-kernelgate-max-tokens``), or None."""
    raw = headers.get(MAX_TOKENS_HEADER)
    if raw is None or not raw.isdigit() or int(raw) < 1:
        return None
    return int(raw)


def apply_grant(parsed: R, grant: int | None) -> R:
    """Cap a completion request's ``max_tokens`` at the sidecar's grant; a capped stream always
    ends with the usage chunk. Without a grant the request is returned as it is."""
    if grant is None:
        return parsed
    sampling = parsed.sampling  # type: ignore[attr-defined]
    if sampling.max_tokens is not None and sampling.max_tokens <= grant:
        return parsed
    capped = dataclasses.replace(sampling, max_tokens=grant, include_usage=sampling.include_usage or sampling.stream)
    return dataclasses.replace(parsed, sampling=capped)  # type: ignore[type-var]
