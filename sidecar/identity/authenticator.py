"""Who is calling: request headers (and the TLS peer Envoy reports) in, an Identity (or AuthError) out.

Which method runs is decided by what the request carries:

- ``x-api-key`` (or the configured header): an API key.
- ``authorization: Bearer`` with a JWT: chosen by its ``iss``: a configured OIDC issuer
  (``oidc``; the Kubernetes service-account issuer), else the JWKS file (``jwt``).
- ``authorization: Bearer`` with anything else: an API key, else token introspection.
- none of these but a client certificate (mTLS at Envoy): the certificate's URI SAN.
- nothing: ANONYMOUS, and the policy decides what anonymous callers may do.

Bad credentials are an AuthError (401; 503 when the provider that must vouch for them is
unreachable), never a silent downgrade to anonymous. Verified JWTs are cached here, one cache
for every issuer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

from sidecar.config import IdentityConfig
from sidecar.identity.apikeys import MAX_API_KEY_LENGTH, hash_api_key, parse_api_key_file
from sidecar.identity.introspection import Introspector
from sidecar.identity.jwt import JwtVerifier, TokenCache, check_token_text, read_header, unverified_issuer
from sidecar.identity.model import ANONYMOUS, AuthError, Identity
from sidecar.identity.mtls import PeerIdentities
from sidecar.identity.oidc import OidcIssuer
from sidecar.identity.status import ProviderStatus
from sidecar.identity.watched_file import WatchedFile


def _is_jwt(credential: str) -> bool:
    """A JWS compact token is three base64url parts; API keys never contain a dot."""
    return credential.count(".") == 2


class Authenticator:
    """Resolves the caller from its credentials; holds every method's keys and caches."""

    def __init__(self, config: IdentityConfig, clock: Callable[[], float] = time.time,
                 jwt_cache_size: int = 10_000) -> None:
        self._config = config
        self._enabled = config.enabled
        self._clock = clock
        self._api_key_header = config.api_key_header.lower()
        self._api_keys: WatchedFile[dict[str, Identity]] | None = (
            WatchedFile(config.api_keys_file, parse_api_key_file, "API key file")
            if config.api_keys_file else None
        )
        self._jwt: JwtVerifier | None = JwtVerifier(config.jwt) if config.jwt.jwks_file else None
        self._issuers: dict[str, OidcIssuer] = {c.issuer: OidcIssuer(c) for c in config.issuers}
        self._introspection: Introspector | None = (
            Introspector(config.introspection, clock) if config.introspection.url else None
        )
        self._peers: PeerIdentities | None = PeerIdentities(config.mtls) if config.mtls.enabled else None
        self._tokens = TokenCache(jwt_cache_size)
        self._max_token_bytes = config.jwt.max_token_bytes

    async def authenticate(self, headers: Mapping[str, str], peer_principal: str = "",
                           peer_certificate: str = "") -> Identity:
        """``headers`` has lowercase names (as in Envoy's CheckRequest); ``peer_*`` are the
        CheckRequest's ``source.principal`` and ``source.certificate``. With
        ``identity.enabled: false`` nobody is authenticated (ANONYMOUS; the policy reads the
        raw headers, as OPA-Envoy policies do)."""
        if not self._enabled:
            return ANONYMOUS
        api_key = headers.get(self._api_key_header)
        authorization = headers.get("authorization")
        if api_key is not None:
            if authorization is not None:
                raise AuthError("ambiguous_credentials", "send either an API key or an authorization header")
            return self._check_api_key(api_key.strip())
        if authorization is None:
            if self._peers is not None:
                try:
                    peer = self._peers.identify(peer_principal, peer_certificate)
                except AuthError as exc:
                    raise exc.tag("mtls") from None
                if peer is not None:
                    return peer
            return ANONYMOUS
        scheme, credential = (authorization.split(None, 1) + ["", ""])[:2]
        if scheme.lower() != "bearer":
            raise AuthError("unsupported_scheme", "authorization scheme must be Bearer")
        credential = credential.strip()
        if not credential:
            raise AuthError("malformed_token", "bearer credential is empty")
        if _is_jwt(credential):
            return await self._check_jwt(credential)
        if self._introspection is not None:
            identity = self._lookup_api_key(credential)
            if identity is not None:
                return identity
            check_token_text(credential, self._max_token_bytes)
            try:
                return await self._introspection.introspect(credential)
            except AuthError as exc:
                raise exc.tag("introspection", self._introspection.name) from None
        return self._check_api_key(credential)

    async def _check_jwt(self, token: str) -> Identity:
        check_token_text(token, self._max_token_bytes)
        now = self._clock()
        cached = self._tokens.get(token, now)
        if cached is not None:
            return cached
        if not self._issuers and self._jwt is None:
            raise AuthError("jwt_not_configured", "bearer tokens are not accepted")
        header = read_header(token)
        issuer = self._issuers.get(unverified_issuer(token) or "") if self._issuers else None
        if issuer is not None:
            try:
                identity, exp = await issuer.verify(token, header, now)
            except AuthError as exc:
                raise exc.tag(issuer.config.method, issuer.name) from None
            self._tokens.put(token, identity, exp, issuer.rules.leeway_s, issuer)
            return identity
        if self._jwt is None:
            raise AuthError("unknown_issuer", "token issuer is not accepted")
        try:
            identity, exp = self._jwt.verify(token, header, now)
        except AuthError as exc:
            raise exc.tag("jwt", self._jwt.config.issuer) from None
        self._tokens.put(token, identity, exp, self._jwt.rules.leeway_s, self._jwt)
        return identity

    def _lookup_api_key(self, key: str) -> Identity | None:
        if self._api_keys is None or not key or len(key) > MAX_API_KEY_LENGTH:
            return None
        return self._api_keys.value.get(hash_api_key(key))

    def _check_api_key(self, key: str) -> Identity:
        identity = self._lookup_api_key(key)
        if identity is None:
            raise AuthError("invalid_api_key", "API key is not valid").tag("api_key")
        return identity

    # --- providers: status, background refresh, shutdown ---------------------------------------
    def provider_status(self) -> list[ProviderStatus]:
        """Every remote provider's state, for metrics and the health service."""
        statuses = [issuer.status() for issuer in self._issuers.values()]
        if self._introspection is not None:
            statuses.append(self._introspection.status())
        return statuses

    def maybe_reload(self) -> bool:
        """Re-read the key and JWKS files if they changed (one stat each); True if any did."""
        changed = False
        if self._api_keys is not None:
            changed |= self._api_keys.maybe_reload()
        if self._jwt is not None:
            changed |= self._jwt.maybe_reload()
        return changed

    async def watch(self, stop_event: asyncio.Event) -> None:
        """Until ``stop_event``: reload changed files every ``reload_interval_s`` and keep every
        issuer's keys fresh (each on its own schedule)."""
        await asyncio.gather(self._watch_files(stop_event), *(i.run(stop_event) for i in self._issuers.values()))

    async def _watch_files(self, stop_event: asyncio.Event) -> None:
        while not stop_event.is_set():
            self.maybe_reload()
            try:
                await asyncio.wait_for(stop_event.wait(), timeout=self._config.reload_interval_s)
            except TimeoutError:
                pass

    async def close(self) -> None:
        for issuer in self._issuers.values():
            await issuer.close()
        if self._introspection is not None:
            await self._introspection.close()
