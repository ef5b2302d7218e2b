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
    method: str  # "api_key" | "jwt" | "anonymous"
    tenant: str | None
    tier: str | None
    scopes: tuple[str, ...]
    subject: str | None
    key_name: str | None

    def to_input(self) -> dict[str, Any]:
        """JSON-able form for the OPA input document (``key_name`` stays out: it is for logs)."""
        return {
            "authenticated": self.authenticated,
            "method": self.method,
            "tenant": self.tenant,
            "tier": self.tier,
            "scopes": list(self.scopes),
            "subject": self.subject,
        }


ANONYMOUS = Identity(
    authenticated=False, method="anonymous", tenant=None, tier=None, scopes=(), subject=None, key_name=None
)


class AuthError(Exception):
    """Credentials were presented but are not acceptable: answer 401.

    ``reason`` is a short machine code for logs and metrics, ``message`` is for people; neither
    ever holds the presented key or token.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    @property
    def www_authenticate(self) -> str:
        """Value of the ``WWW-Authenticate`` header of the 401 answer (RFC 6750 section 3)."""
        error = _BEARER_ERROR.get(self.reason, "invalid_token")
        description = self.message.replace("\\", "").replace('"', "'")
        return f'Bearer error="{error}", error_description="{description}"'
