"""The store and the shared bucket against a real redis-server on loopback.

Semantics (same as the local token bucket), keys and their expiry, the fallback share,
a store that is killed, paused or slow, and the hub's pooling per URL.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from redis_kit import RedisServer

from dsl.plan import LimitSpec
from policies.clock import SystemClock
from policies.shared_limit import PRESENCE_PREFIX, SharedLimiter, bucket_name, header_digest
from policies.store import Store, StoreHub, check_store_url, error_kind, redact


def limiter(store: Store, rate: float, burst: float, *, per_header: str | None = None,
            app: str = "app", service: str = "svc") -> SharedLimiter:
    spec = LimitSpec(rate=rate, burst=burst, per_header=per_header, shared=True)
    lim = SharedLimiter(spec, service, None, SystemClock(), store, app)
    store.join(lim.presence_key)
    return lim


def test_urls() -> None:
    assert check_store_url("redis://127.0.0.1:6379/0")
    assert check_store_url("rediss://:pw@redis.internal:6380/2")
    with pytest.raises(ValueError, match="redis:// or rediss://"):
        check_store_url("http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="no host"):
        check_store_url("redis://")
    assert redact("redis://:s3cret@h:1/0") == "redis://:***@h:1/0"
    assert redact("rediss://user:s3cret@h:1/0") == "rediss://user:***@h:1/0"
    assert redact("redis://h:1/0") == "redis://h:1/0"
    assert error_kind(TimeoutError()) == "timeout"
    assert error_kind(ConnectionRefusedError()) == "connection"


async def test_bucket_starts_full_then_refuses_with_the_wait(redis_server: RedisServer) -> None:
    store = Store(redis_server.url, "t1")
    try:
        lim = limiter(store, rate=2, burst=5, service="full")
        results = [await lim.take() for _ in range(5)]
        assert results == [0.0] * 5  # the bucket starts full
        wait = await lim.take()
        assert 0.25 < wait <= 0.5 + 1e-3  # one token every 500 ms
        await asyncio.sleep(wait)
        assert await lim.take() == 0.0  # waiting exactly the reported time succeeds
        assert lim.limited == 1
        assert store.up and store.errors == {}
    finally:
        await store.aclose()


async def test_rate_over_time_and_fractional_burst(redis_server: RedisServer) -> None:
    store = Store(redis_server.url, "t2")
    try:
        lim = limiter(store, rate=50, burst=0.5, service="rate")  # burst below 1 holds 1
        assert await lim.take() == 0.0
        assert await lim.take() > 0
        t0 = time.monotonic()
        ok = 0
        while time.monotonic() - t0 < 1.0:
            if await lim.take() == 0.0:
                ok += 1
            await asyncio.sleep(0.002)
        assert 40 <= ok <= 52, ok
    finally:
        await store.aclose()


async def test_keys_are_bounded_and_expire_when_idle(redis_server: RedisServer) -> None:
    store = Store(redis_server.url, "t3", margin_ms=200)
    try:
        lim = limiter(store, rate=20, burst=4, per_header="X-User", service="expiry")
        long_value = "u" * 10_000
        assert await lim.take(long_value) == 0.0
        assert await lim.take(None) == 0.0
        key = lim.key(long_value)
        assert key == f"riprap:rl:app:expiry:h:{header_digest(long_value)}"
        assert len(key) < 100
        keys = set(await store.client.keys("riprap:rl:app:expiry*"))
        assert keys == {key.encode(), b"riprap:rl:app:expiry:-"}
        pttl = await store.client.pttl(key)
        assert 0 < pttl <= 50 + 200 + 5  # one token of refill (50 ms) plus the margin
        deadline = time.monotonic() + 3
        while await store.client.exists(key) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not await store.client.exists(key)
        # an expired bucket is a full one: the whole burst is there again
        assert [await lim.take(long_value) for _ in range(4)] == [0.0] * 4
        assert await lim.take(long_value) > 0
    finally:
        await store.aclose()


async def test_per_header_values_have_their_own_buckets(redis_server: RedisServer) -> None:
    a = Store(redis_server.url, "ph-a")
    b = Store(redis_server.url, "ph-b")
    try:
        la = limiter(a, rate=1, burst=2, per_header="X-Tenant", service="ph")
        lb = limiter(b, rate=1, burst=2, per_header="X-Tenant", service="ph")
        # tenant t1 spends its burst across two sidecars; t2 is untouched
        assert await la.take("t1") == 0.0
        assert await lb.take("t1") == 0.0
        assert await la.take("t1") > 0
        assert await lb.take("t1") > 0
        assert await lb.take("t2") == 0.0
    finally:
        await a.aclose()
        await b.aclose()


async def test_presence_counts_the_sidecars_sharing_a_bucket(redis_server: RedisServer) -> None:
    hubs = [StoreHub(heartbeat=0.2, probe=0.05) for _ in range(3)]
    try:
        stores = []
        key = PRESENCE_PREFIX + bucket_name("pres", "svc")
        assert key == "riprap:sidecars:pres:svc"
        for hub in hubs:
            stores.append(hub.acquire(redis_server.url, (key,)))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(s.share(key) != 3 for s in stores):
            await asyncio.sleep(0.05)
        assert [s.share(key) for s in stores] == [3, 3, 3]
        assert await stores[0].client.zcard(key) == 3
        await hubs[2].aclose()  # a sidecar that stops leaves the set
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and stores[0].share(key) != 2:
            await asyncio.sleep(0.05)
        assert stores[0].share(key) == 2
    finally:
        for hub in hubs:
            await hub.aclose()


async def test_killed_store_falls_back_to_the_share_and_comes_back(fresh_redis: RedisServer) -> None:
    hubs = [StoreHub(heartbeat=0.2, probe=0.1) for _ in range(2)]
    spec = LimitSpec(rate=20, burst=4, shared=True)
    try:
        lims = []
        for hub in hubs:
            store = hub.acquire(fresh_redis.url, (PRESENCE_PREFIX + bucket_name("kill", "svc"),))
            lims.append(SharedLimiter(spec, "svc", None, SystemClock(), store, "kill"))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and lims[0].store.share(lims[0].presence_key) != 2:
            await asyncio.sleep(0.05)
        assert lims[0].store.share(lims[0].presence_key) == 2
        assert [await lims[0].take() for _ in range(4)] == [0.0] * 4
        assert await lims[1].take() > 0  # one bucket: the other sidecar sees it empty

        fresh_redis.kill()
        t0 = time.monotonic()
        first = await lims[0].take()  # fails fast (refused), falls back at once
        assert time.monotonic() - t0 < 0.1
        assert isinstance(first, float)
        store = lims[0].store
        assert not store.up
        assert store.errors.get("connection", 0) >= 1
        # while down: no call touches the store, each sidecar allows burst/2 at once
        t0 = time.monotonic()
        taken = [await lims[0].take() for _ in range(10)]
        assert time.monotonic() - t0 < 0.05
        assert taken[:1] == [0.0] and all(w > 0 for w in taken[2:])
        assert lims[0].snapshot()["mode"] == "local-share"
        assert lims[0].snapshot()["local_rate"] == 10

        fresh_redis.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(lim.store.up for lim in lims):
            await asyncio.sleep(0.05)
        assert all(lim.store.up for lim in lims)
        # the restarted store knows no bucket: full again, and shared again
        assert [await lims[0].take() for _ in range(4)] == [0.0] * 4
        assert await lims[1].take() > 0
    finally:
        for hub in hubs:
            await hub.aclose()


async def test_paused_store_costs_at_most_the_deadline(fresh_redis: RedisServer) -> None:
    store = Store(fresh_redis.url, "pause", timeout=0.03, probe=0.1)
    try:
        lim = limiter(store, rate=100, burst=100, service="pause")
        assert await lim.take() == 0.0
        fresh_redis.pause()
        t0 = time.monotonic()
        results = await asyncio.gather(*(lim.take() for _ in range(20)))
        took = time.monotonic() - t0
        assert took < 0.1, took  # every call waited at most the 30 ms deadline
        assert all(r == 0.0 for r in results)  # answered from the local share
        assert store.errors.get("timeout", 0) >= 1
        t0 = time.monotonic()
        assert await lim.take() == 0.0
        assert time.monotonic() - t0 < 0.1
        assert not store.up and store.errors["timeout"] >= 2  # late twice in a row: down
        t0 = time.monotonic()
        await lim.take()
        assert time.monotonic() - t0 < 0.01  # down: not even tried
        fresh_redis.resume()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not store.up:
            await asyncio.sleep(0.05)
        assert store.up
    finally:
        fresh_redis.resume()
        await store.aclose()


async def test_slow_store_debug_sleep(fresh_redis: RedisServer) -> None:
    store = Store(fresh_redis.url, "slow", timeout=0.03, probe=0.1)
    other = Store(fresh_redis.url, "slow-admin", timeout=5)
    try:
        lim = limiter(store, rate=100, burst=100, service="slow")
        assert await lim.take() == 0.0
        sleeper = asyncio.ensure_future(other.client.execute_command("DEBUG", "SLEEP", "1"))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        assert await lim.take() == 0.0  # late: this call falls back, after the deadline
        assert time.monotonic() - t0 < 0.1
        assert store.up  # one late answer is not an outage
        t0 = time.monotonic()
        assert await lim.take() == 0.0
        assert time.monotonic() - t0 < 0.1
        assert not store.up  # two in a row: down, nobody waits for it any more
        t0 = time.monotonic()
        assert await lim.take() == 0.0
        assert time.monotonic() - t0 < 0.01
        await sleeper
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not store.up:
            await asyncio.sleep(0.05)
        assert store.up
    finally:
        await store.aclose()
        await other.aclose()


async def test_hub_pools_per_url_and_closes_unused(redis_server: RedisServer) -> None:
    hub = StoreHub(grace=0.1)
    try:
        a = hub.acquire(redis_server.url, ("riprap:sidecars:x:y",))
        b = hub.acquire(redis_server.url, ("riprap:sidecars:x:y",))
        assert a is b and len(hub.stores) == 1
        assert hub.status() == (True, {})
        other_url = redis_server.url.rsplit("/", 1)[0] + "/1"
        c = hub.acquire(other_url)
        assert c is not a and hub.current is c
        hub.release(a, ("riprap:sidecars:x:y",))
        hub.release(b, ("riprap:sidecars:x:y",))
        await asyncio.sleep(0.3)
        assert hub.stores == [c]
        assert hub.snapshot() is not None and hub.snapshot()["url"] == other_url  # type: ignore[index]
    finally:
        await hub.aclose()


async def test_password_and_database(tmp_path: object, fresh_redis: RedisServer) -> None:
    secured = RedisServer(fresh_redis.workdir, password="s3cret").start()
    try:
        good = Store(f"redis://:s3cret@127.0.0.1:{secured.port}/3", "pw")
        bad = Store(f"redis://:wrong@127.0.0.1:{secured.port}/3", "pw-bad")
        try:
            lim = limiter(good, rate=1, burst=1, service="pw")
            assert await lim.take() == 0.0
            assert await good.client.exists(lim.key(None)) == 1
            assert (await good.client.client_info())["db"] == 3
            assert await limiter(bad, rate=1, burst=1, service="pw").take() == 0.0  # local
            assert bad.errors.get("auth", 0) + bad.errors.get("response", 0) >= 1
            assert "s3cret" not in str(good.snapshot())
        finally:
            await good.aclose()
            await bad.aclose()
    finally:
        secured.kill()


async def test_concurrent_calls_go_together_and_stay_atomic(fresh_redis: RedisServer) -> None:
    store = Store(fresh_redis.url, "batch")
    try:
        lim = limiter(store, rate=1, burst=10, service="batch")
        assert await store.beat()
        results = await asyncio.gather(*(lim.take() for _ in range(60)))
        assert store.errors == {}
        assert results.count(0.0) == 10  # exactly the burst, not one more
        assert all(0 < r <= 1.0 + 1e-3 for r in results if r)
        # one pipeline per loop turn: no connection per call in flight
        info = fresh_redis.command("INFO", "clients").decode()
        clients = int(info.split("connected_clients:")[1].split()[0])
        assert clients <= 4, info  # heartbeat, first call, the batch of the rest, this query
        assert store.up and store.errors == {}
    finally:
        await store.aclose()
