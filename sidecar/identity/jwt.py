"""JWT bearer tokens: header and signature checks with pyjwt against a KeySet, claims to an Identity.

Shared by the JWKS file (``JwtVerifier`` here) and identity providers (``oidc``): both hand a
token and a key set to ``verify_signed``. Time claims (exp, nbf) are checked against the
injected clock rather than by pyjwt (which reads the system clock), so tests control time and
cached tokens are judged the same way as fresh ones. ``TokenCache`` keeps verified tokens by
their exact text until they expire, so a client that reuses its token pays for one signature
check, not one per request; an entry is only good while its key source's ``generation`` is the
one it was verified under (a new key set revokes what the old one vouched for).
"""

from __future__ import annotations

import binascii
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import jwt as pyjwt
from jwt.utils import base64url_decode

from sidecar.config import ClaimMapping, JwtConfig
from sidecar.identity.claims import check_times, identity_from_claims
from sidecar.identity.jwks import ALGORITHM_KEY_TYPES, KeySet, parse_jwks
from sidecar.identity.model import AuthError, Identity
from sidecar.identity.watched_file import WatchedFile


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
        if exc.claim == "exp":
            return AuthError("malformed_token", "token has no expiry (exp)")
    if isinstance(exc, pyjwt.InvalidAlgorithmError):
        return AuthError("alg_not_allowed", "token algorithm is not allowed")
    return AuthError("malformed_token", "token is malformed")


@dataclass(frozen=True)
class TokenRules:
    """What a token must satisfy beyond its signature, and how its claims become an Identity."""

    algorithms: frozenset[str]
    issuer: str | None
    audience: str | list[str] | None  # a list: any one of them
    leeway_s: float
    claims: ClaimMapping
    method: str
    require_exp: bool = False  # identity providers' tokens must expire

    @property
    def decode_options(self) -> dict[str, Any]:
        return {
            "require": ["exp"] if self.require_exp else [],
            "verify_signature": True,
            "verify_exp": False,  # checked by check_times with the injected clock
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": self.audience is not None,
            "verify_iss": self.issuer is not None,
        }


@dataclass(frozen=True)
class TokenHeader:
    alg: str
    kid: str | None


def read_header(token: str) -> TokenHeader:
    try:
        header = pyjwt.get_unverified_header(token)
    except pyjwt.PyJWTError:
        raise AuthError("malformed_token", "token is malformed") from None
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)):
        raise AuthError("malformed_token", "token header is malformed")
    return TokenHeader(alg, kid)


def unverified_issuer(token: str) -> str | None:
    """The ``iss`` claim before any check, to choose whose keys verify the token.

    Only the payload segment is decoded (a full unverified ``pyjwt.decode`` cost about as much
    as half the RSA check): nothing here is trusted, the chosen issuer's rules check it all.
    """
    try:
        claims = json.loads(base64url_decode(token.split(".")[1]))
    except (ValueError, IndexError, TypeError, binascii.Error):
        raise AuthError("malformed_token", "token is malformed") from None
    iss = claims.get("iss") if isinstance(claims, dict) else None
    return iss if isinstance(iss, str) else None


def verify_signed(token: str, header: TokenHeader, keys: KeySet, rules: TokenRules,
                  now: float) -> tuple[Identity, float | None]:
    """The Identity and ``exp`` of a token whose signature, claims and times pass ``rules``."""
    if header.alg not in rules.algorithms:
        raise AuthError("alg_not_allowed", "token algorithm is not allowed")
    key = keys.select(header.alg, header.kid)
    try:
        claims: dict[str, Any] = pyjwt.decode(
            token, key.key, algorithms=[header.alg], audience=rules.audience,
            issuer=rules.issuer, options=rules.decode_options,
        )
    except pyjwt.PyJWTError as exc:
        raise _claims_error(exc) from None
    exp = check_times(claims, now, rules.leeway_s)
    iss = claims.get("iss")
    return identity_from_claims(claims, rules.claims, rules.method,
                                rules.issuer or (iss if isinstance(iss, str) else None)), exp


class KeySource(Protocol):
    """Whatever hands out the keys a cached token was verified with."""

    @property
    def generation(self) -> int: ...


@dataclass(frozen=True)
class _Entry:
    identity: Identity
    exp: float | None
    leeway_s: float
    source: KeySource
    generation: int


class TokenCache:
    """Verified tokens by their exact text, LRU-bounded, good until ``exp`` (+ leeway)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def get(self, token: str, now: float) -> Identity | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        if entry.source.generation != entry.generation:
            del self._entries[token]  # verified under keys that have since changed: check again
            return None
        if entry.exp is not None and entry.exp <= now - entry.leeway_s:
            del self._entries[token]
            raise AuthError("token_expired", "token expired")
        self._entries.move_to_end(token)
        return entry.identity

    def put(self, token: str, identity: Identity, exp: float | None, leeway_s: float, source: KeySource) -> None:
        if self._size <= 0:
            return
        self._entries[token] = _Entry(identity, exp, leeway_s, source, source.generation)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class JwtVerifier:
    """Checks bearer JWTs against the JWKS file (reloaded on change)."""

    def __init__(self, config: JwtConfig) -> None:
        if config.jwks_file is None:
            raise ValueError("JwtVerifier needs jwt.jwks_file")
        self.config = config
        self._jwks: WatchedFile[KeySet] = WatchedFile(config.jwks_file, parse_jwks, "JWKS file")
        self.generation = 0
        self.rules = TokenRules(
            # Only algorithms we know how to pair with a key type; "none" can never be in here.
            algorithms=frozenset(a for a in config.algorithms if a in ALGORITHM_KEY_TYPES),
            issuer=config.issuer, audience=config.audience, leeway_s=config.leeway_s,
            claims=ClaimMapping(tenant=config.tenant_claim, tier=config.tier_claim,
                                scopes=config.scopes_claim, subject="sub"),
            method="jwt",
        )

    def maybe_reload(self) -> bool:
        """Reload the JWKS if the file changed; a new key set invalidates cached tokens (revocation)."""
        if not self._jwks.maybe_reload():
            return False
        self.generation += 1
        return True

    def verify(self, token: str, header: TokenHeader, now: float) -> tuple[Identity, float | None]:
        return verify_signed(token, header, self._jwks.value, self.rules, now)


def check_token_text(token: str, max_bytes: int) -> None:
    # For an ASCII string the length is the byte count; non-ASCII is never a valid JWT.
    if len(token) > max_bytes:
        raise AuthError("token_too_large", "token is larger than allowed")
    if not token.isascii():
        raise AuthError("malformed_token", "token is malformed")

