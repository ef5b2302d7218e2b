"""The JWKS file: verification keys by ``kid``, and which key may verify which algorithm.

Choosing the key here, from the key's own type, is what stops algorithm confusion: an RSA or
EC public key is never offered to an HMAC algorithm (where a public key would serve as the
shared secret), and an ``oct`` secret is only offered to HS*.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from sidecar.identity.model import AuthError
from sidecar.identity.watched_file import CredentialFileError

# Algorithm -> (JWK kty, required crv or None).
ALGORITHM_KEY_TYPES: dict[str, tuple[str, str | None]] = {
    "HS256": ("oct", None), "HS384": ("oct", None), "HS512": ("oct", None),
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
}
_SUPPORTED_KTY = frozenset(kty for kty, _ in ALGORITHM_KEY_TYPES.values())


@dataclass(frozen=True)
class VerificationKey:
    """One usable JWK: its key object (bytes for ``oct``) and what it may verify."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None  # the JWK's own "alg", which then is the only algorithm it verifies
    key: Any

    def accepts(self, alg: str) -> bool:
        kty, crv = ALGORITHM_KEY_TYPES[alg]
        return self.kty == kty and (crv is None or self.crv == crv) and self.alg in (None, alg)


@dataclass(frozen=True)
class KeySet:
    keys: tuple[VerificationKey, ...]

    def select(self, alg: str, kid: str | None) -> VerificationKey:
        """The key for a token header; ``alg`` must already be an allowed algorithm."""
        if kid is not None:
            named = [k for k in self.keys if k.kid == kid]
            if not named:
                raise AuthError("unknown_kid", "token key id is not known")
            matching = [k for k in named if k.accepts(alg)]
            if not matching:
                raise AuthError("alg_not_allowed", "token algorithm does not match its key")
            return matching[0]
        matching = [k for k in self.keys if k.accepts(alg)]
        if len(matching) != 1:
            raise AuthError("unknown_kid", "token has no key id and no single key fits its algorithm")
        return matching[0]


def parse_jwks(data: bytes) -> KeySet:
    """Parse ``{"keys": [...]}``; skips encryption keys and key types we do not verify."""
    return parse_jwks_document(json.loads(data.decode("utf-8")))


def parse_jwks_document(doc: Any) -> KeySet:
    """The same, from the decoded JSON (an identity provider's JWKS answer)."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise CredentialFileError('must be a JSON object {"keys": [...]}')
    keys = []
    for index, jwk in enumerate(doc["keys"]):
        key = _parse_key(jwk, f"key {index + 1}")
        if key is not None:
            keys.append(key)
    return KeySet(tuple(keys))


def _parse_key(jwk: Any, where: str) -> VerificationKey | None:
    if not isinstance(jwk, Mapping):
        raise CredentialFileError(f"{where}: must be a JSON object")
    kty, kid, alg, crv, use = (jwk.get(n) for n in ("kty", "kid", "alg", "crv", "use"))
    if kid is not None and not isinstance(kid, str):
        raise CredentialFileError(f"{where}: kid must be a string")
    where = f"{where} (kid {kid!r})" if kid else where
    if use not in (None, "sig") or kty not in _SUPPORTED_KTY:
        return None
    if alg is not None and (alg not in ALGORITHM_KEY_TYPES or ALGORITHM_KEY_TYPES[alg][0] != kty):
        raise CredentialFileError(f"{where}: alg does not fit a {kty} key")
    try:
        parsed = PyJWK(dict(jwk))
    except (PyJWTError, ValueError, TypeError, KeyError):
        # pyjwt's messages quote the JWK, which may be an HMAC secret: say only where.
        raise CredentialFileError(f"{where}: not a valid {kty} key") from None
    key = parsed.key
    if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        key = key.public_key()
    if parsed.Algorithm.check_key_length(key) is not None:
        raise CredentialFileError(f"{where}: key is shorter than RFC 7518 / NIST allow")
    return VerificationKey(kid=kid, kty=kty, crv=crv if kty == "EC" else None, alg=alg, key=key)
