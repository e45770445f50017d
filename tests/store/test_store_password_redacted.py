"""The store's password never leaves the policy file: not in /plan, /state, /metrics, the
dashboard's data or the logs (a failed reload's diagnostic included), on either engine. /plan
shows the URL as `redis://:***@HOST:PORT/DB` (the admin API has no authentication).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from fleet_kit import Sidecar
from redis_kit import RedisServer

from riprap_testing.faults import FaultServer
from sidecar.engines.envoy.process import EnvoyNotFound, find_envoy

pytestmark = pytest.mark.slow

SECRET = "s3cret-Pa55word"  # conftest.LOCKED_PASSWORD


@pytest.fixture
def locked(locked_redis: RedisServer) -> RedisServer:
    """A redis-server that asks for SECRET."""
    assert locked_redis.password == SECRET
    return locked_redis


@pytest.mark.parametrize("engine", ["python", "envoy"])
def test_the_store_password_is_redacted_everywhere(
        engine: str, tmp_path: Path, locked: RedisServer, upstream: FaultServer) -> None:
    if engine == "envoy":
        try:
            find_envoy()
        except EnvoyNotFound as exc:
            pytest.skip(str(exc))
    assert SECRET in locked.url
    policy = tmp_path / "locked.riprap"
    text = f"""\
app locked
store {locked.url}

service api {{
    endpoint {upstream.url}
    timeout 2s
    limit 50/s burst 5 shared
}}
"""
    policy.write_text(text)
    car = Sidecar(policy, args=["--engine", engine, "--log-level", "debug"])
    car.start(60)
    try:
        with httpx.Client(trust_env=False, timeout=5) as client:
            assert client.get(car.url + "/api/echo").status_code == 200
        redacted = f"redis://:***@127.0.0.1:{locked.port}/0"
        plan = car.admin.get("/plan").json()
        assert plan["plan"]["store"] == redacted
        state = car.state()
        assert state["store"]["url"] == redacted and state["store"]["up"] is True
        # a reload, and the store going down and back, each log a line about the store
        policy.write_text(text.replace("burst 5", "burst 6"))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and car.admin.get("/plan").json()["hash"] == plan["hash"]:
            time.sleep(0.1)
        assert car.admin.get("/plan").json()["plan"]["services"]["api"]["limit"]["burst"] == 6
        locked.kill()
        with httpx.Client(trust_env=False, timeout=5) as client:
            client.get(car.url + "/api/echo")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and car.state()["store"]["up"]:
            time.sleep(0.1)
        assert car.state()["store"]["up"] is False
        locked.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not car.state()["store"]["up"]:
            time.sleep(0.1)
        # a reload that fails on the store line: its diagnostic (logged, and at /plan) shows
        # the line with the password masked
        policy.write_text(text.replace(f"store {locked.url}", f"store {locked.url} oops"))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not car.admin.get("/plan").json()["last_error"]:
            time.sleep(0.1)
        assert car.admin.get("/plan").json()["last_error"], car.logs()
        for path in ("/plan", "/state", "/metrics", "/dashboard.json"):
            body = car.admin.get(path).text
            assert SECRET not in body, (path, body)
    finally:
        car.stop()
    logs = car.logs()
    assert "is down" in logs and redacted in logs, logs
    assert f"store redis://:{'*' * len(SECRET)}@127.0.0.1:{locked.port}/0 oops" in logs, logs
    assert SECRET not in logs, logs
