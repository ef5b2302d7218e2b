"""JWT bearer tokens: verify with pyjwt against the JWKS file, map claims to an Identity.

Time claims (exp, nbf) are checked here against the injected clock rather than by pyjwt (which
reads the system clock), so tests control time and cached tokens are judged the same way as
fresh ones. Verified tokens are cached by their exact text until they expire, so a client that
reuses its token pays for one signature check, not one per request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jwt as pyjwt

from sidecar.config import JwtConfig
from sidecar.identity.jwks import ALGORITHM_KEY_TYPES, KeySet, parse_jwks
from sidecar.identity.model import AuthError, Identity
from sidecar.identity.watched_file import WatchedFile

_Cached = tuple[Identity, float | None]  # identity, exp


def _claims_error(exc: pyjwt.PyJWTError) -> AuthError:
    """Translate pyjwt's exception (whose text we never pass on) into our reason codes."""
    if isinstance(exc, pyjwt.InvalidSignatureError):  # before DecodeError: it is a subclass
        return AuthError("bad_signature", "token signature is not valid")
    if isinstance(exc, pyjwt.InvalidAudienceError):
        return AuthError("wrong_audience", "token audience is not accepted")
    if isinstance(exc, pyjwt.InvalidIssuerError):
        return AuthError("wrong_issuer", "token issuer is not accepted")
    if isinstance(exc, pyjwt.MissingRequiredClaimError):
        if exc.claim == "aud":
            return AuthError("wrong_audience", "token has no audience")
        if exc.claim == "iss":
            return AuthError("wrong_issuer", "token has no issuer")
    if isinstance(exc, pyjwt.InvalidAlgorithmError):
        return AuthError("alg_not_allowed", "token algorithm is not allowed")
    return AuthError("malformed_token", "token is malformed")


def _time_claim(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuthError("malformed_token", f"token claim {name} is not a number")
    return float(value)


class JwtVerifier:
    """Checks bearer JWTs; holds the JWKS (reloaded on change) and a bounded cache."""

    def __init__(self, config: JwtConfig, clock: Callable[[], float], cache_size: int = 10_000) -> None:
        if config.jwks_file is None:
            raise ValueError("JwtVerifier needs jwt.jwks_file")
        self._config = config
        self._clock = clock
        self._cache_size = cache_size
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._jwks: WatchedFile[KeySet] = WatchedFile(config.jwks_file, parse_jwks, "JWKS file")
        # Only algorithms we know how to pair with a key type; "none" can never be in here.
        self._algorithms = frozenset(a for a in config.algorithms if a in ALGORITHM_KEY_TYPES)
        self._options = {
            "verify_signature": True,
            "verify_exp": False,  # checked in _check_times with the injected clock
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": config.audience is not None,
            "verify_iss": config.issuer is not None,
        }

    def maybe_reload(self) -> bool:
        """Reload the JWKS if the file changed; a new key set empties the token cache (revocation)."""
        if not self._jwks.maybe_reload():
            return False
        self._cache.clear()
        return True

    def verify(self, token: str) -> Identity:
        # For an ASCII string the length is the byte count; non-ASCII is never a valid JWT.
        if len(token) > self._config.max_token_bytes:
            raise AuthError("token_too_large", "token is larger than allowed")
        if not token.isascii():
            raise AuthError("malformed_token", "token is malformed")
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            identity, exp = cached
            if exp is not None and exp <= now - self._config.leeway_s:
                del self._cache[token]
                raise AuthError("token_expired", "token expired")
            self._cache.move_to_end(token)
            return identity
        identity, exp = self._verify_uncached(token, now)
        self._cache[token] = (identity, exp)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return identity

    def _verify_uncached(self, token: str, now: float) -> _Cached:
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.PyJWTError:
            raise AuthError("malformed_token", "token is malformed") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)):
            raise AuthError("malformed_token", "token header is malformed")
        if alg not in self._algorithms:
            raise AuthError("alg_not_allowed", "token algorithm is not allowed")
        key = self._jwks.value.select(alg, kid)
        try:
            claims = pyjwt.decode(
                token, key.key, algorithms=[alg], audience=self._config.audience,
                issuer=self._config.issuer, options=self._options,
            )
        except pyjwt.PyJWTError as exc:
            raise _claims_error(exc) from None
        exp = self._check_times(claims, now)
        return self._identity(claims), exp

    def _check_times(self, claims: dict[str, Any], now: float) -> float | None:
        leeway = self._config.leeway_s
        exp = _time_claim(claims, "exp")
        nbf = _time_claim(claims, "nbf")
        _time_claim(claims, "iat")  # type check only
        if exp is not None and exp <= now - leeway:
            raise AuthError("token_expired", "token expired")
        if nbf is not None and nbf > now + leeway:
            raise AuthError("token_not_yet_valid", "token is not valid yet")
        return exp

    def _identity(self, claims: dict[str, Any]) -> Identity:
        config = self._config
        tenant = claims.get(config.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise AuthError("missing_tenant", "token has no tenant claim")
        tier = claims.get(config.tier_claim)
        scopes = claims.get(config.scopes_claim)
        if isinstance(scopes, str):
            scope_list = tuple(scopes.split())
        elif isinstance(scopes, list):
            scope_list = tuple(s for s in scopes if isinstance(s, str))
        else:
            scope_list = ()
        subject = claims.get("sub")
        return Identity(
            authenticated=True, method="jwt", tenant=tenant,
            tier=tier if isinstance(tier, str) else None, scopes=scope_list,
            subject=subject if isinstance(subject, str) else None, key_name=None,
        )
