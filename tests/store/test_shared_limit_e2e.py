"""`limit ... shared` end to end: real sidecar processes of one app, a real redis-server.

Covers the contract's section 4 `shared` and the issue's tests: two and three sidecars
sharing one bucket (their combined 2xx within 10 % of rate x seconds + burst), `per header`
buckets shared across sidecars, the store killed mid-load (no call waits, p99 within 50 ms
of normal, each sidecar at its share, `/state` and the metrics say so) and restarted (back
to the shared bucket within seconds), a paused store, and a reload that changes the store.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from fleet_kit import Answers, Sidecar, hammer
from redis_kit import REDIS_SERVER, RedisServer

from dsl.plan import Plan
from riprap_testing.faults import FaultServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultServer]:
    server = FaultServer(name="up").start()
    yield server
    server.stop()


TENANT_LIMIT = {"rate": 0.5, "burst": 3, "shared": True, "per_header": "X-Tenant"}


def write_plan(path: Path, app: str, store: str, upstream: str, *, rate: float, burst: float,
               per_header: str | None = None) -> Path:
    """A plan with service `api` (`limit RATE burst BURST [per header H] shared`) and
    service `tenant` (`limit 0.5/s burst 3 per header X-Tenant shared`)."""
    limit: dict[str, Any] = {"rate": rate, "burst": burst, "shared": True}
    if per_header:
        limit["per_header"] = per_header
    plan = {"app": app, "store": store, "services": {
        "api": {"name": "api", "endpoints": [{"url": upstream}], "limit": limit},
        "tenant": {"name": "tenant", "endpoints": [{"url": upstream}], "limit": TENANT_LIMIT},
    }}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(Plan.from_dict(plan).to_dict()))  # every field, as compiled
    os.replace(tmp, path)
    return path


def write_policy(path: Path, app: str, store: str, upstream: str, *, rate: float,
                 burst: float) -> Path:
    """The same two services as `write_plan`, as a `.riprap` policy file."""
    path.write_text(f"""\
app {app}
store {store}

service api {{
    endpoint {upstream}
    timeout 5s
    limit {rate:g}/s burst {burst:g} shared
}}

service tenant {{
    endpoint {upstream}
    timeout 5s
    limit 30/m burst 3 per header X-Tenant shared   # 0.5/s
}}
""")
    return path


def fleet(tmp: Path, n: int, app: str, store: str, upstream: str, *, riprap: bool = False,
          **limit: Any) -> list[Sidecar]:
    """N sidecars of one app, started side by side (from `.riprap` files or plan `.json`)."""
    write = write_policy if riprap else write_plan
    cars = [Sidecar(write(tmp / f"{app}-{i}.{'riprap' if riprap else 'json'}", app, store,
                          upstream, **limit))
            for i in range(n)]
    for car in cars:
        car.launch()
    for car in cars:
        car.wait_ready()
    wait(lambda: all(sharing(c) == n for c in cars), 10, f"{n} sidecars in the presence set")
    return cars


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def sharing(car: Sidecar) -> int:
    return int(car.state()["services"]["api"]["limiter"]["sidecars"])


def assert_logged_once_per_change(logs: str) -> None:
    """`is down` and `answers again` alternate: one line per change, never one per call."""
    events = [line for line in logs.splitlines() if "riprap.store" in line
              and ("is down" in line or "answers again" in line)]
    for a, b in zip(events, events[1:], strict=False):
        assert ("is down" in a) != ("is down" in b), logs


def total_ok(answers: list[Answers]) -> int:
    return sum(a.count(200) for a in answers)


RATE, BURST = 40.0, 20.0


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
          upstream: FaultServer) -> Iterator[list[Sidecar]]:
    """Three sidecars of app `fleet` from a `.riprap` file: `limit 40/s burst 20 shared`."""
    cars = fleet(tmp_path_factory.mktemp("three"), 3, "fleet", redis_server.url, upstream.url,
                 riprap=True, rate=RATE, burst=BURST)
    yield cars
    for car in cars:
        assert car.stop() == 0, car.logs()


@pytest.mark.parametrize("n", [2, 3])
def test_sidecars_of_one_app_share_one_bucket(three: list[Sidecar], n: int) -> None:
    cars = three[:n]
    time.sleep(BURST / RATE + 0.1)  # the bucket full again after the test before
    seconds = 5.0
    answers = asyncio.run(hammer([c.url for c in cars], seconds))
    ok = total_ok(answers)
    expected = RATE * seconds + BURST
    assert abs(ok - expected) <= 0.1 * expected, (ok, expected, [c.logs() for c in cars])
    assert all(a.count(200) > 0 for a in answers)  # every sidecar got its part
    limited = [a for a in answers if a.count(429)]
    assert limited and all(ra == "1" for a in limited for ra in a.retry_after)
    assert set(s for a in answers for s in a.statuses) <= {200, 429}
    for car in cars:
        assert car.state()["store"]["up"] is True
        assert car.metric("riprap_store_up") == 1.0


def test_per_header_buckets_are_shared_across_sidecars(three: list[Sidecar],
                                                       redis_server: RedisServer) -> None:
    a, b = three[0], three[1]
    with httpx.Client(trust_env=False, timeout=5) as client:
        def get(car: Sidecar, tenant: str | None) -> httpx.Response:
            headers = {"X-Tenant": tenant} if tenant is not None else {}
            return client.get(car.url + "/tenant/echo", headers=headers)

        assert [get(a, "t1").status_code for _ in range(2)] == [200, 200]
        assert get(b, "t1").status_code == 200  # the third of t1's burst, elsewhere
        over = get(b, "t1")
        assert over.status_code == 429, (a.state(), b.state(), b.logs())
        assert over.headers["x-riprap-reason"] == "rate-limited"
        assert over.headers["retry-after"] == "2"  # 0.5/s: a token every 2 s
        assert get(a, "t1").status_code == 429
        assert get(a, "t2").status_code == 200  # another tenant, another bucket
        assert get(b, "x" * 4000).status_code == 200  # a long value is a short key
    keys = redis_server.command("KEYS", "riprap:rl:fleet:tenant:*").decode()
    assert "riprap:rl:fleet:tenant:h:" in keys and "x" * 100 not in keys


@pytest.fixture(scope="module")
def fragile(tmp_path_factory: pytest.TempPathFactory,
            upstream: FaultServer) -> Iterator[tuple[RedisServer, list[Sidecar]]]:
    """Two sidecars of app `outage` on a redis-server of their own, to pause and kill."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    tmp = tmp_path_factory.mktemp("fragile")
    server = RedisServer(tmp).start()
    cars = fleet(tmp, 2, "outage", server.url, upstream.url, rate=RATE, burst=10)
    yield server, cars
    for car in cars:
        car.stop()
    server.kill()


