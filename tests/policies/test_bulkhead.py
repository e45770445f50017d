import asyncio
import random

import pytest

from dsl.plan import ConcurrencySpec
from policies.bulkhead import Bulkhead


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_slots_are_taken_at_once_and_the_rest_refused_without_a_queue(clock):
    b = Bulkhead(ConcurrencySpec(max=2), clock)
    assert await b.acquire() and await b.acquire()
    assert b.in_flight == 2
    assert not await b.acquire()
    assert b.rejected == 1
    assert clock.slept == []  # refused at once, no waiting
    b.release()
    assert await b.acquire()


async def test_queued_calls_get_released_slots_in_fifo_order(manual_clock):
    b = Bulkhead(ConcurrencySpec(max=1, queue=2, queue_timeout=1.0), manual_clock)
    assert await b.acquire()
    order: list[str] = []

    async def waiter(name: str) -> None:
        if await b.acquire():
            order.append(name)

    t1 = asyncio.create_task(waiter("first"))
    await settle()
    t2 = asyncio.create_task(waiter("second"))
    await settle()
    assert b.queued == 2
    assert not await b.acquire()  # queue full: refused at once
    assert b.rejected == 1
    b.release()
    await settle()
    assert order == ["first"]
    assert b.in_flight == 1 and b.queued == 1
    b.release()
    await asyncio.gather(t1, t2)
    assert order == ["first", "second"]
    b.release()
    assert b.in_flight == 0


async def test_a_queued_call_times_out_after_queue_timeout(manual_clock):
    b = Bulkhead(ConcurrencySpec(max=1, queue=1, queue_timeout=1.0), manual_clock)
    assert await b.acquire()
    task = asyncio.create_task(b.acquire())
    await settle()
    manual_clock.advance(0.999)
    await settle()
    assert not task.done()
    manual_clock.advance(0.001)
    assert await task is False
    assert b.queued == 0 and b.timed_out == 1 and b.in_flight == 1
    b.release()
    assert b.in_flight == 0  # the timed-out waiter did not get the slot


async def test_with_fake_clock_the_queue_wait_is_measured_not_slept(clock):
    b = Bulkhead(ConcurrencySpec(max=1, queue=1, queue_timeout=0.25), clock)
    assert await b.acquire()
    start = clock.now()
    assert not await b.acquire()
    assert clock.slept == [0.25]
    assert clock.now() - start == 0.25


async def test_a_cancelled_waiter_leaves_the_queue(manual_clock):
    b = Bulkhead(ConcurrencySpec(max=1, queue=1, queue_timeout=5.0), manual_clock)
    assert await b.acquire()
    task = asyncio.create_task(b.acquire())
    await settle()
    assert b.queued == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.queued == 0
    b.release()
    assert b.in_flight == 0
    assert manual_clock.sleeping == 0  # its timer was cancelled too


async def test_a_waiter_cancelled_after_the_handoff_passes_the_slot_on(manual_clock):
    b = Bulkhead(ConcurrencySpec(max=1, queue=2, queue_timeout=5.0), manual_clock)
    assert await b.acquire()
    first = asyncio.create_task(b.acquire())
    await settle()
    second = asyncio.create_task(b.acquire())
    await settle()
    b.release()  # hands the slot to `first`...
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second is True  # the slot went on to the next waiter
    assert b.in_flight == 1
    b.release()
    assert b.in_flight == 0


async def test_snapshot(clock):
    b = Bulkhead(ConcurrencySpec(max=3, queue=2, queue_timeout=1.0), clock)
    await b.acquire()
    assert b.snapshot() == {
        "max": 3, "in_flight": 1, "queued": 0, "queue": 2, "queue_timeout": 1.0,
        "rejected": 0, "timed_out": 0,
    }


def test_bad_specs(clock):
    with pytest.raises(ValueError, match="at least 1"):
        Bulkhead(ConcurrencySpec(max=0), clock)
    with pytest.raises(ValueError, match="negative"):
        Bulkhead(ConcurrencySpec(max=1, queue=-1), clock)


async def test_random_traffic_never_breaks_the_bounds(manual_clock):
    """Seeded churn: arrivals, completions and time passing, with the bounds checked throughout."""
    rng = random.Random(42)
    spec = ConcurrencySpec(max=3, queue=4, queue_timeout=1.0)
    b = Bulkhead(spec, manual_clock)
    holders: list[asyncio.Task[bool]] = []
    outcomes = {"ok": 0, "refused": 0}

    async def call() -> bool:
        got = await b.acquire()
        outcomes["ok" if got else "refused"] += 1
        return got

    for _ in range(400):
        r = rng.random()
        if r < 0.5:
            holders.append(asyncio.create_task(call()))
        elif r < 0.8:
            done = [t for t in holders if t.done() and t.result()]
            if done:
                holders.remove(done[0])
                b.release()
        else:
            manual_clock.advance(rng.choice([0.1, 0.5, 1.0]))
        await settle()
        assert 0 <= b.in_flight <= spec.max
        assert 0 <= b.queued <= spec.queue
        holding = sum(1 for t in holders if t.done() and t.result())
        assert holding == b.in_flight  # every slot is held by exactly one caller
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0
    for t in holders:
        t.cancel()
    await asyncio.gather(*holders, return_exceptions=True)
