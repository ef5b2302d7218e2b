"""The automatic rollback rule: is a canary doing worse than the stable version it runs beside?

In: each generation response's outcome per version (time to first token, or None; whether it
failed for a server-side reason), recorded into a :class:`HealthWindow` (a sliding window of
``RollbackConfig.window_s`` seconds), and the ``RollbackConfig`` margins. Out:
:func:`judge` — the reason to roll the canary back, or None. No I/O, no clock of its own
(callers pass ``now``), so the rule is tested on numbers alone.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from inference.config import RollbackConfig

# Outcome error types that are the caller's doing, not the version's (inference.openai.serving).
_NOT_THE_VERSIONS_FAULT = {"cancelled"}


def is_failure(error: str | None) -> bool:
    """A response that did not complete for a server-side reason (5xx, engine failure, timeout)."""
    if error is None or error in _NOT_THE_VERSIONS_FAULT:
        return False
    return not (error.isdigit() and 400 <= int(error) < 500)


@dataclass(frozen=True)
class Health:
    """A version's numbers over the window."""

    requests: int
    errors: int
    ttft_p50_s: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def describe(self) -> dict[str, object]:
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 4),
                "ttft_p50_ms": None if self.ttft_p50_s is None else round(self.ttft_p50_s * 1e3, 2)}


class HealthWindow:
    """Outcomes of one version over the last ``window_s`` seconds."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._outcomes: deque[tuple[float, float | None, bool]] = deque()

    def __len__(self) -> int:
        return len(self._outcomes)

    def record(self, now: float, ttft_s: float | None, error: str | None) -> None:
        self._outcomes.append((now, ttft_s, is_failure(error)))
        self._trim(now)

    def health(self, now: float) -> Health:
        self._trim(now)
        ttfts = [t for _, t, failed in self._outcomes if t is not None and not failed]
        return Health(len(self._outcomes), sum(1 for _, _, failed in self._outcomes if failed),
                      statistics.median(ttfts) if ttfts else None)

    def _trim(self, now: float) -> None:
        while self._outcomes and self._outcomes[0][0] < now - self._window_s:
            self._outcomes.popleft()


def judge(canary: Health, stable: Health, config: RollbackConfig) -> str | None:
    """Why the canary must be rolled back, or None (also when either side has too few requests)."""
    if canary.requests < config.min_requests or stable.requests < config.min_requests:
        return None
    if canary.error_rate > stable.error_rate + config.max_error_rate_increase:
        return (f"error rate {canary.error_rate:.1%} over {canary.requests} requests, stable {stable.error_rate:.1%}:"
                f" more than rollback.max_error_rate_increase {config.max_error_rate_increase:.1%} above")
    if (canary.ttft_p50_s is not None and stable.ttft_p50_s is not None
            and canary.ttft_p50_s > config.max_ttft_ratio * stable.ttft_p50_s):
        return (f"median time to first token {canary.ttft_p50_s * 1e3:.1f} ms, stable {stable.ttft_p50_s * 1e3:.1f} ms:"
                f" more than rollback.max_ttft_ratio {config.max_ttft_ratio:g}x")
    return None
