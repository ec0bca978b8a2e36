"""Per-caller request budgets: one peer flooding the coordinator cannot slow the others.

A token bucket per key (a peer id, or the caller's address for requests that name
no peer): `burst` requests at once, refilled at `rate_per_s`. Buckets that are
full again carry no information and are dropped, so the table holds only the
callers that were busy in the last `burst / rate_per_s` seconds.
"""

from __future__ import annotations

from collections.abc import Callable

MAX_KEYS = 100_000
"""Buckets kept at most; past it, full (idle) ones are dropped first, then the oldest."""


class RateLimiter:
    """Token buckets keyed by caller.

    Args:
        rate_per_s: requests a key may make per second, sustained.
        burst: requests a key may make at once after being idle.
        clock: seconds, monotonic (injectable for tests).
    """

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float]) -> None:
        if not rate_per_s > 0 or not burst >= 1:
            raise ValueError(f"a rate limit needs rate_per_s > 0 and burst >= 1, got {rate_per_s}, {burst}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def allow(self, key: str) -> bool:
        """Spend one request of `key`'s budget; False (and nothing spent) when it is empty."""
        now = self._clock()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate_per_s)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        if tokens < self.burst:
            if len(self._buckets) >= MAX_KEYS:
                self._shrink(now)
            self._buckets[key] = (tokens, now)  # re-inserted last: the dict is oldest-first
        return allowed

    def retry_in_s(self, key: str) -> float:
        """Seconds until `key` may make its next request."""
        tokens, at = self._buckets.get(key, (self.burst, self._clock()))
        tokens = min(self.burst, tokens + (self._clock() - at) * self.rate_per_s)
        return max(0.0, (1 - tokens) / self.rate_per_s)

    def __len__(self) -> int:
        return len(self._buckets)

    def _shrink(self, now: float) -> None:
        full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate_per_s >= self.burst]
        for k in full:
            del self._buckets[k]
        while len(self._buckets) >= MAX_KEYS:
            del self._buckets[next(iter(self._buckets))]
