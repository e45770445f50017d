"""The compiled Envoy configuration, run by real Envoy in front of real upstreams on 127.0.0.1:
routing, unknown services, retries with x-riprap-attempts, static fallbacks, failover,
shards, deadlines and limits behave as the contract says."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from envoy_harness import RunningEnvoy, compile_text
from policies.sharding import shard_for
from riprap_testing.faults import FaultServer

pytestmark = pytest.mark.slow


@pytest.fixture
def upstreams() -> Iterator[list[FaultServer]]:
    servers = [FaultServer(name=f"u{i}").start() for i in range(5)]
    yield servers
    for s in servers:
        s.stop()


def _raw(port: int, target: str, host: str) -> str:
    """One request with the target exactly as given (httpx would remove dot segments)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode("latin-1").lower().replace("http/1.1", "HTTP/1.1", 1)


def _seen(server: FaultServer) -> dict[str, object]:
    recent = server.recent
    assert recent, f"{server.name} saw no request"
    return recent[-1]


def test_routing_by_host_prefix_and_unknown_service(tmp_path: Path, upstreams: list[FaultServer]) -> None:
    a, b = upstreams[0], upstreams[1]
    plan = compile_text(tmp_path, f"""
service alpha {{
    host alpha.internal, a.example
    endpoint {a.url}
}}
service beta {{
    endpoint {b.url}
}}
""")
    with RunningEnvoy(tmp_path, plan) as env:
        r = env.client.get("/x/y?q=1", headers={"Host": "alpha.internal:8080"})
        assert r.status_code == 200 and r.json()["server"] == "u0"
        assert r.headers["x-riprap-attempts"] == "1"
        assert env.client.get("/", headers={"Host": "A.Example"}).json()["server"] == "u0"
        r = env.client.get("/beta/items/7?x=%2F", headers={"Host": "127.0.0.1"})
        assert r.status_code == 200 and r.json()["server"] == "u1"
        assert _seen(b)["target"] == "/items/7?x=%2F"
        r = env.client.get("/beta", headers={"Host": "127.0.0.1"})
        assert r.status_code == 200 and _seen(b)["target"] == "/"
        r = env.client.get("/nowhere/x", headers={"Host": "stranger.example"})
        assert r.status_code == 404
        assert r.headers["x-riprap-reason"] == "unknown-service"
        assert r.headers["content-type"] == "application/json"
        assert json.loads(r.text)["services"] == ["alpha", "beta"]


def test_retry_on_503_counts_attempts(tmp_path: Path, upstreams: list[FaultServer]) -> None:
    a, b = upstreams[0], upstreams[1]
    a.set(fail_next=1, error_status=503)
    b.set(fail_next=1, error_status=503)
    plan = compile_text(tmp_path, f"""
service pay {{
    endpoint {a.url}
    endpoint {b.url}
    balance round-robin
    retry 3 on 503 backoff 5ms..10ms
}}
""")
    with RunningEnvoy(tmp_path, plan) as env:
        r = env.client.get("/charge", headers={"Host": "pay"})
        assert r.status_code == 200
        assert r.headers["x-riprap-attempts"] == "3"
        assert a.hits + b.hits == 3
        # a non-idempotent call is not retried on a status
        a.set(fail_next=5, error_status=503)
        b.set(fail_next=5, error_status=503)
        before = a.hits + b.hits
        r = env.client.post("/charge", headers={"Host": "pay"}, content=b"{}")
        assert r.status_code == 503 and r.headers["x-riprap-attempts"] == "1"
        assert a.hits + b.hits == before + 1


def test_static_fallback_and_reasons(tmp_path: Path, upstreams: list[FaultServer]) -> None:
    a = upstreams[0]
    a.set(error_rate=1.0, error_status=500)
    plan = compile_text(tmp_path, f"""
service recs {{
    endpoint {a.url}
    fallback status 200 json {{"items": []}}
}}
service dead {{
    endpoint http://127.0.0.1:9
    timeout 1s
}}
""")
    with RunningEnvoy(tmp_path, plan) as env:
        r = env.client.get("/list", headers={"Host": "recs"})
        assert r.status_code == 200
        assert r.json() == {"items": []}
        assert r.headers["content-type"] == "application/json"
        assert r.headers["x-riprap-fallback"] == "static"
        assert r.headers["x-riprap-reason"] == "upstream-5xx"
        assert r.headers["x-riprap-attempts"] == "1"
        r = env.client.get("/x", headers={"Host": "dead"})
        assert r.status_code == 502
        assert r.headers["x-riprap-reason"] == "upstream-failed"
        assert r.json()["service"] == "dead"


