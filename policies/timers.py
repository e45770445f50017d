"""Timeout scopes on a clock's own timers (`Clock.call_later`): the loop's timer handle on
the real clock, a task sleeping on a test clock (so a virtual clock drives deadlines,
per-try timeouts and health checks)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from policies.clock import Clock, Timer

if TYPE_CHECKING:
    from policies.context import CallContext


class ClockTimeout:
    """A lighter `asyncio.timeout` on `clock` (one timer, no rescheduling).

    Cancels the task it guards when the time is up and turns that cancellation into
    `TimeoutError` on the way out; a cancellation from elsewhere passes through.
    """

    __slots__ = ("_clock", "_delay", "_task", "_timer", "_cancelling", "_ctx", "fired")

    def __init__(self, clock: Clock, delay: float, ctx: "CallContext | None" = None) -> None:
        self._clock = clock
        self._delay = delay
        self._task: asyncio.Task[Any] | None = None
        self._timer: Timer | None = None
        self._cancelling = 0
        self._ctx = ctx  # told when the time is up, before the cancellation lands
        self.fired = False

    async def __aenter__(self) -> "ClockTimeout":
        self.enter()
        return self

    def enter(self) -> None:
        """`__aenter__` without the coroutine: the engine's stages call `enter` and
        `leave` around their await (one scope per call and per attempt)."""
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._timer = self._clock.call_later(self._delay, self._expire)

    def _expire(self) -> None:
        self.fired = True
        if self._ctx is not None:
            self._ctx.expired = True
        assert self._task is not None
        self._task.cancel()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.leave(exc)
        return False

    def leave(self, exc: BaseException | None) -> None:
        """`__aexit__` without the coroutine: stop the timer; if it fired, turn its
        cancellation (`exc`) into `TimeoutError`. Called in the `except` clause that
        caught `exc` (or with None after a normal exit); the caller re-raises `exc`."""
        assert self._timer is not None
        self._timer.cancel()
        if self.fired:
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and type(exc) is asyncio.CancelledError:
                raise TimeoutError from exc


def deadline_scope(clock: Clock, delay: float, ctx: "CallContext | None" = None) -> ClockTimeout:
    """A timeout scope of `delay` seconds on `clock`.

    With `ctx`, the call is marked `expired` when the time is up, so the stages being
    cancelled can tell a deadline from a caller that went away."""
    return ClockTimeout(clock, delay, ctx)


def fmt_s(seconds: float) -> str:
    """A duration for a timeout message: `250ms` below a second, else `2s`."""
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:g}s"


__all__ = ["ClockTimeout", "deadline_scope", "fmt_s"]
