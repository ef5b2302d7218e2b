"""Who is calling: request headers in, an Identity (or AuthError) out.

No credentials gives ANONYMOUS, and the policy decides what anonymous callers may do; bad
credentials are an AuthError (401), never a silent downgrade to anonymous.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

from sidecar.config import IdentityConfig
from sidecar.identity.apikeys import MAX_API_KEY_LENGTH, hash_api_key, parse_api_key_file
from sidecar.identity.jwt import JwtVerifier
from sidecar.identity.model import ANONYMOUS, AuthError, Identity
from sidecar.identity.watched_file import WatchedFile


def _is_jwt(credential: str) -> bool:
    """A JWS compact token is three base64url parts; API keys never contain a dot."""
    return credential.count(".") == 2


class Authenticator:
    """Resolves the caller from ``x-api-key`` (or the configured header) or ``authorization: Bearer``."""

    def __init__(self, config: IdentityConfig, clock: Callable[[], float] = time.time,
                 jwt_cache_size: int = 10_000) -> None:
        self._config = config
        self._enabled = config.enabled
        self._api_key_header = config.api_key_header.lower()
        self._api_keys: WatchedFile[dict[str, Identity]] | None = (
            WatchedFile(config.api_keys_file, parse_api_key_file, "API key file")
            if config.api_keys_file else None
        )
        self._jwt: JwtVerifier | None = (
            JwtVerifier(config.jwt, clock, jwt_cache_size) if config.jwt.jwks_file else None
        )

    def authenticate(self, headers: Mapping[str, str]) -> Identity:
        """``headers`` has lowercase names (as in Envoy's CheckRequest)."""
        if not self._enabled:
            return ANONYMOUS
        api_key = headers.get(self._api_key_header)
        authorization = headers.get("authorization")
        if api_key is not None:
            if authorization is not None:
                raise AuthError("ambiguous_credentials", "send either an API key or an authorization header")
            return self._check_api_key(api_key.strip())
        if authorization is None:
            return ANONYMOUS
        scheme, credential = (authorization.split(None, 1) + ["", ""])[:2]
        if scheme.lower() != "bearer":
            raise AuthError("unsupported_scheme", "authorization scheme must be Bearer")
        credential = credential.strip()
        if not credential:
            raise AuthError("malformed_token", "bearer credential is empty")
        if _is_jwt(credential):
            if self._jwt is None:
                raise AuthError("jwt_not_configured", "bearer tokens are not accepted")
            return self._jwt.verify(credential)
        return self._check_api_key(credential)

    def _check_api_key(self, key: str) -> Identity:
        if self._api_keys is None or not key or len(key) > MAX_API_KEY_LENGTH:
            raise AuthError("invalid_api_key", "API key is not valid")
        identity = self._api_keys.value.get(hash_api_key(key))
        if identity is None:
            raise AuthError("invalid_api_key", "API key is not valid")
        return identity

    def maybe_reload(self) -> bool:
        """Re-read the key and JWKS files if they changed (one stat each); True if any did."""
        changed = False
        if self._api_keys is not None:
            changed |= self._api_keys.maybe_reload()
        if self._jwt is not None:
            changed |= self._jwt.maybe_reload()
        return changed

    async def watch(self, stop_event: asyncio.Event) -> None:
        """Call ``maybe_reload`` every ``reload_interval_s`` until ``stop_event`` is set."""
        while not stop_event.is_set():
            self.maybe_reload()
            try:
                await asyncio.wait_for(stop_event.wait(), timeout=self._config.reload_interval_s)
            except TimeoutError:
                pass
