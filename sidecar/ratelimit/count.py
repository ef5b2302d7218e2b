"""Prompt tokens counted by the inference server itself, with the served model's tokenizer and
chat template (its ``POST /tokenize``), so a reservation is exact rather than a guess.

In: the request body the sidecar already holds. Out: the prompt's token count, or None (no
counter configured, nothing to count, the server could not answer in ``timeout_s``); the caller
then falls back to the estimate. The server is asked rather than a tokenizer loaded here: it is
the one process that holds the model's tokenizer, template and validation, so the two can never
drift apart, and the sidecar stays free of transformers and of any model files.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import aiohttp

log = logging.getLogger(__name__)


class PromptCounter(Protocol):
    async def count(self, body: str, parsed_body: Mapping[str, Any]) -> int | None: ...

    async def close(self) -> None: ...


class ServerPromptCounter:
    """``POST <url>`` with the request's own body; answers ``{"count": n, ...}``."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self._url = url
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def count(self, body: str, parsed_body: Mapping[str, Any]) -> int | None:
        if "prompt" not in parsed_body and "messages" not in parsed_body:
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64, force_close=False))
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._session.post(self._url, data=body.encode(),
                                              headers={"content-type": "application/json"}) as resp:
                    if resp.status != 200:
                        return None  # the server will refuse the request itself; the estimate stands in
                    count = (await resp.json()).get("count")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("prompt count unavailable (%s); using the estimate", type(exc).__name__)
            return None
        return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
