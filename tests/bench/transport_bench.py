"""Requests/s through riprap's engine vs plain aiohttp vs httpx's own pool, same run.

    .venv/bin/python tests/bench/transport_bench.py [--seconds 3] [--concurrency 32] [--no-uvloop]

A minimal keep-alive HTTP/1.1 upstream runs in a child process on 127.0.0.1 (so it
does not share the client's event loop). In this process, `--concurrency` workers send
GETs back to back for `--seconds` each, through:

  1. plain aiohttp (one ClientSession): the ceiling;
  2. AiohttpTransport alone (httpx.Request/Response over aiohttp's pool);
  3. ResilientTransport over AiohttpTransport, called like the sidecar does (timeout,
     retry with budget, breaker, limiter, bulkhead, outlier, least-request);
  4. the same through an httpx.AsyncClient (the in-process way);
  5. httpx's own AsyncHTTPTransport (httpcore), for comparison.

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import socket
import time
from typing import Awaitable, Callable

import aiohttp
import httpx

from dsl.plan import (
    BreakerSpec,
    BudgetSpec,
    ConcurrencySpec,
    EndpointSpec,
    LimitSpec,
    OutlierSpec,
    Plan,
    RetrySpec,
    ServicePlan,
)
from policies.aiohttp_transport import AiohttpTransport
from policies.transport import ResilientTransport

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


class _Upstream(asyncio.Protocol):
    """Answers each request head with a fixed 200 (GETs only: no bodies to skip)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
            self.transport.write(ANSWER * n)  # type: ignore[attr-defined]


def _serve(sock: socket.socket, use_uvloop: bool) -> None:
    if use_uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Upstream, sock=sock)
        await server.serve_forever()

    asyncio.run(main())


async def _load(name: str, seconds: float, concurrency: int,
                one: Callable[[], Awaitable[None]]) -> float:
    for _ in range(50):  # warm the pool
        await one()
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await one()
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rate = done / (time.perf_counter() - t0)
    print(f"  {name:<44} {rate:8.0f} req/s")
    return rate


def _plan(url: str) -> Plan:
    svc = ServicePlan(
        name="up", endpoints=(EndpointSpec(url),), timeout=5.0,
        retry=RetrySpec(retries=2, budget=BudgetSpec(0.2)),
        breaker=BreakerSpec("consecutive", failures=5),
        limit=LimitSpec(rate=1e9, burst=1e9), concurrency=ConcurrencySpec(max=256),
        outlier=OutlierSpec(failures=5))
    return Plan(services={"up": svc})


async def run(port: int, seconds: float, concurrency: int) -> None:
    url = f"http://127.0.0.1:{port}/bench"
    results: dict[str, float] = {}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512)) as session:
        async def plain() -> None:
            async with session.get(url) as r:
                await r.read()
        results["aiohttp"] = await _load("plain aiohttp", seconds, concurrency, plain)

    inner = AiohttpTransport()
    req = httpx.Request("GET", url)

    async def via_inner() -> None:
        r = await inner.handle_async_request(req)
        await r.aread()
        await r.aclose()
    results["inner"] = await _load("AiohttpTransport alone", seconds, concurrency, via_inner)
    await inner.aclose()

    rt = ResilientTransport(_plan(f"http://127.0.0.1:{port}"), rng=random.Random(1))
    routed = httpx.Request("GET", "http://up/bench", extensions={"riprap.service": "up"})

    async def via_engine() -> None:
        r = await rt.handle_async_request(routed)
        await r.aread()
        await r.aclose()
    results["engine"] = await _load("ResilientTransport(AiohttpTransport)", seconds,
                                    concurrency, via_engine)

    async with httpx.AsyncClient(transport=rt) as client:
        async def via_client() -> None:
            await client.get("http://up/bench")
        results["client"] = await _load("httpx.AsyncClient(ResilientTransport)", seconds,
                                        concurrency, via_client)

    httpcore = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=512))

    async def via_httpcore() -> None:
        r = await httpcore.handle_async_request(req)
        await r.aread()
        await r.aclose()
    results["httpcore"] = await _load("httpx AsyncHTTPTransport (httpcore)", seconds,
                                      concurrency, via_httpcore)
    await httpcore.aclose()

    print(f"  engine / plain aiohttp: {results['engine'] / results['aiohttp']:.0%}; "
          f"engine / httpcore: {results['engine'] / results['httpcore']:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--no-uvloop", action="store_true")
    args = ap.parse_args()
    use_uvloop = not args.no_uvloop
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    child = mp.get_context("fork").Process(target=_serve, args=(sock, use_uvloop), daemon=True)
    child.start()
    try:
        loop_name = "asyncio"
        if use_uvloop:
            try:
                import uvloop

                uvloop.install()
                loop_name = "uvloop"
            except ImportError:
                pass
        print(f"c={args.concurrency}, {args.seconds:g} s per figure, client loop {loop_name}, "
              f"upstream 127.0.0.1:{port}")
        asyncio.run(run(port, args.seconds, args.concurrency))
    finally:
        child.terminate()
        child.join()


if __name__ == "__main__":
    main()
