"""Retry budget: retries (and hedges) as a fraction of calls over a sliding window.

Counts live in `slots` time buckets (1 s each for the default 10 s window), so memory
and the cost of a call are constant whatever the request rate. A retry may be spent
while, counting it, retries in the window stay within
max(ratio * calls in the window, min_per_second * window) — the ratio caps
amplification under load, the floor keeps a quiet service able to retry at all.
Buckets are aligned to multiples of the bucket width on the clock, so counts expire
in whole-bucket steps (exact and predictable in tests).
"""

from __future__ import annotations

import math

from dsl.plan import BudgetSpec
from policies.clock import Clock


class RetryBudget:
    __slots__ = (
        "spec", "_clock", "_width", "_slots", "_calls", "_retries", "_slot",
        "_n_calls", "_n_retries", "refused", "_floor",
    )

    def __init__(self, spec: BudgetSpec, clock: Clock, slots: int = 10) -> None:
        if not spec.ratio >= 0.0:  # also refuses NaN
            raise ValueError(f"budget ratio must not be negative, got {spec.ratio}")
        if spec.window <= 0:
            raise ValueError(f"budget window must be positive, got {spec.window}")
        if spec.min_per_second < 0:
            raise ValueError(f"budget minimum rate must not be negative, got {spec.min_per_second}")
        if slots < 1:
            raise ValueError(f"budget needs at least one slot, got {slots}")
        self.spec = spec
        self._clock = clock
        self._slots = slots
        self._width = spec.window / slots
        self._calls = [0] * slots
        self._retries = [0] * slots
        self._slot = math.floor(clock.now() / self._width)
        self._n_calls = 0
        self._n_retries = 0
        self.refused = 0  # retries refused since creation (for metrics/state)
        self._floor = spec.min_per_second * spec.window

    def _roll(self) -> int:
        """Expire buckets that left the window; return the index of the current one."""
        slot = math.floor(self._clock.now() / self._width)
        cur = self._slot
        n = self._slots
        if slot > cur:
            steps = slot - cur
            if steps >= n:
                for i in range(n):
                    self._calls[i] = 0
                    self._retries[i] = 0
                self._n_calls = 0
                self._n_retries = 0
            else:
                calls, retries = self._calls, self._retries
                for s in range(cur + 1, slot + 1):
                    i = s % n
                    self._n_calls -= calls[i]
                    self._n_retries -= retries[i]
                    calls[i] = 0
                    retries[i] = 0
            self._slot = slot
        return self._slot % n

    @property
    def calls(self) -> int:
        """Calls in the window now."""
        self._roll()
        return self._n_calls

    @property
    def retries(self) -> int:
        """Retries and hedges spent in the window now."""
        self._roll()
        return self._n_retries

    def record_call(self) -> None:
        """Count one call (one per request, not per attempt)."""
        i = self._roll()
        self._calls[i] += 1
        self._n_calls += 1

    def allowed(self) -> float:
        """How many retries the window allows right now."""
        self._roll()
        return max(self.spec.ratio * self._n_calls, self._floor)

    def try_spend(self) -> bool:
        """Spend one retry (or hedge) if the budget allows it; False means do not retry."""
        i = self._roll()
        limit = self.spec.ratio * self._n_calls
        if limit < self._floor:
            limit = self._floor
        if self._n_retries + 1 > limit + 1e-9:
            self.refused += 1
            return False
        self._retries[i] += 1
        self._n_retries += 1
        return True

    def snapshot(self) -> dict[str, float | int]:
        self._roll()
        return {
            "ratio": self.spec.ratio,
            "min_per_second": self.spec.min_per_second,
            "window": self.spec.window,
            "calls": self._n_calls,
            "retries": self._n_retries,
            "allowed": self.allowed(),
            "refused": self.refused,
        }
