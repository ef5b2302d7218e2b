"""Rate limits, kept apart as in envoyproxy/ratelimit: what to limit and what a request costs
(``descriptors``, with the prompt counted by the inference server in ``count``), how to count
(``gcra``, ``settle``), where counts and open reservations live (``memory``, ``redis``, behind
``base.RateLimiter``), what to do when the shared store fails and which backend to build
(``fallback``: the factory) and how to tell the client (``headers``). Settling a reservation to
the reported usage is ``sidecar/settlement.py``, one path for every backend."""

from sidecar.ratelimit.base import (
    BackendUnavailable,
    Budget,
    BudgetState,
    Claimed,
    RateLimiter,
    RateLimitResult,
    RateLimitUnavailable,
    Reservation,
    Slot,
)
from sidecar.ratelimit.descriptors import budgets_for, estimate_tokens
from sidecar.ratelimit.fallback import FallbackRateLimiter, build_rate_limiter
from sidecar.ratelimit.headers import rate_limit_headers, upstream_rate_limit_headers
from sidecar.ratelimit.memory import MemoryRateLimiter
from sidecar.ratelimit.redis import RedisRateLimiter

__all__ = [
    "BackendUnavailable",
    "Budget",
    "BudgetState",
    "Claimed",
    "FallbackRateLimiter",
    "MemoryRateLimiter",
    "RateLimitResult",
    "RateLimitUnavailable",
    "Reservation",
    "RateLimiter",
    "RedisRateLimiter",
    "Slot",
    "budgets_for",
    "build_rate_limiter",
    "estimate_tokens",
    "rate_limit_headers",
    "upstream_rate_limit_headers",
]
