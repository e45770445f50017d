"""What a shared limit costs per call, beside a local one, against a local redis-server.

    .venv/bin/python tests/bench/shared_limit_bench.py [--calls 5000] [--rounds 3]
                                                       [--duration 3] [--no-sidecar]

Two plans that differ only in `shared`: `limit 1000000/s burst 1000000` (never refuses,
so every call pays the limiter and nothing else changes), and the same with `shared`
and a `store` on a redis-server started here on a free loopback port (no persistence).

1. engine: `ResilientTransport.handle_async_request` in this process, one call at a
   time, a canned inner transport (no upstream I/O): p50 and p99 per call, local vs
   shared, and the difference: what the store's round trip adds to a call.
2. sidecar: `riprap run` as a process (pinned to one core), an nginx upstream and wrk
   (on the other core, with redis): p50/p99 at 1 connection and calls/s at 32
   connections, local vs shared. Needs nginx and wrk (tests/bench/proxy_bench.py
   installs them); skipped without them or with --no-sidecar.

Best of `--rounds` interleaved rounds (the machine is shared). Target: under 0.3 ms
added at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "store"))

from dsl.plan import Plan  # noqa: E402
from policies.transport import ResilientTransport  # noqa: E402
from riprap_testing.faults import free_port  # noqa: E402

RATE = 1_000_000.0
BODY = b"x" * 90 + b"\n"


def plan_dict(store: str | None, upstream: str = "http://127.0.0.1:9") -> dict[str, Any]:
    limit: dict[str, Any] = {"rate": RATE, "burst": RATE, "shared": store is not None}
    data: dict[str, Any] = {"app": "bench", "services": {"bench": {
        "name": "bench", "endpoints": [{"url": upstream}], "limit": limit}}}
    if store is not None:
        data["store"] = store
    return data


class _Body(httpx.AsyncByteStream):
    async def __aiter__(self) -> Any:
        yield BODY

    async def aclose(self) -> None:
        pass


class CannedInner(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=[(b"Content-Length", str(len(BODY)).encode())],
                              stream=_Body())


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


async def engine_round(transport: ResilientTransport, calls: int) -> list[float]:
    out = []
    clock = time.perf_counter
    for _ in range(calls):
        req = httpx.Request("GET", "http://bench/", extensions={"riprap.service": "bench"})
        t0 = clock()
        resp = await transport.handle_async_request(req)
        async for _chunk in resp.stream:
            pass
        await resp.aclose()
        out.append((clock() - t0) * 1e6)
    return out


async def engine(store: str, calls: int, rounds: int) -> dict[str, dict[str, float]]:
    local = ResilientTransport(Plan.from_dict(plan_dict(None)), CannedInner())
    shared = ResilientTransport(Plan.from_dict(plan_dict(store)), CannedInner())
    await local.start()
    await shared.start()
    await asyncio.sleep(0.3)  # the store's first heartbeat: connected, script loaded
    best: dict[str, dict[str, float]] = {}
    try:
        await engine_round(local, 500)
        await engine_round(shared, 500)
        for _ in range(rounds):
            for name, transport in (("local", local), ("shared", shared)):
                lat = await engine_round(transport, calls)
                fig = {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99),
                       "rps": 1e6 / (sum(lat) / len(lat))}
                if name not in best or fig["p50"] < best[name]["p50"]:
                    best[name] = fig
        snap = shared.snapshot()["services"]["bench"]["limiter"]
        best["shared"]["local_calls"] = snap["local_calls"]
    finally:
        await local.aclose()
        await shared.aclose()
    return best


def sidecar(store: str, work: Path, duration: int, rounds: int) -> dict[str, dict[int, dict[str, float]]] | None:
    import proxy_bench as pb

    if not (pb.have("nginx") and pb.have("wrk")):
        print("sidecar figures skipped: nginx and wrk are needed (proxy_bench.py installs them)")
        return None
    procs = []
    results: dict[str, dict[int, dict[str, float]]] = {}
    try:
        up_port = free_port()
        conf = pb.nginx_conf(work, "upstream", f"""
            server {{
                listen 127.0.0.1:{up_port} reuseport;
                location / {{ default_type text/plain; return 200 "{BODY.decode().strip()}\\n"; }}
            }}""")
        procs.append(pb.start(pb.pin(pb.LOAD_CORE, ["nginx", "-c", str(conf), "-p", str(work)])))
        up = f"http://127.0.0.1:{up_port}"
        pb.wait_http(up + "/")
        targets = {}
        for name, url in (("local", None), ("shared", store)):
            policy = work / f"{name}.json"
            policy.write_text(json.dumps(Plan.from_dict(plan_dict(url, up)).to_dict()))
            port, admin = free_port(), free_port()
            procs.append(pb.start(pb.pin(pb.FORWARDER_CORE, [
                sys.executable, "-m", "sidecar.cli", "run", str(policy), "--listen",
                f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"])))
            targets[name] = f"http://127.0.0.1:{port}/"
        for url in targets.values():
            pb.wait_http(url, host="bench")
        for url in targets.values():
            pb.wrk(url, 32, 1)  # warm-up
        for _ in range(rounds):
            for conns in (1, 32):
                for name, url in targets.items():
                    fig = pb.wrk(url, conns, duration)
                    assert fig["non2xx"] == 0 and not fig["sockerr"], (name, fig)
                    old = results.setdefault(name, {}).get(conns)
                    if old is None or fig["rps"] > old["rps"]:
                        results[name][conns] = fig
    finally:
        for proc in procs:
            pb.stop(proc)
    return results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=5000, help="engine calls per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    ap.add_argument("--no-sidecar", action="store_true")
    args = ap.parse_args()
    from redis_kit import REDIS_SERVER, RedisServer

    if REDIS_SERVER is None:
        print("SKIP: redis-server is not installed (apt-get install redis-server)")
        return 0
    work = Path(tempfile.mkdtemp(prefix="riprap-shared-bench-"))
    server = RedisServer(work).start()
    try:
        eng = asyncio.run(engine(server.url, args.calls, args.rounds))
        print(f"engine, one call at a time, canned upstream (best of {args.rounds} x {args.calls}):")
        print(f"  {'':8} {'p50 us':>9} {'p99 us':>9} {'calls/s':>9}")
        for name in ("local", "shared"):
            f = eng[name]
            print(f"  {name:8} {f['p50']:9.1f} {f['p99']:9.1f} {f['rps']:9.0f}")
        print(f"  {'added':8} {eng['shared']['p50'] - eng['local']['p50']:9.1f} "
              f"{eng['shared']['p99'] - eng['local']['p99']:9.1f}   (target: < 300 us at p50)")
        print(f"  calls the local share answered (the store late or down): "
              f"{eng['shared']['local_calls']:.0f} of {args.calls * args.rounds + 500}")
        if not args.no_sidecar:
            sc = sidecar(server.url, work, args.duration, args.rounds)
            if sc is not None:
                print(f"sidecar process, nginx upstream, wrk (best of {args.rounds} x {args.duration}s):")
                print(f"  {'':8} {'c=1 p50 ms':>11} {'c=1 p99 ms':>11} {'c=1 /s':>8} "
                      f"{'c=32 /s':>8} {'c=32 p99 ms':>12}")
                for name in ("local", "shared"):
                    one, many = sc[name][1], sc[name][32]
                    print(f"  {name:8} {one['p50']:11.3f} {one['p99']:11.3f} {one['rps']:8.0f} "
                          f"{many['rps']:8.0f} {many['p99']:12.3f}")
                lo, sh = sc["local"][1], sc["shared"][1]
                print(f"  {'added':8} {sh['p50'] - lo['p50']:11.3f} {sh['p99'] - lo['p99']:11.3f}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
