"""The demo's checkout: a small Starlette app that calls payments, inventory and
recommendations, the way an ordinary app does.

Two ways to reach its dependencies:

* through riprap (``--proxy URL``, or ``HTTP_PROXY`` in the environment): it calls
  ``http://payments/charge`` and the sidecar resolves, retries, fails over, falls back;
* straight to the replicas (``--direct JSON``): the "without riprap" baseline, which picks
  a payments replica at random and the inventory shard by its own hash, with no retries.

Either way the app logic is the same: an order succeeds when payment and stock succeed;
recommendations are optional. ``POST /checkout`` answers 200 or 503 with a JSON account
of every dependency call (status, latency, riprap's attempts/fallback/reason headers and
which upstream server answered), which the demo aggregates into its live view.

Run: ``python -m sidecar.demo.checkout --listen 127.0.0.1:18480 --proxy http://127.0.0.1:18400``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
import zlib
from typing import Any, AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sidecar.demo.processes import die_with_parent

CALL_TIMEOUT = 2.0  # the app's own per-call timeout, the same with and without riprap


class Dependencies:
    """Outbound calls, through the sidecar or straight to the replicas."""

    def __init__(self, proxy: str | None, direct: dict[str, Any] | None, seed: int) -> None:
        self.proxy = proxy
        self.direct = direct
        self._rng = random.Random(seed)
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT),
            connector=aiohttp.TCPConnector(limit=200, force_close=False),
            trust_env=self.proxy is None and self.direct is None,  # honour HTTP_PROXY
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def url(self, service: str, path: str, sku: str) -> str:
        if self.direct is None:
            return f"http://{service}{path}"
        targets = self.direct[service]
        if isinstance(targets, dict):  # sharded: {"shards": [...]} by the app's own hash
            shards = targets["shards"]
            base = shards[zlib.crc32(sku.encode()) % len(shards)]
        else:
            base = self._rng.choice(targets)
        return f"{base}{path}"

    async def call(self, service: str, method: str, path: str, sku: str,
                   headers: dict[str, str], body: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self.session is not None
        started = time.perf_counter()
        doc: dict[str, Any] = {"status": 0, "attempts": None, "fallback": None, "reason": None,
                               "server": None}
        try:
            async with self.session.request(method, self.url(service, path, sku),
                                            headers=headers, json=body, proxy=self.proxy) as resp:
                raw = await resp.read()
                doc["status"] = resp.status
                doc["attempts"] = resp.headers.get("x-riprap-attempts")
                doc["fallback"] = resp.headers.get("x-riprap-fallback")
                doc["reason"] = resp.headers.get("x-riprap-reason")
                doc["server"] = resp.headers.get("x-fault-server") or _server_of(raw)
        except TimeoutError:
            doc["reason"] = "client-timeout"
        except aiohttp.ClientError as exc:
            doc["reason"] = type(exc).__name__
        doc["ms"] = round((time.perf_counter() - started) * 1000, 2)
        doc["ok"] = 200 <= doc["status"] < 300
        return doc


def _server_of(raw: bytes) -> str | None:
    try:
        value = json.loads(raw).get("server")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def create_app(deps: Dependencies) -> Starlette:
    async def checkout(request: Request) -> JSONResponse:
        try:
            order = await request.json()
        except ValueError:
            order = {}
        sku = str(order.get("sku", "SKU-1"))
        user = str(order.get("user", "u1"))
        order_id = str(order.get("order", f"o-{time.time_ns()}"))
        pay, stock, recs = await asyncio.gather(
            deps.call("payments", "POST", "/charge", sku,
                      {"Idempotency-Key": order_id}, {"order": order_id, "amount": 42}),
            deps.call("inventory", "GET", f"/stock/{sku}", sku, {"X-Sku": sku}),
            deps.call("recommendations", "GET", f"/recommendations?user={user}", sku, {}),
        )
        ok = pay["ok"] and stock["ok"]
        return JSONResponse({"ok": ok, "pid": os.getpid(),
                             "deps": {"payments": pay, "inventory": stock,
                                      "recommendations": recs}},
                            status_code=200 if ok else 503)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "pid": os.getpid()})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await deps.open()
        try:
            yield
        finally:
            await deps.close()

    return Starlette(routes=[Route("/checkout", checkout, methods=["POST"]),
                             Route("/healthz", healthz)], lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sidecar.demo.checkout",
                                description="The riprap demo's checkout app.")
    p.add_argument("--listen", default="127.0.0.1:18480", help="HOST:PORT to serve on")
    p.add_argument("--proxy", default=None,
                   help="send outbound calls through this riprap sidecar (default: HTTP_PROXY)")
    p.add_argument("--direct", default=None,
                   help="JSON {service: [urls]} or {service: {'shards': [urls]}}: no sidecar")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    direct = json.loads(args.direct) if args.direct else None
    if direct is None and args.proxy is None and not os.environ.get("HTTP_PROXY"):
        print("error: give --proxy URL, set HTTP_PROXY, or give --direct JSON", file=sys.stderr)
        return 2
    die_with_parent()  # the sidecar supervises us; never outlive it
    app = create_app(Dependencies(args.proxy, direct, args.seed))
    uvicorn.run(app, host=host, port=int(port), log_level="warning", access_log=False,
                lifespan="on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
