"""Rate limit headers: RateLimit-* and Retry-After for the client, remaining budgets for upstream."""

from __future__ import annotations

import math

from sidecar.ratelimit.base import RateLimitResult


def rate_limit_headers(result: RateLimitResult) -> dict[str, str]:
    """RateLimit-Limit/-Remaining/-Reset of the most constraining budget; Retry-After if denied."""
    state = result.most_constraining()
    if state is None:
        return {}
    headers = {
        "RateLimit-Limit": str(state.limit),
        "RateLimit-Remaining": str(state.remaining),
        "RateLimit-Reset": str(math.ceil(state.reset_s)),
    }
    if not result.allowed:
        headers["Retry-After"] = str(max(1, math.ceil(state.retry_after_s)))
    return headers


def upstream_rate_limit_headers(result: RateLimitResult, prefix: str = "x-kernelgate-") -> dict[str, str]:
    """``<prefix>ratelimit-remaining-requests`` / ``-tokens``: the least remaining of each kind."""
    remaining: dict[str, int] = {}
    for state in result.states:
        remaining[state.kind] = min(state.remaining, remaining.get(state.kind, state.remaining))
    return {f"{prefix}ratelimit-remaining-{kind}": str(value) for kind, value in sorted(remaining.items())}
