"""Shared fixtures for the policy primitives' tests: fake clocks and seeded randomness."""

from __future__ import annotations

import asyncio
import random

import pytest

from policies.clock import FakeClock


class ManualClock(FakeClock):
    """A fake clock whose `sleep` blocks until `advance` moves time past its deadline.

    `FakeClock.sleep` returns at once (time jumps); to test a wait that something else
    can cut short (a bulkhead queue), a sleeper must stay asleep until the test says.
    """

    def __init__(self, start: float = 1000.0) -> None:
        super().__init__(start)
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    async def sleep(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.slept.append(seconds)
        if seconds == 0.0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now() + seconds, fut))
        try:
            await fut
        finally:
            self._sleepers = [(d, f) for d, f in self._sleepers if f is not fut]

    def advance(self, seconds: float) -> None:
        super().advance(seconds)
        for deadline, fut in self._sleepers:
            if deadline <= self.now() and not fut.done():
                fut.set_result(None)

    @property
    def sleeping(self) -> int:
        return sum(1 for _, f in self._sleepers if not f.done())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def manual_clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def rng() -> random.Random:
    return random.Random(20261127)