def test_paused_store_holds_no_call_up(fragile: tuple[RedisServer, list[Sidecar]]) -> None:
    server, (car, _) = fragile
    normal = asyncio.run(hammer([car.url], 1.0, pause=0.02))[0]
    server.pause()
    try:
        slow = asyncio.run(hammer([car.url], 1.5, pause=0.02))[0]
        assert slow.p99() <= normal.p99() + 0.05, (normal.p99(), slow.p99())
        assert set(slow.statuses) <= {200, 429} and slow.count(200) > 0
        assert car.state()["store"]["up"] is False
        assert (car.metric("riprap_store_errors_total", kind="timeout") or 0) >= 1
        assert car.metric("riprap_store_up") == 0.0
    finally:
        server.resume()
    wait(lambda: car.state()["store"]["up"], 5, "the store back up")


def test_store_killed_mid_load_then_restarted(fragile: tuple[RedisServer, list[Sidecar]]) -> None:
    server, cars = fragile
    rate, burst = RATE, 10.0
    urls = [c.url for c in cars]
    downs = [c.logs().count("is down") for c in cars]
    time.sleep(burst / rate + 0.1)
    normal = asyncio.run(hammer(urls, 1.5))
    assert 0.8 * (rate * 1.5 + burst) <= total_ok(normal) <= 1.2 * (rate * 1.5 + burst)

    async def outage() -> list[Answers]:
        load = asyncio.ensure_future(hammer(urls, 2.5))
        await asyncio.sleep(0.5)
        server.kill()
        return await load

    during = asyncio.run(outage())
    # No call waited on the dead store.
    for before, after in zip(normal, during, strict=True):
        assert after.p99() <= before.p99() + 0.05, (before.p99(), after.p99(), sorted(
            after.latencies)[-5:])
        assert set(after.statuses) <= {200, 429}
    for car in cars:
        state = car.state()
        assert state["store"]["up"] is False
        assert state["services"]["api"]["limiter"]["mode"] == "local-share"
        assert state["services"]["api"]["limiter"]["local_rate"] == rate / 2
        assert car.metric("riprap_store_up") == 0.0
        assert (car.metric("riprap_store_errors_total", kind="connection") or 0) >= 1
    # Each sidecar alone now: its share (rate / 2, burst / 2) for 2 s.
    share = asyncio.run(hammer(urls, 2.0))
    for a in share:
        expected = rate / 2 * 2.0 + burst / 2
        assert abs(a.count(200) - expected) <= 0.15 * expected + 2, (a.count(200), expected)
    for car, before in zip(cars, downs, strict=True):
        wait(lambda c=car, b=before: c.logs().count("is down") > b, 2, "the outage logged")
        assert_logged_once_per_change(car.logs())

    server.start()  # same port, empty
    t0 = time.monotonic()
    wait(lambda: all(c.state()["store"]["up"] for c in cars), 5, "the store back up")
    assert time.monotonic() - t0 < 5
    again = asyncio.run(hammer(urls, 2.0))
    expected = rate * 2.0 + burst
    assert abs(total_ok(again) - expected) <= 0.1 * expected + 2, (total_ok(again), expected)
    for car in cars:
        assert car.metric("riprap_store_up") == 1.0
        assert "answers again" in car.logs()
        assert_logged_once_per_change(car.logs())


def test_reload_to_another_store_reconnects_without_failing_calls(
        tmp_path: Path, upstream: FaultServer) -> None:
    first = RedisServer(tmp_path).start()
    other = RedisServer(tmp_path).start()
    try:
        policy = write_plan(tmp_path / "moving.json", "moving", first.url, upstream.url,
                            rate=1000, burst=1000)
        car = Sidecar(policy).start()
        try:
            old_hash = car.plan_hash()

            async def load_while_reloading() -> Answers:
                load = asyncio.ensure_future(hammer([car.url], 2.5))
                await asyncio.sleep(0.5)
                write_plan(policy, "moving", other.url, upstream.url, rate=1000, burst=1000)
                return (await load)[0]

            answers = asyncio.run(load_while_reloading())
            assert car.plan_hash() != old_hash
            assert answers.statuses and set(answers.statuses) == {200}
            assert car.state()["store"]["url"] == other.url
            assert b":1" in other.command("EXISTS", "riprap:rl:moving:api")
            # the old store's pool is closed once no plan uses it
            wait(lambda: _clients(first) <= 1, 10, "the old pool closed")  # 1: this query
        finally:
            car.stop()
    finally:
        first.kill()
        other.kill()


def _clients(server: RedisServer) -> int:
    for line in server.command("INFO", "clients").decode().splitlines():
        if line.startswith("connected_clients:"):
            return int(line.split(":")[1])
    return -1
