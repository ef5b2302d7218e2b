"""Rate limits, kept apart as in envoyproxy/ratelimit: what to limit (``descriptors``), how to
count (``gcra``, ``settle``), where counts live (``memory``, ``redis``), what to do when the
shared store fails (``fallback``) and how to tell the client (``headers``)."""

from sidecar.ratelimit.base import (
    BackendUnavailable,
    Budget,
    BudgetState,
    RateLimiter,
    RateLimitResult,
    RateLimitUnavailable,
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
    "FallbackRateLimiter",
    "MemoryRateLimiter",
    "RateLimitResult",
    "RateLimitUnavailable",
    "RateLimiter",
    "RedisRateLimiter",
    "budgets_for",
    "build_rate_limiter",
    "estimate_tokens",
    "rate_limit_headers",
    "upstream_rate_limit_headers",
]
