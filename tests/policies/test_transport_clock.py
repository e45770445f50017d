"""A virtual clock for transport tests, and the tests that pin its behaviour.

`FakeClock.sleep` jumps time at once, which is right for a lone sleeper but wrong when
timers race (a deadline against a hedge against a slow handler: every sleeper would
fire at once). `VirtualClock` is trio's autojump clock for asyncio: a sleeper waits until
virtual time reaches its wake-up time, and whenever every task is blocked, time jumps
to the earliest wake-up. Tests are then exact (timings are clock readings) and take
no real time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

import pytest

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


# ------------------------------------------------------------------ the clock's own tests


async def test_sleepers_wake_in_order_of_virtual_time(vclock: VirtualClock) -> None:
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, d: float) -> None:
        await vclock.sleep(d)
        woke.append((name, vclock.now()))

    await asyncio.gather(sleeper("b", 2.0), sleeper("a", 0.5), sleeper("c", 3.0))
    assert woke == [("a", 1000.5), ("b", 1002.0), ("c", 1003.0)]


async def test_a_race_is_won_by_the_earlier_timer(vclock: VirtualClock) -> None:
    fast = asyncio.ensure_future(vclock.sleep(0.08))
    slow = asyncio.ensure_future(vclock.sleep(2.0))
    done, pending = await asyncio.wait({fast, slow}, return_when=asyncio.FIRST_COMPLETED)
    assert done == {fast} and pending == {slow}
    assert vclock.now() == pytest.approx(1000.08)
    slow.cancel()


async def test_time_does_not_move_while_work_is_ready(vclock: VirtualClock) -> None:
    timer = asyncio.ensure_future(vclock.sleep(1.0))
    for _ in range(50):
        await asyncio.sleep(0)  # busy, never idle for long: no jump
    assert vclock.now() == 1000.0
    await timer
    assert vclock.now() == 1001.0
