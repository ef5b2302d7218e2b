"""Claims in, Identity out: one mapping for JWTs (file or provider) and introspection answers.

A claim path is a claim name taken whole (``"https://example.com/tenant"``, ``"scope"``) or a
list of names into nested objects (``["kubernetes.io", "namespace"]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.config import ClaimMapping, ClaimPath
from sidecar.identity.model import AuthError, Identity


def claim(claims: Mapping[str, Any], path: ClaimPath | None) -> Any:
    """The value at ``path``, or None when any step is missing or not an object."""
    if path is None:
        return None
    if isinstance(path, str):
        return claims.get(path)
    value: Any = claims
    for name in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(name)
    return value


def identity_from_claims(claims: Mapping[str, Any], mapping: ClaimMapping, method: str,
                         issuer: str | None) -> Identity:
    tenant = claim(claims, mapping.tenant)
    if not isinstance(tenant, str) or not tenant:
        raise AuthError("missing_tenant", "token has no tenant claim")
    tier = claim(claims, mapping.tier)
    scopes = claim(claims, mapping.scopes)
    if isinstance(scopes, str):
        scope_list = tuple(scopes.split())
    elif isinstance(scopes, list):
        scope_list = tuple(s for s in scopes if isinstance(s, str))
    else:
        scope_list = ()
    subject = claim(claims, mapping.subject)
    return Identity(
        authenticated=True, method=method, tenant=tenant,
        tier=tier if isinstance(tier, str) else None, scopes=scope_list,
        subject=subject if isinstance(subject, str) else None, key_name=None, issuer=issuer,
    )


def time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuthError("malformed_token", f"token claim {name} is not a number")
    return float(value)


def check_times(claims: Mapping[str, Any], now: float, leeway: float) -> float | None:
    """Raise for an expired or not-yet-valid token; return its ``exp`` (None if it has none)."""
    exp = time_claim(claims, "exp")
    nbf = time_claim(claims, "nbf")
    time_claim(claims, "iat")  # type check only
    if exp is not None and exp <= now - leeway:
        raise AuthError("token_expired", "token expired")
    if nbf is not None and nbf > now + leeway:
        raise AuthError("token_not_yet_valid", "token is not valid yet")
    return exp
