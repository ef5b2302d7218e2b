"""Opaque bearer tokens: OAuth2 token introspection (RFC 7662), answers cached by token hash.

In: a token that is neither a JWT nor a known API key. Out: an Identity (method
``introspection``, issuer = the answer's ``iss`` or the endpoint's name) or AuthError.

The cache is keyed by sha256 of the token (a memory dump holds no usable token), bounded
(LRU), and keeps an active answer until ``exp`` or ``cache_ttl_s``, whichever is first, and an
inactive one for ``negative_cache_ttl_s``: so a revoked token is refused within
``cache_ttl_s``, and a flood of junk tokens reaches the provider once per token per
``negative_cache_ttl_s``. Concurrent checks of one token share one call. When the endpoint
is unreachable, cached answers keep serving; an uncached token fails with
``introspection_unavailable`` (503) and nothing is cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from sidecar.config import IntrospectionConfig
from sidecar.identity.claims import check_times, identity_from_claims
from sidecar.identity.model import AuthError, Identity, IdentityUnavailable
from sidecar.identity.provider_http import ProviderClient, ProviderError, ProviderHttp
from sidecar.identity.status import ProviderStatus

log = logging.getLogger(__name__)

# An answer: the identity, or the (reason, message) of the refusal, and until when it holds.
_Answer = tuple[Identity | tuple[str, str], float]


class Introspector:
    def __init__(self, config: IntrospectionConfig, clock: Callable[[], float] = time.time,
                 client: ProviderHttp | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        if config.url is None:
            raise ValueError("Introspector needs introspection.url")
        self.config = config
        self.name = config.display_name
        self._url = config.url
        self._clock = clock
        self._monotonic = monotonic
        self._client = client or ProviderClient(config.timeout_s, config.ca_file)
        self._cache: OrderedDict[bytes, _Answer] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[_Answer]] = {}
        self._up = True  # until a call fails
        self._last_error: str | None = None
        self._last_success: float | None = None
        self._ok = self._failed = 0

    async def introspect(self, token: str) -> Identity:
        key = hashlib.sha256(token.encode("utf-8")).digest()
        now = self._clock()
        answer = self._cache.get(key)
        if answer is not None and answer[1] > now:
            self._cache.move_to_end(key)
        else:
            task = self._inflight.get(key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._call(token, key))
                self._inflight[key] = task
                task.add_done_callback(lambda _t: self._inflight.pop(key, None))
            answer = await asyncio.shield(task)
        result = answer[0]
        if isinstance(result, Identity):
            return result
        raise AuthError(*result)

    async def _call(self, token: str, key: bytes) -> _Answer:
        auth = None
        if self.config.client_id is not None and self.config.client_secret_file is not None:
            try:
                with open(self.config.client_secret_file, encoding="utf-8") as f:
                    auth = aiohttp.BasicAuth(self.config.client_id, f.read().strip())
            except OSError as exc:
                self._fail(f"cannot read client_secret_file ({exc.strerror})")
                raise IdentityUnavailable("introspection_unavailable", "token introspection is misconfigured") \
                    from None
        try:
            doc = await self._client.post_form(self._url, {"token": token, "token_type_hint": "access_token"}, auth)
        except ProviderError as exc:
            self._fail(str(exc))
            raise IdentityUnavailable("introspection_unavailable",
                                      "the token introspection service is unreachable") from None
        if not self._up:
            log.info("token introspection %s reachable again", self.name)
        self._up, self._last_error, self._last_success = True, None, self._monotonic()
        self._ok += 1
        now = self._clock()
        try:
            identity, until = self._judge(doc, now), now + self.config.cache_ttl_s
            exp = doc.get("exp")
            if isinstance(exp, (int, float)) and not isinstance(exp, bool):
                until = min(until, float(exp))
            answer: _Answer = (identity, until)
        except AuthError as exc:
            answer = ((exc.reason, exc.message), now + self.config.negative_cache_ttl_s)
        self._remember(key, answer)
        return answer

    def _judge(self, doc: Mapping[str, Any], now: float) -> Identity:
        if doc.get("active") is not True:
            # RFC 7662 section 2.2: inactive says nothing more (revoked, expired, unknown alike).
            raise AuthError("token_inactive", "token is not active")
        if doc.get("token_use", "access_token") != "access_token":
            raise AuthError("wrong_token_type", "token is not an access token")
        check_times(doc, now, 0.0)
        if self.config.audiences:
            aud = doc.get("aud")
            auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not any(a in self.config.audiences for a in auds):
                raise AuthError("wrong_audience", "token audience is not accepted")
        iss = doc.get("iss")
        return identity_from_claims(doc, self.config.claims, "introspection",
                                    iss if isinstance(iss, str) and iss else self.name)

    def _remember(self, key: bytes, answer: _Answer) -> None:
        if self.config.cache_size <= 0 or answer[1] <= self._clock():
            return
        self._cache[key] = answer
        self._cache.move_to_end(key)
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)

    def _fail(self, error: str) -> None:
        if self._up:
            log.warning("token introspection %s unreachable (%s); cached answers keep serving", self.name, error)
        self._up, self._last_error = False, error
        self._failed += 1

    def status(self) -> ProviderStatus:
        age = None if self._last_success is None else self._monotonic() - self._last_success
        return ProviderStatus(
            name=self.name, method="introspection", up=self._up, last_success_age_s=age,
            last_error=self._last_error, fetches_ok=self._ok, fetches_failed=self._failed,
            refreshes_rate_limited=0, keys=len(self._cache),
        )

    async def close(self) -> None:
        await self._client.close()
