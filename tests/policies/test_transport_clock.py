"""The tests that pin the virtual clock's behaviour (`riprap_testing.clock.VirtualClock`)."""

from __future__ import annotations

import asyncio

import pytest

from riprap_testing.clock import VirtualClock


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
