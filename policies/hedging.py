"""Hedging: one attempt sent as several copies, the first good answer winning.

The first copy runs inline in the caller's task (no task, no extra loop turn on the
common path where it answers before the hedge delay); a timer launches the extra copies
as tasks. Losers are cancelled, and their late responses closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from policies.answers import response_or_raise
from policies.clock import Timer
from policies.context import CallContext, Handler
from policies.errors import ResilienceError
from policies.hedge import HedgeDelay
from policies.stage import StageParts


class HedgeRun:
    """One hedged attempt. The first copy runs inline in the caller's task (no task, no
    extra loop turn on the common path where it answers before the hedge delay); a
    timer launches extra copies as tasks. The first good answer wins: a winning extra
    copy cancels the inline one (like a timeout would), every loser is cancelled and
    its response, if it had one, closed.
    """

    __slots__ = ("parts", "hedge", "inner", "ctx", "env", "owner", "loop", "copies",
                 "extra", "timer", "winner", "settled", "inline", "base_cancels")

    def __init__(self, parts: StageParts, hedge: HedgeDelay, inner: Handler,
                 ctx: CallContext) -> None:
        self.parts = parts
        self.hedge = hedge
        self.inner = inner
        self.ctx = ctx
        self.env = parts.env
        self.owner = asyncio.current_task()
        self.loop = asyncio.get_running_loop()
        self.copies: list[asyncio.Task[httpx.Response]] = []
        self.extra = 0
        self.timer: Timer | None = None
        self.winner: asyncio.Task[httpx.Response] | None = None
        self.settled = False
        self.inline = False
        self.base_cancels = self.owner.cancelling() if self.owner is not None else 0

    # -- the timer and the extra copies ---------------------------------------------

    def _arm(self) -> None:
        self.timer = self.env.clock.call_later(self.hedge.delay(), self._fire)

    def _stop_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()

    def _fire(self) -> None:
        self.timer = None
        if self.settled:
            return
        parts = self.parts
        obs = self.env.observer
        budget = parts.budget
        if budget is not None and not budget.try_spend():
            obs.retry_refused(parts.service, "budget")
            return
        self.extra += 1
        obs.hedged(parts.service)
        task = self.loop.create_task(self.inner(self.ctx))
        self.copies.append(task)
        task.add_done_callback(self._copy_done)
        if self.extra < self.hedge.max_extra:
            self._arm()

    def _copy_done(self, task: asyncio.Task[httpx.Response]) -> None:
        if self.settled or not self.inline or not good(task):
            return  # the owner is waiting on the copies itself, or a loser finished
        self.settled = True
        self.winner = task
        owner = self.owner
        assert owner is not None
        self._losers().add(owner)
        owner.cancel()  # stop the inline copy; `run` turns this into the winner's answer

    def _losers(self) -> set[asyncio.Task[Any]]:
        if self.ctx.losers is None:
            self.ctx.losers = set()
        return self.ctx.losers

    async def _cleanup(self, keep: asyncio.Task[Any] | None) -> None:
        """Cancel every copy but `keep`, close what they answered, wait for them to end."""
        self._stop_timer()
        self.settled = True
        waiting = []
        for task in self.copies:
            if task is keep:
                continue
            self._losers().add(task)
            if not task.done():
                task.cancel()
                waiting.append(task)
            task.add_done_callback(close_result)
        if waiting:
            await asyncio.wait(waiting)

    # -- the hedged attempt ---------------------------------------------------------

    async def run(self) -> httpx.Response:
        ctx = self.ctx
        owner = self.owner
        self._arm()
        self.inline = True
        resp: httpx.Response | None = None
        error: ResilienceError | None = None
        try:
            resp = await self.inner(ctx)
        except ResilienceError as exc:
            error = exc
        except asyncio.CancelledError:
            self.inline = False
            winner = self.winner
            if winner is None or owner is None:
                await self._cleanup(None)
                raise
            self._losers().discard(owner)
            if owner.uncancel() > self.base_cancels:  # cancelled from outside too: give up
                await self._cleanup(None)
                await winner.result().aclose()
                raise
            return await self._finish(winner)
        except BaseException:  # not an attempt's failure (a broken request body, a bug)
            self.inline = False
            await self._cleanup(None)
            raise
        self.inline = False
        if resp is not None and resp.status_code < 500:
            if not self.copies:  # the common case: no extra copy was sent
                self._stop_timer()
                self.settled = True
                return resp
            await self._cleanup_or_close(resp)
            return resp
        # The inline copy failed: wait for extra copies in flight, if any.
        self._stop_timer()
        pending = {t for t in self.copies if not t.done()}
        done_bad = [t for t in self.copies if t.done()]
        for t in done_bad:
            if good(t):
                if resp is not None:
                    await resp.aclose()
                return await self._finish(t)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if good(t):
                        if resp is not None:
                            await resp.aclose()
                        return await self._finish(t)
        except asyncio.CancelledError:
            if resp is not None:
                await resp.aclose()
            await self._cleanup(None)
            raise
        await self._cleanup_or_close(resp)  # every copy failed: the inline outcome stands
        return response_or_raise(resp, error)

    async def _finish(self, winner: asyncio.Task[httpx.Response]) -> httpx.Response:
        resp = winner.result()
        await self._cleanup_or_close(resp, keep=winner)
        return resp

    async def _cleanup_or_close(self, resp: httpx.Response | None,
                                keep: asyncio.Task[Any] | None = None) -> None:
        """Clean up; if cancelled meanwhile, the answer in hand is closed, not leaked."""
        try:
            await self._cleanup(keep)
        except BaseException:
            if resp is not None:
                await resp.aclose()
            raise


def good(task: asyncio.Future[Any]) -> bool:
    """A copy that answered below 500."""
    if task.cancelled() or task.exception() is not None:
        return False
    response: httpx.Response = task.result()
    return response.status_code < 500


def close_result(task: asyncio.Future[Any]) -> None:
    """Close the response of a finished loser (a hedge that answered too late)."""
    if task.cancelled() or task.exception() is not None:
        return
    resp = task.result()
    asyncio.get_running_loop().create_task(resp.aclose())


__all__ = ["HedgeRun", "close_result", "good"]
