"""The rollback rule on numbers alone (inference/models/rollback.py): what counts as a failure, the
sliding window, the minimum of requests on both sides, the two margins."""

from __future__ import annotations

from inference.config import RollbackConfig
from inference.models.rollback import Health, HealthWindow, is_failure, judge

RULE = RollbackConfig(window_s=10.0, min_requests=4, max_error_rate_increase=0.1, max_ttft_ratio=2.0)


def test_failures_are_the_servers_not_the_clients() -> None:
    assert [is_failure(e) for e in (None, "cancelled", "400", "429", "404")] == [False] * 5
    assert [is_failure(e) for e in ("500", "503", "504", "EngineDeadError")] == [True] * 4


def test_the_window_forgets_old_outcomes_and_takes_the_median_of_completed_ones() -> None:
    window = HealthWindow(10.0)
    window.record(0.0, 9.0, None)
    for t, ttft, error in ((5.0, 0.1, None), (6.0, 0.3, None), (7.0, 0.2, None), (8.0, None, "500")):
        window.record(t, ttft, error)
    assert window.health(9.0) == Health(5, 1, 0.25)
    assert window.health(10.5) == Health(4, 1, 0.2)  # the outcome at t=0 left the window
    assert window.health(30.0) == Health(0, 0, None)


def test_errors_past_the_margin_roll_back() -> None:
    stable = Health(10, 1, 0.1)
    assert judge(Health(10, 2, 0.1), stable, RULE) is None  # 20 % vs 10 %: at the margin, not past it
    reason = judge(Health(10, 3, 0.1), stable, RULE)
    assert reason is not None and "error rate 30.0%" in reason and "max_error_rate_increase" in reason


def test_a_slow_first_token_past_the_ratio_rolls_back() -> None:
    stable = Health(10, 0, 0.1)
    assert judge(Health(10, 0, 0.2), stable, RULE) is None
    reason = judge(Health(10, 0, 0.21), stable, RULE)
    assert reason is not None and "time to first token 210.0 ms" in reason and "max_ttft_ratio" in reason


def test_too_few_requests_on_either_side_decide_nothing() -> None:
    assert judge(Health(3, 3, None), Health(10, 0, 0.1), RULE) is None
    assert judge(Health(10, 10, None), Health(3, 0, 0.1), RULE) is None
    assert judge(Health(4, 4, None), Health(4, 0, 0.1), RULE) is not None
