"""Time as a parameter: every policy takes a Clock so tests are exact and never sleep.

A clock has four operations: `now` (monotonic seconds), `wall` (Unix time, for HTTP dates
such as `Retry-After`), `sleep`, and `call_later` (run a callback after a delay, cancellable:
the timers of deadlines, per-try timeouts and hedges).

`SystemClock` is the event loop's own time: `call_later` is `loop.call_later`, one timer
handle, no task. `FakeClock` starts at a fixed time; `advance` moves it, and `sleep`
advances it at once (like Polly's FakeTimeProvider), so a test of a 30 s breaker runs in
microseconds. A test clock's `call_later` is a task sleeping on the clock itself, so
whatever drives its sleeps (`riprap_testing.VirtualClock`) drives the timers too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Protocol


class Timer(Protocol):
    """What `call_later` returns: a pending callback that can be called off."""

    def cancel(self) -> object: ...


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch (for HTTP dates); not for measuring time."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` after `seconds` of this clock's time, in the running loop."""
        ...


class SystemClock:
    """The real clock: the monotonic clock the event loop runs on, and its timers."""

    # The engine reads the clock about ten times per call: plain functions, no method hop.
    now = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        loop = asyncio.get_running_loop()
        return loop.call_at(loop.time() + seconds, callback)


class SleepTimer:
    """`call_later` for a clock whose time moves only as its sleepers are woken: a task
    that sleeps on the clock, then calls back."""

    __slots__ = ("_task",)

    def __init__(self, clock: Clock, seconds: float, callback: Callable[[], None]) -> None:
        async def later() -> None:
            await clock.sleep(seconds)
            callback()

        self._task = asyncio.get_running_loop().create_task(later())

    def cancel(self) -> bool:
        return self._task.cancel()


class FakeClock:
    """A clock that only moves when told to (or when something sleeps on it)."""

    def __init__(self, start: float = 1000.0, wall: float | None = None) -> None:
        self._now = start
        # wall() starts at `wall` (default: the real date when the clock was made, so
        # HTTP dates a test writes from time.time() mean what they say) and moves with now()
        self._wall_offset = (time.time() if wall is None else wall) - start
        self.slept: list[float] = []  # every sleep asked for, in order, for assertions

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock never goes back")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.slept.append(seconds)
        self._now += seconds
        await asyncio.sleep(0)  # still yield, as a real sleep would

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        return SleepTimer(self, seconds, callback)


__all__ = ["Clock", "FakeClock", "SleepTimer", "SystemClock", "Timer"]
