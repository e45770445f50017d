"""The chaos schedule: six steps, spread over the run, each one a real fault.

The schedule itself is data (`schedule(duration)`), so the live view, the summary and the
report can name the step in force at any second; `Chaos.apply` does the damage.
Faults accumulate until the last step heals everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable


@dataclass(frozen=True)
class Step:
    at: float  # seconds after the traffic starts
    key: str
    title: str
    saves: str  # what riprap does about it (the summary's explanation)


STEPS = (
    ("kill-payment", "kill payment replica 1",
     "active health checks drop it; retries on connect-failure send calls to replica 2"),
    ("payment-503", "payment replica 2 answers 503 half the time",
     "retries on 5xx, outlier ejection, then the backup provider (failover tier)"),
    ("inventory-down", "take inventory shard b down",
     "per-shard breaker fails fast; stock reads are served from the stale cache"),
    ("recs-slow", "make recommendations slow (+400 ms)",
     "120 ms timeout, hedge, slow-call breaker; stale/static fallback keeps checkout fast"),
    ("kill-checkout", "kill the checkout process",
     "the supervisor restarts it (no supervisor without riprap)"),
    ("heal", "heal everything",
     "health checks and probes bring replicas and shards back; breakers close"),
)


def schedule(duration: float) -> list[Step]:
    """The six steps, evenly spread, leaving a calm start and a recovery tail."""
    gap = duration / 7.5
    return [Step(round(gap * (i + 1), 2), key, title, saves)
            for i, (key, title, saves) in enumerate(STEPS)]


def step_at(steps: list[Step], t: float) -> Step | None:
    """The step in force at `t` (None before the first)."""
    current = None
    for s in steps:
        if s.at <= t:
            current = s
    return current


Action = Callable[[], Awaitable[None]]


class Chaos:
    """Runs the schedule; `actions` maps a step key to the coroutine that does it."""

    def __init__(self, steps: list[Step], actions: dict[str, Action]) -> None:
        missing = {s.key for s in steps} - set(actions)
        if missing:
            raise ValueError(f"no action for chaos steps: {', '.join(sorted(missing))}")
        self.steps = steps
        self.actions = actions
        self.done: list[tuple[Step, float, str | None]] = []  # step, when applied, error

    async def run(self, now: Callable[[], float], sleep: Callable[[float], Awaitable[None]]
                  ) -> None:
        for step in self.steps:
            wait = step.at - now()
            if wait > 0:
                await sleep(wait)
            error = None
            try:
                await self.actions[step.key]()
            except Exception as exc:  # noqa: BLE001 - a failed fault must not end the demo; it is reported
                error = f"{type(exc).__name__}: {exc}"
            self.done.append((step, now(), error))
