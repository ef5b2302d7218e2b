"""What the sidecar knows about the caller, and why it refused a credential."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# RFC 6750 error codes by AuthError reason; anything not listed is "invalid_token".
_BEARER_ERROR = {
    "unsupported_scheme": "invalid_request",
    "ambiguous_credentials": "invalid_request",
    "token_too_large": "invalid_request",
}


@dataclass(frozen=True)
class Identity:
    """The authenticated (or anonymous) caller; policies see it as ``input.identity``."""

    authenticated: bool
    # "api_key" | "jwt" (JWKS file) | "oidc" | "service_account" | "introspection" | "mtls" | "anonymous"
    method: str
    tenant: str | None
    tier: str | None
    scopes: tuple[str, ...]
    subject: str | None
    key_name: str | None
    # Who vouched for the caller: the token's issuer, the introspection endpoint's name, or
    # "envoy" for a client certificate; None for API keys and anonymous callers.
    issuer: str | None = None

    def to_input(self) -> dict[str, Any]:
        """JSON-able form for the OPA input document (``key_name`` stays out: it is for logs)."""
        return {
            "authenticated": self.authenticated,
            "method": self.method,
            "tenant": self.tenant,
            "tier": self.tier,
            "scopes": list(self.scopes),
            "subject": self.subject,
            "issuer": self.issuer,
        }


ANONYMOUS = Identity(
    authenticated=False, method="anonymous", tenant=None, tier=None, scopes=(), subject=None, key_name=None
)


class AuthError(Exception):
    """Credentials were presented but are not acceptable: answer 401.

    ``reason`` is a short machine code for logs and metrics, ``message`` is for people; neither
    ever holds the presented key or token.
    """

    http_status = 401

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        # Which method refused, and on whose behalf (for the decision log); set by ``tag``.
        self.method: str | None = None
        self.issuer: str | None = None

    def tag(self, method: str, issuer: str | None = None) -> AuthError:
        """Name the method (and issuer) that refused, unless a deeper step already did."""
        if self.method is None:
            self.method, self.issuer = method, issuer
        return self

    @property
    def identity(self) -> Identity:
        """The refused caller as the decision log records it: not authenticated, which method."""
        return Identity(authenticated=False, method=self.method or "invalid", tenant=None, tier=None,
                        scopes=(), subject=None, key_name=None, issuer=self.issuer)

    @property
    def response_headers(self) -> dict[str, str]:
        """Headers of the refusal sent to the client."""
        return {"www-authenticate": self.www_authenticate}

    @property
    def www_authenticate(self) -> str:
        """Value of the ``WWW-Authenticate`` header of the 401 answer (RFC 6750 section 3)."""
        error = _BEARER_ERROR.get(self.reason, "invalid_token")
        description = self.message.replace("\\", "").replace('"', "'")
        return f'Bearer error="{error}", error_description="{description}"'


class IdentityUnavailable(AuthError):
    """The credential cannot be checked right now (its identity provider is unreachable and no
    cached answer covers it): answer 503, so the client retries instead of dropping its token."""

    http_status = 503

    @property
    def response_headers(self) -> dict[str, str]:
        return {"retry-after": "1"}
