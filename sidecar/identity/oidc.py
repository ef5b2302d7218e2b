"""OIDC issuers (and the Kubernetes service-account issuer): tokens verified with keys fetched
from the provider's JWKS URL, found through its discovery document.

In: a JWT whose ``iss`` is this issuer. Out: an Identity (method ``oidc`` or
``service_account``, issuer = the ``iss``) or AuthError.

Keys are fetched in the background (``run``: at start, then every ``refresh_interval_s``,
sooner with back-off after a failure) and on a token whose ``kid`` is unknown — at most once
per ``min_refresh_interval_s``, so forged kids cannot make us hammer the provider. All fetches
are awaited with aiohttp and shared: concurrent callers wait on the same fetch, and a check
waits at most ``check_wait_s`` for it. When the provider is unreachable the last good keys
stay in use, ``status()`` says so (metrics, health), and tokens signed by them keep working;
only a token whose key was never fetched fails (``issuer_unreachable``, 503).

pyjwt's PyJWKClient was the first choice, but it fetches with blocking urllib, refetches on
every unknown kid with no rate limit and forgets its keys when a fetch fails; the keys
themselves are still parsed by pyjwt (``PyJWK`` in ``jwks``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from sidecar.config import OidcIssuerConfig
from sidecar.identity.jwks import KeySet, parse_jwks_document
from sidecar.identity.jwt import TokenHeader, TokenRules, verify_signed
from sidecar.identity.model import AuthError, Identity, IdentityUnavailable
from sidecar.identity.provider_http import ProviderClient, ProviderError, ProviderHttp
from sidecar.identity.status import ProviderStatus
from sidecar.identity.watched_file import CredentialFileError

log = logging.getLogger(__name__)


def _fingerprints(doc: dict[str, Any]) -> frozenset[str]:
    return frozenset(json.dumps(k, sort_keys=True) for k in doc.get("keys", ()) if isinstance(k, dict))


class OidcIssuer:
    """One issuer: its keys (last good kept), their refresh, and token verification."""

    def __init__(self, config: OidcIssuerConfig, client: ProviderHttp | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.name = config.issuer
        self._client = client or ProviderClient(config.fetch_timeout_s, config.ca_file, config.bearer_token_file)
        self._monotonic = monotonic
        self.rules = TokenRules(
            algorithms=frozenset(config.algorithms), issuer=config.issuer, audience=list(config.audiences),
            leeway_s=config.leeway_s, claims=config.claim_mapping, method=config.method, require_exp=True,
        )
        self._keys: KeySet | None = None
        self._fingerprints: frozenset[str] = frozenset()
        # Bumped when a key disappears from the set: tokens cached under it are checked again.
        self.generation = 0
        self._jwks_uri: str | None = config.jwks_uri
        self._fetch: asyncio.Task[bool] | None = None
        self._last_attempt = float("-inf")
        self._last_success: float | None = None
        self._up = False
        self._last_error: str | None = None
        self._ok = self._failed = self._rate_limited = 0

    # --- verification ------------------------------------------------------------------------
    async def verify(self, token: str, header: TokenHeader, now: float) -> tuple[Identity, float | None]:
        keys = self._keys
        if keys is None:
            await self._refresh_for_check()
            keys = self._keys
            if keys is None:
                raise IdentityUnavailable("issuer_unreachable", "the token issuer's keys cannot be fetched")
        try:
            return verify_signed(token, header, keys, self.rules, now)
        except AuthError as exc:
            if exc.reason != "unknown_kid":
                raise
        # A kid we have not seen: the provider may have rotated its keys since the last fetch.
        await self._refresh_for_check()
        if self._keys is keys:
            raise AuthError("unknown_kid", "token key id is not known")
        return verify_signed(token, header, self._keys, self.rules, now)  # type: ignore[arg-type]

    async def _refresh_for_check(self) -> None:
        """Join the running fetch, or start one unless the last began too recently."""
        if self._fetch is None:
            if self._monotonic() - self._last_attempt < self.config.min_refresh_interval_s:
                self._rate_limited += 1
                return
            self._start_fetch()
        assert self._fetch is not None
        try:
            # shield: a check that gives up does not cancel the fetch others wait on.
            await asyncio.wait_for(asyncio.shield(self._fetch), self.config.check_wait_s)
        except TimeoutError:
            pass

    # --- fetching ----------------------------------------------------------------------------
    def _start_fetch(self) -> asyncio.Task[bool]:
        if self._fetch is None:
            self._last_attempt = self._monotonic()
            self._fetch = asyncio.get_running_loop().create_task(self._fetch_keys(), name=f"jwks {self.name}")
            self._fetch.add_done_callback(self._fetch_done)
        return self._fetch

    def _fetch_done(self, task: asyncio.Task[bool]) -> None:
        self._fetch = None

    async def refresh(self) -> bool:
        """Fetch the keys now (or join the fetch under way); True when it succeeded."""
        return await asyncio.shield(self._start_fetch())

    async def _fetch_keys(self) -> bool:
        try:
            if self._jwks_uri is None:
                self._jwks_uri = await self._discover()
            try:
                doc = await self._client.get_json(self._jwks_uri)
            except ProviderError:
                if self.config.jwks_uri is None:
                    self._jwks_uri = None  # discover again next time: the URL may have moved
                raise
            keys = parse_jwks_document(doc)
            if not keys.keys:
                raise ProviderError("JWKS holds no signing key")
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the last good keys stay
            if not isinstance(exc, (ProviderError, CredentialFileError)):
                log.exception("identity provider %s: unexpected error fetching keys", self.name)
                exc = ProviderError(f"unexpected {type(exc).__name__}")
            self._failed += 1
            self._last_error = str(exc)
            if self._up or self._ok == 0 and self._failed == 1:
                log.warning("identity provider %s unreachable (%s); %s", self.name, exc,
                            f"keeping the {len(self._keys.keys)} keys fetched before" if self._keys
                            else "its tokens fail with issuer_unreachable until it answers")
            self._up = False
            return False
        fingerprints = _fingerprints(doc)
        if self._fingerprints - fingerprints:
            self.generation += 1  # a key was withdrawn: what it vouched for is checked again
        if fingerprints != self._fingerprints:
            log.info("identity provider %s: %d signing keys", self.name, len(keys.keys))
        if not self._up and self._failed:
            log.info("identity provider %s reachable again", self.name)
        self._keys, self._fingerprints = keys, fingerprints
        self._ok += 1
        self._up = True
        self._last_error = None
        self._last_success = self._monotonic()
        return True

    async def _discover(self) -> str:
        doc = await self._client.get_json(self.config.discovery)
        issuer, jwks_uri = doc.get("issuer"), doc.get("jwks_uri")
        if issuer != self.config.issuer:
            # OpenID Connect Discovery 1.0 section 4.3: the document must be the issuer's own.
            raise ProviderError(f"discovery document names issuer {issuer!r}, not {self.config.issuer!r}")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise ProviderError("discovery document has no jwks_uri")
        return jwks_uri

    async def run(self, stop_event: asyncio.Event) -> None:
        """Fetch at start and on schedule until ``stop_event``; back off after failures."""
        failures = 0
        while not stop_event.is_set():
            ok = await self.refresh()
            failures = 0 if ok else failures + 1
            delay = self.config.refresh_interval_s if ok else min(
                self.config.refresh_interval_s, self.config.retry_interval_s * 2 ** min(failures - 1, 16))
            try:
                await asyncio.wait_for(stop_event.wait(), timeout=delay)
            except TimeoutError:
                pass

    def status(self) -> ProviderStatus:
        age = None if self._last_success is None else self._monotonic() - self._last_success
        return ProviderStatus(
            name=self.name, method=self.config.method, up=self._up, last_success_age_s=age,
            last_error=self._last_error, fetches_ok=self._ok, fetches_failed=self._failed,
            refreshes_rate_limited=self._rate_limited, keys=len(self._keys.keys) if self._keys else 0,
        )

    async def close(self) -> None:
        if self._fetch is not None:
            self._fetch.cancel()
        await self._client.close()
