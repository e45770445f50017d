"""Bulkhead: at most `max` calls in flight, and a bounded FIFO queue with a timeout.

A free slot is taken at once. Otherwise the call waits in a FIFO queue of at most
`queue` waiters, each for at most `queue_timeout` seconds; `release` hands the slot
straight to the oldest waiter, so a newcomer can never overtake the queue. The wait is
timed with `clock.sleep`, so tests drive it with a fake clock instead of real time.
"""

from __future__ import annotations

import asyncio
from collections import deque

from dsl.plan import ConcurrencySpec
from policies.clock import Clock


class Bulkhead:
    __slots__ = ("spec", "_clock", "max", "_queue_max", "_timeout", "in_flight", "_waiters",
                 "rejected", "timed_out")

    def __init__(self, spec: ConcurrencySpec, clock: Clock) -> None:
        if spec.max < 1:
            raise ValueError(f"concurrency must be at least 1, got {spec.max}")
        if spec.queue < 0 or spec.queue_timeout < 0:
            raise ValueError(f"queue and queue-timeout must not be negative ({spec.queue}, {spec.queue_timeout})")
        self.spec = spec
        self._clock = clock
        self.max = spec.max
        self._queue_max = spec.queue
        self._timeout = spec.queue_timeout
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self.rejected = 0  # refused at once: queue full
        self.timed_out = 0  # waited queue_timeout without a slot

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> bool:
        """Take a slot: True when taken (call `release` later), False when refused."""
        if self.in_flight < self.max and not self._waiters:
            self.in_flight += 1
            return True
        if len(self._waiters) >= self._queue_max:
            self.rejected += 1
            return False
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(fut)
        timer = loop.create_task(self._clock.sleep(self._timeout))
        try:
            await asyncio.wait((fut, timer), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Cancelled while queued. If `release` already handed us the slot, give it on.
            if fut.done() and not fut.cancelled():
                self.release()
            else:
                fut.cancel()
                self._forget(fut)
            raise
        finally:
            timer.cancel()
        if fut.done():
            return True  # the slot was handed over by `release`
        fut.cancel()
        self._forget(fut)
        self.timed_out += 1
        return False

    def _forget(self, fut: asyncio.Future[bool]) -> None:
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass

    def release(self) -> None:
        """Give a slot back: to the oldest waiter if any, else to the pool."""
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(True)
                return
        if self.in_flight > 0:
            self.in_flight -= 1

    def snapshot(self) -> dict[str, int | float]:
        return {
            "max": self.max,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "queue": self._queue_max,
            "queue_timeout": self._timeout,
            "rejected": self.rejected,
            "timed_out": self.timed_out,
        }
