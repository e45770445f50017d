"""`VirtualClock`: trio's autojump clock for asyncio, for tests of timers that race.

`FakeClock.sleep` jumps time at once, which is right for a lone sleeper but wrong when
timers race (a deadline against a hedge against a slow handler: every sleeper would
fire at once). With `VirtualClock` a sleeper waits until virtual time reaches its
wake-up time, and whenever every task is blocked, time jumps to the earliest wake-up.
Tests are then exact (timings are clock readings) and take no real time.

    async with driven(VirtualClock()) as clock:
        transport = ResilientTransport(plan, inner, clock=clock)
        ...

Its timers (`call_later`) are tasks sleeping on it (`policies.clock.SleepTimer`). Only
for work that waits on this clock: real I/O (sockets) does not make it idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from typing import AsyncIterator

from policies.clock import FakeClock


class VirtualClock(FakeClock):
    """Sleeps block until virtual time reaches them; idle loops jump to the next wake-up."""

    def __init__(self, start: float = 1000.0) -> None:
        super().__init__(start)
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._changed: asyncio.Event | None = None

    async def sleep(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.slept.append(seconds)
        if seconds == 0.0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (self._now + seconds, next(self._seq), fut))
        if self._changed is not None:
            self._changed.set()
        await fut

    def advance(self, seconds: float) -> None:
        super().advance(seconds)
        self._wake()

    def _wake(self) -> None:
        heap = self._heap
        while heap and (heap[0][0] <= self._now or heap[0][2].done()):
            _, _, fut = heapq.heappop(heap)
            if not fut.done():
                fut.set_result(None)

    def _next_wake(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].done():
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    async def drive(self) -> None:
        """Run forever: when the loop has nothing else to do, jump to the next wake-up."""
        loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        while True:
            idle = 0
            while idle < 3:  # idle across a few iterations: nothing is about to run
                await asyncio.sleep(0)
                idle = idle + 1 if not loop._ready else 0  # type: ignore[attr-defined]
            wake = self._next_wake()
            if wake is None:
                self._changed.clear()
                await self._changed.wait()
                continue
            if wake > self._now:
                self._now = wake
            self._wake()


@contextlib.asynccontextmanager
async def driven(clock: VirtualClock | None = None) -> AsyncIterator[VirtualClock]:
    """A virtual clock whose `drive` loop runs (in the current loop) while the block does."""
    clock = clock if clock is not None else VirtualClock()
    driver = asyncio.get_running_loop().create_task(clock.drive())
    try:
        yield clock
    finally:
        driver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await driver


__all__ = ["VirtualClock", "driven"]
