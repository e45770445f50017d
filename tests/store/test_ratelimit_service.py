"""The Envoy rate limit service (gRPC on loopback) over the shared store, with a real client.

It must draw on the same buckets as the Python engine's `SharedLimiter` (a fleet may mix
engines), follow the descriptor convention, answer OVER_LIMIT with the wait and the
headers Envoy adds to its 429, pick up a new plan, and answer from the local share while
the store is down.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from redis_kit import RedisServer

from dsl.plan import Plan
from policies.clock import SystemClock
from policies.shared_limit import SharedLimiter
from policies.store import StoreHub
from sidecar import rls_messages as rls
from sidecar.ratelimit_service import RateLimitService


def plan(store: str, *, app: str = "shop", rate: float = 5, burst: float = 3,
         per_header: str | None = None, shared: bool = True) -> Plan:
    limit: dict[str, Any] = {"rate": rate, "burst": burst, "shared": shared}
    if per_header:
        limit["per_header"] = per_header
    return Plan.from_dict({
        "app": app, "store": store,
        "services": {
            "payments": {"name": "payments", "endpoints": [{"url": "http://127.0.0.1:9"}],
                         "limit": limit},
            "open": {"name": "open", "endpoints": [{"url": "http://127.0.0.1:9"}]},
        },
    })


def ask(service: str, key: str | None = None, domain: str = "shop") -> Any:
    d = rls.RateLimitDescriptor()
    d.entries.add(key="riprap_service", value=service)
    if key is not None:
        d.entries.add(key="riprap_key", value=key)
    return rls.RateLimitRequest(domain=domain, descriptors=[d])


class Client:
    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        # the method path Envoy calls, over grpcio's generic client
        self.call = self.channel.unary_unary(
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
            request_serializer=rls.RateLimitRequest.SerializeToString,
            response_deserializer=rls.RateLimitResponse.FromString)

    async def __call__(self, service: str, key: str | None = None, domain: str = "shop") -> Any:
        return await self.call(ask(service, key, domain), timeout=2)

    async def close(self) -> None:
        await self.channel.close()


OK = 1  # envoy.service.ratelimit.v3.RateLimitResponse.Code, by number as on the wire
OVER = 2


async def test_shared_bucket_over_grpc_and_mixed_with_the_python_engine(
        redis_server: RedisServer) -> None:
    current = [plan(redis_server.url)]
    hub = StoreHub()
    service = RateLimitService(lambda: current[0], hub, 0)
    port = await service.start()
    client = Client(port)
    python_hub = StoreHub()
    try:
        assert service.address == f"127.0.0.1:{port}"
        answers = [await client("payments") for _ in range(3)]  # the burst
        assert [a.overall_code for a in answers] == [OK] * 3
        over = await client("payments")
        assert over.overall_code == OVER
        assert over.statuses[0].code == OVER
        wait = rls.duration_seconds(over.statuses[0].duration_until_reset)
        assert 0.1 < wait <= 0.2 + 1e-3  # 5/s: a token every 200 ms
        headers = {h.key: h.value for h in over.response_headers_to_add}
        assert headers == {"retry-after": "1", "x-riprap-reason": "rate-limited"}
        assert (await client("open")).overall_code == OK  # not a shared limit: not ours
        assert (await client("payments", domain="other-app")).overall_code == OK

        # A Python sidecar of the same app draws on the same bucket.
        p = current[0]
        svc = p.services["payments"]
        assert svc.limit is not None
        store = python_hub.acquire(redis_server.url)
        lim = SharedLimiter(svc.limit, "payments", None, SystemClock(), store, "shop")
        await asyncio.sleep(0.21)
        assert await lim.take() == 0.0  # the one token that refilled
        assert (await client("payments")).overall_code == OVER
        assert service.snapshot()["limits"]["payments"]["store"] == "up"
    finally:
        await client.close()
        await service.stop()
        await hub.aclose()
        await python_hub.aclose()


async def test_per_header_keys_and_a_new_plan(redis_server: RedisServer) -> None:
    current = [plan(redis_server.url, app="tenants", rate=1, burst=1, per_header="X-Tenant")]
    hub = StoreHub()
    service = RateLimitService(lambda: current[0], hub, 0)
    port = await service.start()
    client = Client(port)
    try:
        assert (await client("payments", "t1", "tenants")).overall_code == OK
        assert (await client("payments", "t1", "tenants")).overall_code == OVER
        assert (await client("payments", "t2", "tenants")).overall_code == OK
        assert (await client("payments", None, "tenants")).overall_code == OK  # no header
        assert (await client("payments", "x" * 5000, "tenants")).overall_code == OK
        # a reload that raises the burst: the next call is answered on the new plan
        current[0] = plan(redis_server.url, app="tenants", rate=1, burst=50, per_header="X-Tenant")
        assert (await client("payments", "t1", "tenants")).overall_code == OK
        # a reload that drops `shared`: no longer ours to enforce
        current[0] = plan(redis_server.url, app="tenants", rate=1, burst=1, shared=False)
        for _ in range(3):
            assert (await client("payments", "t3", "tenants")).overall_code == OK
    finally:
        await client.close()
        await service.stop()
        await hub.aclose()


async def test_store_down_answers_from_the_local_share_without_waiting(
        fresh_redis: RedisServer) -> None:
    current = [plan(fresh_redis.url, app="down", rate=10, burst=4)]
    hub = StoreHub(probe=0.1)
    service = RateLimitService(lambda: current[0], hub, 0)
    port = await service.start()
    client = Client(port)
    try:
        assert (await client("payments", domain="down")).overall_code == OK
        fresh_redis.pause()  # accepts connections, never answers
        t0 = time.monotonic()
        codes = [(await client("payments", domain="down")).overall_code for _ in range(6)]
        assert time.monotonic() - t0 < 0.5
        assert codes[:4] == [OK] * 4 and codes[-1] == OVER  # the local bucket: 4, then none
        assert service.snapshot()["limits"]["payments"]["store"] == "down"
        fresh_redis.resume()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and service.snapshot()["limits"]["payments"]["store"] != "up":
            await asyncio.sleep(0.05)
        assert service.snapshot()["limits"]["payments"]["store"] == "up"
    finally:
        fresh_redis.resume()
        await client.close()
        await service.stop()
        await hub.aclose()


async def test_plan_with_shared_limits_and_no_store_is_a_clear_error() -> None:
    bad = Plan.from_dict({"app": "nostore", "services": {"s": {
        "name": "s", "endpoints": [{"url": "http://127.0.0.1:9"}],
        "limit": {"rate": 1, "burst": 1, "shared": True}}}})
    hub = StoreHub()
    service = RateLimitService(lambda: bad, hub, 0)
    with pytest.raises(ValueError, match="no `store`"):
        await service.start()
    await service.stop()
    await hub.aclose()