def test_failover_to_tier_one(tmp_path: Path, upstreams: list[FaultServer]) -> None:
    primary, backup = upstreams[0], upstreams[1]
    plan = compile_text(tmp_path, f"""
service pay {{
    endpoint {primary.url}
    failover {backup.url}
    health GET /healthz every 200ms timeout 100ms fall 1 rise 1
}}
""")
    with RunningEnvoy(tmp_path, plan) as env:
        for _ in range(20):  # tier 0 healthy: no call spills to tier 1
            assert env.client.get("/", headers={"Host": "pay"}).json()["server"] == "u0"
        primary.set(mode="refuse")
        env.wait_stat("cluster.pay.health_check.failure", 1)
        r = env.client.get("/", headers={"Host": "pay"})
        assert r.status_code == 200 and r.json()["server"] == "u1"


def test_shard_pick_matches_python_engine(tmp_path: Path, upstreams: list[FaultServer]) -> None:
    names = ["a", "b", "c"]
    servers = dict(zip(names, upstreams[:3], strict=True))
    shards = "\n".join(f"    shard {n} {{ endpoint {s.url} }}" for n, s in servers.items())
    plan = compile_text(tmp_path, f"""
service inv {{
    shard by header X-Sku
{shards}
}}
""")
    with RunningEnvoy(tmp_path, plan) as env:
        for i in range(30):
            key = f"sku-{i}"
            r = env.client.get("/item", headers={"Host": "inv", "X-Sku": key, "x-riprap-shard": "a"})
            assert r.status_code == 200
            assert r.json()["server"] == servers[shard_for(key, names)].name
        r = env.client.get("/item", headers={"Host": "inv"})
        assert r.status_code == 400 and r.headers["x-riprap-reason"] == "no-shard-key"
        assert r.headers["x-riprap-attempts"] == "0"


def test_deadline_sent_and_honoured(tmp_path: Path, upstreams: list[FaultServer]) -> None:
    a = upstreams[0]
    plan = compile_text(tmp_path, f"""
service slow {{
    timeout 2s
    endpoint {a.url}
}}
""")
    with RunningEnvoy(tmp_path, plan) as env:
        env.client.get("/", headers={"Host": "slow"})
        headers = {k.lower(): v for k, v in _seen(a)["headers"]}  # type: ignore[union-attr]
        assert 1500 <= int(headers["x-riprap-deadline-ms"]) <= 2000
        # read from Envoy's expected timeout, which itself is not forwarded (section 9)
        assert "x-envoy-expected-rq-timeout-ms" not in headers
        a.set(delay=1.0)
        r = env.client.get("/", headers={"Host": "slow", "x-riprap-deadline-ms": "200"})
        assert r.status_code == 504 and r.headers["x-riprap-reason"] == "timeout"


