"""The per-destination retry policy: exponential backoff with equal jitter, a cap, and a
deadline after which a delivery becomes a dead letter.

A small frozen object with one pure method: no clock and no randomness inside.  The
worker passes the attempt count, the time of the first failure, the current time and a
random number, and acts on the answer (``None`` = dead letter).

Why *equal* jitter (delay = backoff/2 + rand * backoff/2) rather than *full* jitter
(delay = rand * backoff): full jitter spreads retries of many deliveries best, but can
retry a failing destination almost at once (rand close to 0); equal jitter still spreads
them over half the interval and never waits less than half the computed backoff, so a
destination that is down is not hammered.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import RetryPolicyConfig

# 2**62 times any sensible initial delay is far beyond any cap; bounding the exponent keeps
# the arithmetic finite however many attempts a job has seen.
_MAX_EXPONENT = 62


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff ``initial * 2**(attempts-1)`` seconds, capped at ``max``, with equal jitter;
    give up once ``give_up_after`` seconds have passed since the first failure."""

    initial: float = 5.0
    max: float = 600.0
    give_up_after: float = 86400.0
    max_attempts: int | None = None  # also give up after this many attempts

    def __post_init__(self) -> None:
        if not self.initial > 0:
            raise ValueError(f"initial must be > 0, got {self.initial}")
        if self.max < self.initial:
            raise ValueError(f"max ({self.max}) must be >= initial ({self.initial})")
        if not self.give_up_after > 0:
            raise ValueError(f"give_up_after must be > 0, got {self.give_up_after}")

    @classmethod
    def from_config(cls, cfg: RetryPolicyConfig) -> RetryPolicy:
        """The policy of one destination's ``retry:`` section (defaults 5 / 600 / 86400)."""
        return cls(initial=cfg.initial, max=cfg.max, give_up_after=cfg.give_up_after)

    def backoff(self, attempts: int) -> float:
        """The delay before jitter after *attempts* failed attempts (1 = the first failure):
        ``initial * 2**(attempts-1)``, capped at ``max``."""
        if attempts < 1:
            raise ValueError(f"attempts counts failed attempts and starts at 1, got {attempts}")
        return min(self.max, self.initial * 2.0 ** min(attempts - 1, _MAX_EXPONENT))

    def decide(
        self, *, attempts: int, first_failure_at: float, now: float, rand: float
    ) -> float | None:
        """When to try again after the *attempts*-th failed attempt, as an absolute time on
        the same clock as *now* and *first_failure_at*; ``None`` = give up (dead letter).

        *rand* is a uniform random number in [0, 1) supplied by the caller.  The delay is
        ``b/2 + rand * b/2`` with ``b = backoff(attempts)``, so it lies in [b/2, b).  The
        next attempt is never scheduled after the give-up deadline: the last one happens at
        the deadline, and its failure is then final.
        """
        if not 0.0 <= rand < 1.0:
            raise ValueError(f"rand must be in [0, 1), got {rand}")
        if now - first_failure_at >= self.give_up_after:
            return None
        if self.max_attempts is not None and attempts >= self.max_attempts:
            return None
        deadline = first_failure_at + self.give_up_after
        half = self.backoff(attempts) / 2.0
        return min(now + half + rand * half, deadline)
