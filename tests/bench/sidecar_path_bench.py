"""In-process cost of the sidecar's own per-request path, in microseconds per call.

    .venv/bin/python tests/bench/sidecar_path_bench.py [--calls 20000] [--repeat 5] [--profile]

No sockets: the proxy ASGI app is driven directly (a canned `scope`, `receive` and `send`)
and the engine's inner transport is a canned one answering a fixed ~100-byte 200 with
nginx-like headers. The plan is the one `proxy_bench.py` runs (retry + budget, breaker,
outlier, least-request, a limit too high to trigger). Printed, best of `--repeat` runs:

  full        the proxy app end to end (adapter + engine + metrics observer)
  engine      `ResilientTransport.handle_async_request` alone on pre-built requests, the
              answer's stream read and closed, with the same metrics observer
  adapter     full - engine: routing, header copies, request/response plumbing
  metrics     the observer calls one plain call makes (call_finished + attempt_finished)
  adapter-only  the proxy app over a stub engine (the canned answer, no policies): the
              adapter's own cost measured directly
  null-obs    the full path with no observer (full - null-obs: metrics in place)

`--profile` prints a cProfile of the full path instead.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dsl.compiler import compile_source  # noqa: E402
from sidecar.app import create_app  # noqa: E402
from sidecar.metrics import SidecarMetrics  # noqa: E402
from sidecar.proxy import ProxyApp  # noqa: E402

PLAN = """\
app bench

service bench {
    timeout 5s
    endpoint http://127.0.0.1:9
    balance least-request
    retry 2 on connect-failure, reset, 502, 503 backoff 10ms..100ms budget 20%
    breaker failures 50 open 10s
    outlier failures 50 eject 10s
    limit 1000000/s burst 100000
}
"""
BODY = b"x" * 90 + b"\n"
UP_HEADERS = [(b"Server", b"nginx/1.22.1"), (b"Date", b"Fri, 27 Nov 2026 10:00:00 GMT"),
              (b"Content-Type", b"text/plain"), (b"Content-Length", str(len(BODY)).encode()),
              (b"Connection", b"keep-alive")]
SCOPE: dict[str, Any] = {
    "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
    "scheme": "http", "path": "/", "raw_path": b"/", "query_string": b"",
    "root_path": "", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 7400),
    "headers": [(b"host", b"bench"), (b"user-agent", b"bench/1.0"), (b"accept", b"*/*")],
}


class _Body(httpx.AsyncByteStream):
    __slots__ = ()

    async def __aiter__(self) -> Any:
        yield BODY

    async def aclose(self) -> None:
        pass


class CannedInner(httpx.AsyncBaseTransport):
    """Answers every request at once, as `AiohttpTransport` would shape the answer."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=list(UP_HEADERS), stream=_Body(),
                              extensions={"http_version": b"HTTP/1.1", "reason_phrase": b"OK"})


def _plan() -> Any:
    unit = compile_source(PLAN, "bench.riprap")
    assert unit.plan is not None, unit.diagnostics
    return unit.plan


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: dict[str, Any]) -> None:
    pass


async def run_full(app: Any, calls: int) -> float:
    scope = SCOPE
    t0 = time.perf_counter()
    for _ in range(calls):
        await app(dict(scope), _receive, _send)
    return (time.perf_counter() - t0) / calls * 1e6


async def run_engine(transport: Any, calls: int) -> float:
    reqs = [httpx.Request("GET", "http://bench/", headers=[(b"user-agent", b"bench/1.0"),
                                                          (b"accept", b"*/*")],
                          extensions={"riprap.service": "bench"}) for _ in range(calls)]
    for r in reqs:
        r.read()
    t0 = time.perf_counter()
    for r in reqs:
        resp = await transport.handle_async_request(r)
        async for _chunk in resp.stream:
            pass
        await resp.aclose()
    return (time.perf_counter() - t0) / calls * 1e6


def run_metrics(calls: int) -> float:
    m = SidecarMetrics()
    t0 = time.perf_counter()
    for _ in range(calls):
        m.attempt_finished("bench", "http://127.0.0.1:9", "2xx", 0.0004)
        m.call_finished("bench", "ok", 200, 1, 0.0005, None)
    return (time.perf_counter() - t0) / calls * 1e6


async def measure(calls: int, repeat: int) -> dict[str, float]:
    sidecar = create_app(_plan(), inner=CannedInner(), watch=False, supervise=False)
    bare = create_app(_plan(), inner=CannedInner(), watch=False, supervise=False)
    bare.holder.transport._env.observer._o = _NullObs()  # no metrics at all
    stub = ProxyApp(_StubRuntime(sidecar.holder.router), SidecarMetrics())
    await sidecar.start()
    await bare.start()
    best: dict[str, float] = {}
    try:
        await run_full(sidecar.proxy, 2000)
        await run_full(bare.proxy, 2000)
        for _ in range(repeat):
            for name, value in (("full", await run_full(sidecar.proxy, calls)),
                                ("engine", await run_engine(sidecar.transport, calls)),
                                ("metrics", run_metrics(calls)),
                                ("null-obs", await run_full(bare.proxy, calls)),
                                ("adapter-only", await run_full(stub, calls))):
                best[name] = min(best.get(name, float("inf")), value)
    finally:
        await sidecar.aclose()
        await bare.aclose()
    best["adapter"] = best["full"] - best["engine"]
    return best


class _StubRuntime:
    """The proxy's runtime with the engine replaced by the canned inner transport."""

    def __init__(self, router: Any) -> None:
        self.router = router
        self.transport = CannedInner()


class _NullObs:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


async def profile(calls: int) -> None:
    sidecar = create_app(_plan(), inner=CannedInner(), watch=False, supervise=False)
    await sidecar.start()
    await run_full(sidecar.proxy, 2000)
    prof = cProfile.Profile()
    prof.enable()
    await run_full(sidecar.proxy, calls)
    prof.disable()
    await sidecar.aclose()
    pstats.Stats(prof).sort_stats("tottime").print_stats(40)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    if args.profile:
        runner(profile(args.calls))
        return 0
    best = runner(measure(args.calls, args.repeat))
    for name in ("full", "engine", "adapter", "adapter-only", "metrics", "null-obs"):
        print(f"{name:9s} {best[name]:7.2f} us/call")
    print(f"{'metrics in place (full - null-obs)':9s} {best['full'] - best['null-obs']:.2f} us/call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
