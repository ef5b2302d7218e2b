"""How each remote identity provider is doing: what metrics and the health service report.

A snapshot, made when asked (a Prometheus scrape, a health tick), from counters the provider
keeps; nothing is pushed anywhere from the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProviderStatus:
    name: str  # the issuer, or the introspection endpoint's name
    method: str  # "oidc" | "service_account" | "introspection"
    up: bool  # the last fetch (or introspection call) succeeded
    # Seconds since the last successful fetch; None: never reached.
    last_success_age_s: float | None
    last_error: str | None
    fetches_ok: int
    fetches_failed: int
    # Refreshes for an unknown kid that were refused because one ran too recently.
    refreshes_rate_limited: int
    keys: int  # keys held (OIDC) or answers cached (introspection)

    @property
    def degraded(self) -> bool:
        """Unreachable: checks run on cached keys or answers, or fail with issuer_unreachable.
        (Before the first fetch has ended the provider is not yet known to be down.)"""
        return not self.up and self.fetches_failed > 0
