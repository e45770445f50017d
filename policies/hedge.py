"""How long to wait before sending a hedge (an extra copy of a slow attempt).

Either a fixed delay, or a percentile of the service's observed latency over a rolling
window, never below `min_delay`; until `warmup_calls` latencies were seen the
percentile is meaningless, so `initial_delay` (100 ms by default) is used instead.
"""

from __future__ import annotations

from dsl.plan import HedgeSpec
from policies.latency import LatencyWindow


class HedgeDelay:
    __slots__ = ("spec", "window", "max_extra", "_fixed", "_p", "_floor", "_initial", "_warmup")

    def __init__(self, spec: HedgeSpec, window: LatencyWindow) -> None:
        if spec.delay is None and spec.percentile is None:
            raise ValueError("a hedge needs a fixed delay or a percentile")
        if spec.percentile is not None and not 0.0 < spec.percentile <= 1.0:
            raise ValueError(f"hedge percentile must be within (0, 1], got {spec.percentile}")
        if spec.max_extra < 1:
            raise ValueError(f"a hedge sends at least one extra copy, got max {spec.max_extra}")
        self.spec = spec
        self.window = window
        self.max_extra = spec.max_extra
        self._fixed = spec.delay
        self._p = spec.percentile
        self._floor = spec.min_delay
        self._initial = max(spec.initial_delay, spec.min_delay)
        self._warmup = spec.warmup_calls

    def delay(self) -> float:
        """Seconds to wait after an attempt starts before hedging it."""
        if self._fixed is not None:
            return self._fixed
        window = self.window
        if window.total < self._warmup:
            return self._initial
        p = window.percentile(self._p)  # type: ignore[arg-type]
        if p is None or p < self._floor:
            return self._floor
        return p
