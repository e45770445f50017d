"""Fault injection: abort or delay a percentage of calls, before they leave.

Each `ChaosSpec` draws once per call from the injected random source, in order, so a
seeded `random.Random` makes the injected faults exact and repeatable. Delays that
fire add up; the first abort that fires sets the status; a call can be both delayed
and aborted (delayed first), like Envoy's fault filter.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from dsl.plan import ChaosSpec

DEFAULT_ABORT_STATUS = 503


@dataclass(frozen=True, slots=True)
class ChaosAction:
    """What to do to one call: "abort" (answer `status`, after `delay`) or "delay"."""

    kind: str
    status: int | None
    delay: float


class ChaosInjector:
    __slots__ = ("specs", "_rng", "_plan", "injected")

    def __init__(self, specs: Sequence[ChaosSpec], rng: random.Random) -> None:
        plan: list[tuple[bool, float, int, float]] = []
        for s in specs:
            if not 0.0 <= s.probability <= 1.0:
                raise ValueError(f"chaos probability must be within 0..100%, got {s.probability}")
            if s.kind == "abort":
                plan.append((True, s.probability, s.status or DEFAULT_ABORT_STATUS, 0.0))
            elif s.kind == "delay":
                if s.delay is None or s.delay < 0:
                    raise ValueError(f"chaos delay needs a non-negative duration, got {s.delay}")
                plan.append((False, s.probability, 0, s.delay))
            else:
                raise ValueError(f"unknown chaos kind {s.kind!r}: expected abort or delay")
        self.specs = tuple(specs)
        self._rng = rng
        self._plan = tuple(plan)
        self.injected = 0

    def decide(self) -> ChaosAction | None:
        """The fault to inject into this call, or None (most calls)."""
        if not self._plan:
            return None
        rnd = self._rng.random
        status: int | None = None
        delay = 0.0
        for abort, p, code, d in self._plan:
            if rnd() < p:
                if abort:
                    if status is None:
                        status = code
                else:
                    delay += d
        if status is not None:
            self.injected += 1
            return ChaosAction("abort", status, delay)
        if delay > 0.0:
            self.injected += 1
            return ChaosAction("delay", None, delay)
        return None
