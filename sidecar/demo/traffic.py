"""Steady, open-loop checkout traffic: the same orders sent to every target.

Open loop: call i leaves at start + i/rate whatever happened to the calls before it, so
a slow or dead checkout cannot slow the traffic down and hide its own failures (the
"coordinated omission" trap of closed-loop generators).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Callable

import aiohttp

from sidecar.demo.stats import Call

SKUS = tuple(f"SKU-{i}" for i in range(1, 25))
USERS = tuple(f"u{i}" for i in range(1, 9))
CLIENT_TIMEOUT = 3.0


class Traffic:
    def __init__(self, targets: dict[str, str], rate: float, seed: int = 1) -> None:
        self.targets = targets  # name -> checkout URL
        self.rate = rate
        self.calls: list[Call] = []
        self._rng = random.Random(seed)
        self._tasks: set[asyncio.Task[None]] = set()
        self.started_at = 0.0

    def now(self) -> float:
        return time.monotonic() - self.started_at

    async def run(self, session: aiohttp.ClientSession, duration: float,
                  on_start: Callable[[], None] | None = None) -> None:
        self.started_at = time.monotonic()
        if on_start:
            on_start()
        n = int(duration * self.rate)
        for i in range(n):
            at = i / self.rate
            delay = at - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            order = {"sku": self._rng.choice(SKUS), "user": self._rng.choice(USERS)}
            for name, url in self.targets.items():
                doc = dict(order, order=f"{name}-{i}")
                task = asyncio.create_task(self._one(session, name, url, at, doc))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CLIENT_TIMEOUT + 1)

    async def _one(self, session: aiohttp.ClientSession, target: str, url: str, at: float,
                   order: dict[str, str]) -> None:
        started = time.perf_counter()
        status, error, deps = 0, None, None
        try:
            async with session.post(url, json=order,
                                    timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)) as resp:
                status = resp.status
                try:
                    body = await resp.json(content_type=None)
                    deps = body.get("deps") if isinstance(body, dict) else None
                except ValueError:
                    deps = None
        except TimeoutError:
            error = "timeout"
        except aiohttp.ClientConnectorError:
            error = "refused"
        except aiohttp.ClientError as exc:
            error = type(exc).__name__
        ms = (time.perf_counter() - started) * 1000
        self.calls.append(Call(target, at, ms, status, error, deps))

    def cancel(self) -> None:
        for t in list(self._tasks):
            t.cancel()