def test_limit_answers_429(tmp_path: Path, upstreams: list[FaultServer]) -> None:
    a = upstreams[0]
    plan = compile_text(tmp_path, f"""
service api {{
    endpoint {a.url}
    limit 1/m burst 2
}}
service keyed {{
    endpoint {a.url}
    limit 1/m burst 1 per header X-User
}}
""")
    with RunningEnvoy(tmp_path, plan) as env:
        codes = [env.client.get("/", headers={"Host": "api"}).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = env.client.get("/", headers={"Host": "api"})
        assert r.headers["x-riprap-reason"] == "rate-limited" and r.headers["retry-after"] == "60"
        assert env.client.get("/", headers={"Host": "keyed", "X-User": "u1"}).status_code == 200
        assert env.client.get("/", headers={"Host": "keyed", "X-User": "u1"}).status_code == 429
        assert env.client.get("/", headers={"Host": "keyed", "X-User": "u2"}).status_code == 200


def test_stale_then_service_then_static_fallbacks(tmp_path: Path, upstreams: list[FaultServer]) -> None:
    main, other = upstreams[0], upstreams[1]
    plan = compile_text(tmp_path, f"""
service recs {{
    endpoint {main.url}
    fallback stale 1m
    fallback service trending
    fallback status 200 text "static"
}}
service trending {{
    endpoint {other.url}
}}
""")
    with RunningEnvoy(tmp_path, plan) as env:
        good = env.client.get("/list?u=1", headers={"Host": "recs"})
        assert good.status_code == 200 and good.json()["server"] == "u0"
        main.set(error_rate=1.0, error_status=503)
        r = env.client.get("/list?u=1", headers={"Host": "recs"})  # the copy of the good answer
        assert r.status_code == 200 and r.json() == good.json()
        assert r.headers["x-riprap-fallback"] == "stale"
        assert r.headers["x-riprap-reason"] == "upstream-5xx"
        r = env.client.get("/list?u=2", headers={"Host": "recs"})  # no copy: the other service
        assert r.status_code == 200 and r.json()["server"] == "u1"
        assert r.headers["x-riprap-fallback"] == "service"
        assert r.headers["x-riprap-attempts"] == "2"
        assert _seen(other)["target"] == "/list?u=2"
        r = env.client.post("/list", headers={"Host": "recs"}, content=b'{"a": 1}')
        assert r.status_code == 200 and r.headers["x-riprap-fallback"] == "service"
        other.set(mode="refuse")
        r = env.client.get("/list?u=3", headers={"Host": "recs"})  # both failed: the static answer
        assert r.status_code == 200 and r.text == "static"
        assert r.headers["x-riprap-fallback"] == "static"
        # answers a shared cache may not keep are never served stale
        main.recover()
        assert env.client.get("/p", headers={"Host": "recs", "Cookie": "a=1"}).status_code == 200
        main.set(error_rate=1.0, error_status=503)
        r = env.client.get("/p", headers={"Host": "recs", "Cookie": "a=1"})
        assert r.headers["x-riprap-fallback"] == "static"


def test_hedge_after_delay_wins_on_the_other_endpoint(tmp_path: Path, upstreams: list[FaultServer]) -> None:
    slow, fast = upstreams[0], upstreams[1]
    slow.set(delay=2.0)
    plan = compile_text(tmp_path, f"""
service recs {{
    timeout 3s
    endpoint {slow.url}
    endpoint {fast.url}
    balance round-robin
    hedge after 100ms
}}
""")
    with RunningEnvoy(tmp_path, plan) as env:
        for _ in range(4):  # round-robin: some calls start on the slow endpoint
            r = env.client.get("/", headers={"Host": "recs"})
            assert r.status_code == 200 and r.json()["server"] == "u1"
            assert r.elapsed.total_seconds() < 1.5
        assert slow.hits >= 1
        assert env.stats()["cluster.recs.upstream_rq_total"] >= 5


def test_retry_after_is_honoured(tmp_path: Path, upstreams: list[FaultServer]) -> None:
    a = upstreams[0]
    a.set(fail_next=1, error_status=503, retry_after="1")
    plan = compile_text(tmp_path, f"""
service api {{
    timeout 5s
    endpoint {a.url}
    retry 2 on 503 backoff 5ms..10ms
}}
""")
    with RunningEnvoy(tmp_path, plan) as env:
        r = env.client.get("/", headers={"Host": "api"})
        assert r.status_code == 200 and r.headers["x-riprap-attempts"] == "2"
        assert r.elapsed.total_seconds() >= 0.9  # waited for Retry-After, not the 5 ms backoff


def test_breaker_opens_fails_fast_and_closes_after_a_probe(tmp_path: Path, upstreams: list[FaultServer]) -> None:
    a, b = upstreams[0], upstreams[1]
    a.set(error_rate=1.0, error_status=500)
    b.set(error_rate=1.0, error_status=500)
    plan = compile_text(tmp_path, f"""
service pay {{
    endpoint {a.url}
    breaker failures 3 open 1s probes 1
}}
service recs {{
    endpoint {b.url}
    breaker failures 2 open 30s
    fallback status 200 text "later"
}}
""")
    with RunningEnvoy(tmp_path, plan) as env:
        assert [env.client.get("/", headers={"Host": "pay"}).status_code for _ in range(3)] == [500] * 3
        r = env.client.get("/", headers={"Host": "pay"})
        assert r.status_code == 503 and r.headers["x-riprap-reason"] == "breaker-open"
        assert r.headers["x-riprap-attempts"] == "0" and r.json()["service"] == "pay"
        assert a.hits == 3
        state = env.client.get("/breakers", headers={"Host": "_riprap"}).json()
        assert state["pay"]["state"] == "open" and state["pay"]["opened"] == 1
        a.recover()
        time.sleep(1.1)
        assert env.client.get("/", headers={"Host": "pay"}).status_code == 200  # the probe
        assert env.client.get("/breakers", headers={"Host": "_riprap"}).json()["pay"]["state"] == "closed"
        for _ in range(2):
            assert env.client.get("/", headers={"Host": "recs"}).headers["x-riprap-reason"] == "upstream-5xx"
        r = env.client.get("/", headers={"Host": "recs"})
        assert r.status_code == 200 and r.text == "later"
        assert r.headers["x-riprap-fallback"] == "static" and r.headers["x-riprap-reason"] == "breaker-open"
        assert b.hits == 2


def test_hedge_at_percentile_follows_observed_latency(tmp_path: Path, upstreams: list[FaultServer]) -> None:
    a, b = upstreams[0], upstreams[1]
    plan = compile_text(tmp_path, f"""
service recs {{
    timeout 3s
    endpoint {a.url}
    endpoint {b.url}
    balance round-robin
    hedge at p50 min 10ms
}}
""")
    with RunningEnvoy(tmp_path, plan) as env:
        a.set(delay=0.06)  # below the 100 ms used until 20 calls were seen: no hedge yet
        first = [env.client.get("/", headers={"Host": "recs"}).json()["server"] for _ in range(4)]
        assert first.count("u0") == 2
        a.set(delay=0.0)
        for _ in range(24):  # fast calls: p50 is a few ms, so the hedge delay drops to 10 ms
            env.client.get("/", headers={"Host": "recs"})
        a.set(delay=0.06)
        later = [env.client.get("/", headers={"Host": "recs"}).json()["server"] for _ in range(4)]
        assert later == ["u1"] * 4  # a call that starts on the slow endpoint is won by its hedge


def test_paths_are_forwarded_as_sent_but_never_climb(tmp_path: Path, upstreams: list[FaultServer]) -> None:
    a = upstreams[0]
    plan = compile_text(tmp_path, f"""
service files {{
    endpoint {a.url}/base
}}
""")
    with RunningEnvoy(tmp_path, plan) as env:
        port = env.ports.listen_port
        head = _raw(port, "/files/a/./b/../c%2Fd?x=1&y=%20", "localhost")
        assert head.startswith("HTTP/1.1 200") and _seen(a)["target"] == "/base/a/./b/../c%2Fd?x=1&y=%20"
        head = _raw(port, "/files/a/../../etc", "localhost")
        assert head.startswith("HTTP/1.1 400") and "x-riprap-reason: bad-request" in head
        assert _raw(port, "/x/../../y", "files").startswith("HTTP/1.1 400")


def test_concurrency_cap_answers_overloaded(tmp_path: Path, upstreams: list[FaultServer]) -> None:
    a = upstreams[0]
    a.set(delay=0.5)
    plan = compile_text(tmp_path, f"""
service pay {{
    timeout 3s
    endpoint {a.url}
    concurrency 1
}}
""")
    with RunningEnvoy(tmp_path, plan) as env:
        results: list[int] = []
        reasons: list[str | None] = []

        def call() -> None:
            r = env.client.get("/", headers={"Host": "pay"})
            results.append(r.status_code)
            reasons.append(r.headers.get("x-riprap-reason"))

        first = threading.Thread(target=call)
        first.start()
        deadline = time.monotonic() + 5
        while a.in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        call()  # the slot is taken: 503 at once
        first.join()
        assert sorted(results) == [200, 503]
        assert "overloaded" in reasons


def test_concurrency_queue_waits_then_overflows(tmp_path: Path, upstreams: list[FaultServer]) -> None:
    a = upstreams[0]
    a.set(delay=0.4)
    plan = compile_text(tmp_path, f"""
service pay {{
    timeout 5s
    endpoint {a.url}
    concurrency 1 queue 1
}}
""")
    with RunningEnvoy(tmp_path, plan) as env:
        env.client.get("/", headers={"Host": "pay"})  # one warm connection
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(
            env.client.get("/", headers={"Host": "pay"}).status_code)) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert results.count(200) >= 2 and 503 in results


