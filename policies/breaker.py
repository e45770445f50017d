"""Circuit breaker: closed -> open -> half-open -> closed (or open again, for longer).

Trips on `failures` consecutive failures, or on a failure rate over the last `window`
calls once `min_calls` were seen. A call slower than `slow` counts as a failure. Open,
it fails fast for `open` seconds; the open time doubles on each reopen (a failed probe)
up to `max_open`, and is reset when the breaker closes. Then it lets `probes` calls
through (half-open): all succeed -> closed; one fails -> open again.

Outcomes that arrive while open, or half-open with no probe outstanding (calls let
through before the trip, finishing late), change nothing. Transitions are lazy: an
open breaker becomes half-open when asked (`allow`, `state`) after its open time, so
no timer task is needed. If probe outcomes never arrive (a cancelled call nobody
recorded, or `cancel()`ed), the probe slots are handed out again after one open
period, so the breaker cannot stay half-open forever.
"""

from __future__ import annotations

from collections.abc import Callable

from dsl.plan import BreakerSpec
from policies.clock import Clock

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


class CircuitBreaker:
    __slots__ = (
        "spec", "_clock", "_on_change", "_state", "_rate", "_threshold", "_window",
        "_min_calls", "_slow", "_probes", "_consecutive", "_ring", "_ring_i", "_ring_n",
        "_ring_failures", "_open_for", "_open_until", "_half_open_since", "_probes_out",
        "_probe_ok", "opened",
    )

    def __init__(
        self,
        spec: BreakerSpec,
        clock: Clock,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        if spec.kind == "consecutive":
            if spec.failures is None or spec.failures < 1:
                raise ValueError(f"breaker failures must be at least 1, got {spec.failures}")
        elif spec.kind == "rate":
            if spec.rate is None or not 0.0 <= spec.rate <= 1.0:
                raise ValueError(f"breaker failure-rate must be within 0..100%, got {spec.rate}")
            if spec.window < 1:
                raise ValueError(f"breaker window must be at least 1 call, got {spec.window}")
        else:
            raise ValueError(f"unknown breaker kind {spec.kind!r}")
        if spec.open < 0 or spec.probes < 1:
            raise ValueError(f"breaker needs open >= 0 and probes >= 1 (open {spec.open}, probes {spec.probes})")
        self.spec = spec
        self._clock = clock
        self._on_change = on_change
        self._state = CLOSED
        self._rate = spec.kind == "rate"
        self._threshold = spec.failures or 0
        self._window = spec.window
        # A minimum above the window could never be met: the window is the most we see.
        self._min_calls = max(1, min(spec.min_calls, spec.window))
        self._slow = spec.slow
        self._probes = spec.probes
        self._consecutive = 0
        self._ring: list[bool] = [False] * (spec.window if self._rate else 0)
        self._ring_i = 0
        self._ring_n = 0
        self._ring_failures = 0
        self._open_for = spec.open
        self._open_until = 0.0
        self._half_open_since = 0.0
        self._probes_out = 0
        self._probe_ok = 0
        self.opened = 0  # times opened since creation

    # -- transitions ---------------------------------------------------------------

    def _set(self, state: str) -> None:
        self._state = state
        if self._on_change is not None:
            self._on_change(state)

    def _trip(self, now: float) -> None:
        self._open_until = now + self._open_for
        self.opened += 1
        self._set(OPEN)

    def _close(self) -> None:
        self._open_for = self.spec.open
        self._reset_counts()
        self._set(CLOSED)

    def _reset_counts(self) -> None:
        self._consecutive = 0
        if self._rate:
            ring = self._ring
            for i in range(len(ring)):
                ring[i] = False
            self._ring_i = 0
            self._ring_n = 0
            self._ring_failures = 0

    def _to_half_open(self, now: float) -> None:
        self._half_open_since = now
        self._probes_out = 0
        self._probe_ok = 0
        self._set(HALF_OPEN)

    # -- the hot path --------------------------------------------------------------

    def allow(self) -> bool:
        """May a call go through? False: fail fast. Half-open admits `probes` calls."""
        state = self._state
        if state is CLOSED:
            return True
        now = self._clock.now()
        if state is OPEN:
            if now < self._open_until:
                return False
            self._to_half_open(now)
        elif self._probes_out >= self._probes:
            if now - self._half_open_since < max(self._open_for, 1e-9):
                return False
            # Probe outcomes never came back: hand the probe slots out again.
            self._half_open_since = now
            self._probes_out = self._probe_ok  # < probes, or it would have closed
        self._probes_out += 1
        return True

    def record(self, ok: bool, duration: float | None = None) -> None:
        """The outcome of a call that `allow` let through."""
        if ok and self._slow is not None and duration is not None and duration > self._slow:
            ok = False
        state = self._state
        if state is CLOSED:
            if self._rate:
                self._record_rate(ok)
            elif ok:
                self._consecutive = 0
            else:
                self._consecutive += 1
                if self._consecutive >= self._threshold:
                    self._trip(self._clock.now())
        elif state is HALF_OPEN:
            if self._probe_ok >= self._probes_out:
                return  # no probe outstanding: a late outcome of a call from before the trip
            if not ok:
                self._open_for = min(self._open_for * 2.0, max(self.spec.max_open, self.spec.open))
                self._trip(self._clock.now())
            else:
                self._probe_ok += 1
                if self._probe_ok >= self._probes:
                    self._close()
        # OPEN: a late outcome of a call admitted before the trip changes nothing.

    def _record_rate(self, ok: bool) -> None:
        ring = self._ring
        i = self._ring_i
        failed = not ok
        if self._ring_n == self._window:
            if ring[i]:
                self._ring_failures -= 1
        else:
            self._ring_n += 1
        ring[i] = failed
        if failed:
            self._ring_failures += 1
        self._ring_i = (i + 1) % self._window
        n = self._ring_n
        if (
            self._ring_failures
            and n >= self._min_calls
            and self._ring_failures >= self.spec.rate * n - 1e-9  # type: ignore[operator]
        ):
            self._trip(self._clock.now())

    def cancel(self) -> None:
        """A call let through was abandoned without an outcome: free its probe slot."""
        if self._state is HALF_OPEN and self._probes_out > self._probe_ok:
            self._probes_out -= 1

    # -- reading -------------------------------------------------------------------

    @property
    def state(self) -> str:
        """"closed", "open" or "half-open" (an expired open period reads as half-open)."""
        if self._state is OPEN and self._clock.now() >= self._open_until:
            self._to_half_open(self._clock.now())
        return self._state

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 unless open)."""
        if self._state is not OPEN:
            return 0.0
        return max(0.0, self._open_until - self._clock.now())

    @property
    def open_for(self) -> float:
        """The open period the next trip (or the current one) lasts."""
        return self._open_for

    def snapshot(self) -> dict[str, object]:
        state = self.state
        snap: dict[str, object] = {
            "state": state,
            "kind": self.spec.kind,
            "open_for": self._open_for,
            "retry_in": self.retry_in(),
            "opened": self.opened,
        }
        if self._rate:
            snap["calls"] = self._ring_n
            snap["failures"] = self._ring_failures
        else:
            snap["failures"] = self._consecutive
        if state == HALF_OPEN:
            snap["probes_out"] = self._probes_out
            snap["probes_ok"] = self._probe_ok
        return snap
