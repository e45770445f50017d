"""Time as a parameter: every policy takes a Clock so tests are exact and never sleep.

`SystemClock` reads the monotonic clock and sleeps with asyncio. `FakeClock` starts at
a fixed time; `advance` moves it, and `sleep` advances it at once (like Polly's
FakeTimeProvider), so a test of a 30 s breaker runs in microseconds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that only moves when told to (or when something sleeps on it)."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self.slept: list[float] = []  # every sleep asked for, in order, for assertions

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock never goes back")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.slept.append(seconds)
        self._now += seconds
        await asyncio.sleep(0)  # still yield, as a real sleep would
