"""HTTP to identity providers: one aiohttp session per provider, bounded in time and size.

In: a URL (and for introspection a form). Out: the decoded JSON object, or ProviderError whose
message names what went wrong (status, timeout, not JSON) and never a token or secret. Every
call awaits: nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Mapping
from typing import Any, Protocol

import aiohttp

MAX_RESPONSE_BYTES = 1 << 20


class ProviderError(Exception):
    """The provider could not be reached or gave an unusable answer."""


class ProviderHttp(Protocol):
    """What the OIDC and introspection methods need from HTTP (ProviderClient here)."""

    async def get_json(self, url: str) -> dict[str, Any]: ...

    async def post_form(self, url: str, form: Mapping[str, str],
                        auth: aiohttp.BasicAuth | None = None) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class ProviderClient:
    def __init__(self, timeout_s: float, ca_file: str | None = None,
                 bearer_token_file: str | None = None) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._ssl: ssl.SSLContext | None = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self._bearer_token_file = bearer_token_file
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running loop (aiohttp binds a session to its loop).
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True, limit=8),
            )
        return self._session

    def _headers(self) -> dict[str, str]:
        # JWKS endpoints may answer only their own type (kube-apiserver: 406 to plain JSON).
        headers = {"accept": "application/json, application/jwk-set+json"}
        if self._bearer_token_file:
            try:
                with open(self._bearer_token_file, encoding="utf-8") as f:
                    headers["authorization"] = "Bearer " + f.read().strip()
            except OSError as exc:
                raise ProviderError(f"cannot read bearer_token_file ({exc.strerror})") from None
        return headers

    async def get_json(self, url: str) -> dict[str, Any]:
        return await self._request("GET", url, None, None)

    async def post_form(self, url: str, form: Mapping[str, str],
                        auth: aiohttp.BasicAuth | None = None) -> dict[str, Any]:
        return await self._request("POST", url, dict(form), auth)

    async def _request(self, method: str, url: str, form: dict[str, str] | None,
                       auth: aiohttp.BasicAuth | None) -> dict[str, Any]:
        try:
            async with self._client().request(method, url, data=form, auth=auth, headers=self._headers(),
                                              allow_redirects=False) as resp:
                if resp.status != 200:
                    raise ProviderError(f"{method} {url}: HTTP {resp.status}")
                body = await resp.content.read(MAX_RESPONSE_BYTES + 1)
        except TimeoutError:
            raise ProviderError(f"{method} {url}: timed out") from None
        except aiohttp.ClientError as exc:
            raise ProviderError(f"{method} {url}: {type(exc).__name__}") from None
        if len(body) > MAX_RESPONSE_BYTES:
            raise ProviderError(f"{method} {url}: answer larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ProviderError(f"{method} {url}: answer is not JSON") from None
        if not isinstance(doc, dict):
            raise ProviderError(f"{method} {url}: answer is not a JSON object")
        return doc

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        await asyncio.sleep(0)