def test_connect_is_refused_with_a_reason(tmp_path: Path, upstreams: list[FaultServer]) -> None:
    plan = compile_text(tmp_path, f"""
service pay {{
    endpoint {upstreams[0].url}
}}
""")
    with RunningEnvoy(tmp_path, plan) as env:
        for target, status, reason in (("pay:443", "405", "connect-unsupported"),
                                       ("stranger.example:443", "403", "unknown-service")):
            with socket.create_connection(("127.0.0.1", env.ports.listen_port), timeout=5) as sock:
                sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
                head = sock.recv(65536).decode("latin-1").lower()
            assert head.startswith(f"http/1.1 {status}") and f"x-riprap-reason: {reason}" in head
        assert upstreams[0].hits == 0


def test_services_and_shards_named_like_yaml_booleans_stay_names(
        tmp_path: Path, upstreams: list[FaultServer]) -> None:
    # `y` and `n` are names to riprap; Envoy's YAML reader would take them bare as true/false
    # and reject the clusters and routes (while `envoy --mode validate` says OK)
    a, b, c = upstreams[0], upstreams[1], upstreams[2]
    plan = compile_text(tmp_path, f"""
service n {{
    endpoint {a.url}
}}
service Y {{
    shard by header X-Key
    shard y {{
        endpoint {b.url}
    }}
    shard N {{
        endpoint {c.url}
    }}
}}
""")
    with RunningEnvoy(tmp_path, plan) as env:
        r = env.client.get("/n/x", headers={"Host": "127.0.0.1"})
        assert r.status_code == 200 and r.json()["server"] == "u0", r.text
        for key in ("k1", "k2", "k3", "k4", "k5", "k6"):
            want = {"y": "u1", "N": "u2"}[shard_for(key, ["y", "N"])]
            r = env.client.get("/x", headers={"Host": "Y", "X-Key": key})
            assert r.status_code == 200 and r.json()["server"] == want, (key, r.text)
        stats = env.stats()
        assert stats.get("cluster_manager.cds.update_rejected", 0) == 0, stats
