"""The retry policy: a pure function of attempts, times and an injected random number."""

from __future__ import annotations

import pytest

from gateway.config import RetryPolicyConfig
from gateway.deliver.retry import RetryPolicy

POLICY = RetryPolicy(initial=5, max=600, give_up_after=86400)


def delay(policy: RetryPolicy, attempts: int, rand: float, now: float = 1000.0) -> float:
    run_at = policy.decide(attempts=attempts, first_failure_at=now, now=now, rand=rand)
    assert run_at is not None
    return run_at - now


def test_first_attempt_waits_between_half_and_all_of_initial() -> None:
    """Attempt 1 uses the initial delay: [initial/2, initial)."""
    assert delay(POLICY, 1, 0.0) == 2.5
    assert 2.5 <= delay(POLICY, 1, 0.5) < 5
    assert delay(POLICY, 1, 0.999999) == pytest.approx(5, abs=1e-4)


def test_backoff_doubles_with_each_attempt() -> None:
    """Without jitter's upper half the delay doubles: 5, 10, 20, 40 ... seconds."""
    assert [POLICY.backoff(n) for n in range(1, 6)] == [5, 10, 20, 40, 80]
    assert [delay(POLICY, n, 0.0) for n in range(1, 6)] == [2.5, 5, 10, 20, 40]


def test_backoff_is_capped_at_max() -> None:
    """From attempt 8 on (5 * 2**7 = 640 > 600) the backoff stays at max."""
    assert POLICY.backoff(7) == 320
    assert POLICY.backoff(8) == 600
    assert POLICY.backoff(10_000) == 600
    assert 300 <= delay(POLICY, 10_000, 0.7) < 600


@pytest.mark.parametrize("attempts", [1, 2, 5, 8, 50])
@pytest.mark.parametrize("rand", [0.0, 0.25, 0.5, 0.75, 0.9999999])
def test_equal_jitter_stays_within_half_to_full_backoff(attempts: int, rand: float) -> None:
    """Equal jitter: never below half the backoff, never above the backoff."""
    b = POLICY.backoff(attempts)
    assert b / 2 <= delay(POLICY, attempts, rand) < b + 1e-9


def test_jitter_is_monotonic_in_rand() -> None:
    """The same attempt with a larger random number waits longer (the jitter is rand's)."""
    values = [delay(POLICY, 3, r / 10) for r in range(10)]
    assert values == sorted(values)
    assert len(set(values)) == 10


def test_gives_up_once_give_up_after_has_passed() -> None:
    """now - first_failure_at >= give_up_after -> None (dead letter)."""
    assert POLICY.decide(attempts=30, first_failure_at=0, now=86400, rand=0.5) is None
    assert POLICY.decide(attempts=30, first_failure_at=0, now=90000, rand=0.5) is None
    assert POLICY.decide(attempts=30, first_failure_at=0, now=86399, rand=0.5) is not None


def test_last_retry_is_scheduled_at_the_deadline_not_after_it() -> None:
    """A delay that would overshoot the deadline is shortened to end at it."""
    run_at = POLICY.decide(attempts=30, first_failure_at=0, now=86300, rand=0.9)
    assert run_at == 86400
    assert POLICY.decide(attempts=31, first_failure_at=0, now=86400, rand=0.9) is None


def test_short_give_up_window_is_honoured_on_the_first_failure() -> None:
    """give_up_after shorter than the first delay: one retry at the deadline, then dead."""
    policy = RetryPolicy(initial=60, max=600, give_up_after=10)
    assert policy.decide(attempts=1, first_failure_at=100, now=100, rand=0.0) == 110
    assert policy.decide(attempts=2, first_failure_at=100, now=110, rand=0.0) is None


def test_from_config_uses_the_destination_retry_section() -> None:
    assert RetryPolicy.from_config(RetryPolicyConfig()) == RetryPolicy(5, 600, 86400)
    cfg = RetryPolicyConfig(initial=1, max=30, give_up_after=3600)
    assert RetryPolicy.from_config(cfg) == RetryPolicy(1, 30, 3600)


@pytest.mark.parametrize("rand", [-0.1, 1.0, 2.0])
def test_rand_outside_unit_interval_is_refused(rand: float) -> None:
    with pytest.raises(ValueError, match="rand"):
        POLICY.decide(attempts=1, first_failure_at=0, now=0, rand=rand)


def test_attempts_start_at_one() -> None:
    with pytest.raises(ValueError, match="attempts"):
        POLICY.decide(attempts=0, first_failure_at=0, now=0, rand=0)


def test_inconsistent_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="max"):
        RetryPolicy(initial=10, max=5, give_up_after=100)
    with pytest.raises(ValueError, match="initial"):
        RetryPolicy(initial=0, max=5, give_up_after=100)


def test_max_attempts_gives_up_after_that_many_failures() -> None:
    policy = RetryPolicy(initial=10.0, max=60.0, give_up_after=3600.0, max_attempts=2)
    first = policy.decide(attempts=1, first_failure_at=1000.0, now=1000.0, rand=0.0)
    assert first == 1005.0  # the one retry, after half of the initial delay
    assert policy.decide(attempts=2, first_failure_at=1000.0, now=1010.0, rand=0.0) is None
