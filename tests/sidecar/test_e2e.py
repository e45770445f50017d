"""End to end through a real `riprap run` subprocess: section 9's behaviours and every
policy statement of sections 4-5, each against real upstreams on loopback sockets.

One sidecar serves the whole module (one policy file with one service per behaviour,
each with its own fault server, so tests do not disturb each other); a second one runs
the same file with `--chaos`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from dsl.loader import load_plan_source
from riprap_testing.faults import FaultServer

pytestmark = pytest.mark.slow

POLICY = """\
app e2e

service api {
    host api.internal, API.Example
    timeout 5s
    endpoint {ok}
}

service retrying {
    endpoint {retry}
    retry 2 on 503 backoff 10ms
}

service bounded {
    endpoint {bounded}
    retry 1 on 503 backoff 5ms
}

service breaking {
    endpoint {brk}
    breaker failures 3 open 30s
}

service failing-over {
    endpoint {dead}
    failover {fo}
    outlier failures 1 eject 30s max 100%
    retry 1 on connect-failure
}

service health-over {
    endpoint {hdown}
    failover {hfo}
    health GET /healthz every 100ms timeout 200ms fall 1 rise 1
}

service sharded {
    shard by header X-Sku
    shard a {
        endpoint {sa}
    }
    shard b {
        endpoint {sb}
    }
}

service limited {
    endpoint {ok}
    limit 3/m burst 3
}

service capped {
    endpoint {ok}
    concurrency 1
}

service hedged {
    endpoint {hslow}
    endpoint {hfast}
    balance round-robin
    hedge after 50ms
}

service fb-static {
    endpoint {dead}
    fallback status 503 json {"error": "payments down", "retry": true}
}

service fb-file {
    endpoint {dead}
    fallback status 200 file "fallback.json"
}

service fb-stale {
    endpoint {stale}
    fallback stale 5m
}

service fb-service {
    endpoint {dead}
    fallback service api
}

service broken {
    endpoint {dead}
}

service slow {
    timeout 300ms
    endpoint {hang}
}

service waits {
    timeout 20s
    endpoint {hang}
}

service chaotic {
    endpoint {ok}
    chaos abort 100% status 418
}
"""

NAMES = ("ok", "retry", "bounded", "brk", "dead", "fo", "hdown", "hfo", "sa", "sb",
         "hslow", "hfast", "stale", "hang")


@pytest.fixture(scope="module")
def ups(upstreams: Any) -> dict[str, FaultServer]:
    servers = {name: upstreams(name) for name in NAMES}
    servers["dead"].set(mode="refuse")
    servers["hdown"].set(error_rate=1.0)
    servers["hang"].set(mode="hang")
    servers["hslow"].set(delay=2.0)
    return servers


@pytest.fixture(scope="module")
def policy(module_tmp: Path, ups: dict[str, FaultServer]) -> Path:
    text = POLICY
    for name, server in ups.items():
        text = text.replace("{" + name + "}", server.url)
    (module_tmp / "fallback.json").write_text('{"items": [], "cached": true}')
    path = module_tmp / "e2e.riprap"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def sc(policy: Path, sidecar_proc: Any) -> Iterator[Any]:
    proc = sidecar_proc(policy, "--grace", "0.1").start()
    yield proc
    assert proc.stop() == 0, proc.logs()


def seen_headers(server: FaultServer) -> dict[str, str]:
    return {k.lower(): v for k, v in server.recent[-1]["headers"]}


# -- routing (section 9) ------------------------------------------------------------------

@pytest.mark.parametrize("host", ["api.internal", "API.EXAMPLE:8080", "api"])
def test_routes_by_host_header_port_ignored(sc: Any, ups: dict[str, FaultServer], host: str) -> None:
    r = sc.client.get("/items/1?q=2", headers={"host": host})
    assert r.status_code == 200, r.text
    assert r.json()["server"] == "ok" and r.json()["target"] == "/items/1?q=2"
    assert r.headers["x-riprap-attempts"] == "1"


def test_routes_by_path_prefix_with_the_prefix_removed(sc: Any) -> None:
    r = sc.client.get("/api/items/7?x=%2F")
    assert r.status_code == 200 and r.json()["target"] == "/items/7?x=%2F"


def test_routes_absolute_form_like_http_proxy(sc: Any) -> None:
    with httpx.Client(proxy=sc.url, trust_env=False, timeout=10) as c:
        r = c.get("http://api.internal/from-proxy")
    assert r.status_code == 200 and r.json()["target"] == "/from-proxy"


def test_unknown_host_through_the_proxy_is_403(sc: Any) -> None:
    with httpx.Client(proxy=sc.url, trust_env=False, timeout=10) as c:
        r = c.get("http://evil.example/api/x")
    assert r.status_code == 403
    assert r.headers["x-riprap-reason"] == "unknown-service"
    assert "api" in r.json()["services"] and "evil.example" in r.json()["error"]


def test_unknown_service_is_404_naming_the_known_ones(sc: Any) -> None:
    r = sc.client.get("/nope/x")
    assert r.status_code == 404
    assert r.headers["x-riprap-reason"] == "unknown-service"
    assert set(r.json()["services"]) >= {"api", "retrying", "sharded"}


def test_connect_is_refused_and_the_connection_closed(sc: Any) -> None:
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        s.sendall(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 403")
    assert b"x-riprap-reason: unknown-service" in data


# -- HTTP hygiene -----------------------------------------------------------------------

def test_hop_by_hop_headers_are_dropped_both_ways(sc: Any, ups: dict[str, FaultServer]) -> None:
    r = sc.client.get("/api/h?hdr=Keep-Alive:timeout%3D9&hdr=X-Kept:1&hdr=Connection:X-Gone"
                      "&hdr=X-Gone:1",
                      headers={"Connection": "keep-alive, X-Secret", "X-Secret": "s",
                               "Keep-Alive": "timeout=5", "Proxy-Authorization": "Basic eA==",
                               "TE": "trailers", "X-Kept": "k"})
    assert r.status_code == 200
    up = seen_headers(ups["ok"])
    for gone in ("x-secret", "keep-alive", "proxy-authorization", "te"):
        assert gone not in up
    assert up["x-kept"] == "k"
    assert up["host"] == f"127.0.0.1:{ups['ok'].port}"
    assert "x-gone" not in r.headers and "keep-alive" not in r.headers
    assert r.headers["x-kept"] == "1"


def test_request_and_response_bodies_stream_both_ways(sc: Any) -> None:
    body = bytes(range(256)) * 8192  # 2 MiB

    def gen() -> Iterator[bytes]:
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    r = sc.client.post("/api/echo", content=gen())
    assert r.status_code == 200 and r.content == body


def test_sse_passes_through_unbuffered(sc: Any) -> None:
    arrivals: list[float] = []
    t0 = time.monotonic()
    with sc.client.stream("GET", "/api/sse?n=4&interval=0.25") as r:
        assert r.headers["content-type"] == "text/event-stream"
        for chunk in r.iter_raw():
            if chunk:
                arrivals.append(time.monotonic() - t0)
    assert len(arrivals) >= 4
    assert arrivals[0] < 0.2, arrivals  # the first event is not held back
    assert arrivals[-1] - arrivals[0] >= 0.6, arrivals


def test_chunked_answer_passes_through(sc: Any) -> None:
    r = sc.client.get("/api/chunked?n=5&interval=0&size=1000")
    assert r.status_code == 200 and len(r.content) == 5000


def test_client_disconnect_cancels_the_upstream_call(sc: Any, ups: dict[str, FaultServer],
                                                     until: Any) -> None:
    before = ups["hang"].disconnects
    with httpx.Client(base_url=sc.url, trust_env=False, timeout=0.3) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.get("/waits/hold")
    until(lambda: ups["hang"].disconnects > before, what="the upstream call to be cancelled")
    until(lambda: sc.metric("riprap_in_flight") == 0, what="no call in flight")


def test_body_over_the_bound_is_streamed_once_not_retried(sc: Any, ups: dict[str, FaultServer]) -> None:
    server = ups["bounded"]
    server.set(fail_next=1)
    small = sc.client.put("/bounded/small", content=b"x" * 1000)
    assert small.status_code == 200 and small.headers["x-riprap-attempts"] == "2"
    assert small.json()["body_bytes"] == 1000
    server.set(fail_next=1)
    big = sc.client.put("/bounded/big", content=b"x" * (2 * 1024 * 1024))
    assert big.status_code == 503 and big.headers["x-riprap-attempts"] == "1"
    assert "x-riprap-reason" not in big.headers  # the upstream's own 5xx, passed on


def test_deadline_header_is_sent_upstream_and_caps_the_timeout(sc: Any, ups: dict[str, FaultServer]) -> None:
    sc.client.get("/api/d")
    sent = int(seen_headers(ups["ok"])["x-riprap-deadline-ms"])
    assert 4000 < sent <= 5000
    sc.client.get("/api/d", headers={"x-riprap-deadline-ms": "800"})
    sent = int(seen_headers(ups["ok"])["x-riprap-deadline-ms"])
    assert 0 < sent <= 800
    t = time.monotonic()
    r = sc.client.get("/api/slow?delay=1", headers={"x-riprap-deadline-ms": "150"})
    assert r.status_code == 504 and r.headers["x-riprap-reason"] == "timeout"
    assert time.monotonic() - t < 0.9


# -- policy statements (sections 4-5) -------------------------------------------------------

def test_timeout_answers_504(sc: Any) -> None:
    t = time.monotonic()
    r = sc.client.get("/slow/x")
    assert r.status_code == 504 and r.headers["x-riprap-reason"] == "timeout"
    assert 0.25 < time.monotonic() - t < 1.5


def test_unreachable_upstream_answers_502_upstream_failed(sc: Any) -> None:
    r = sc.client.get("/broken/x")
    assert r.status_code == 502 and r.headers["x-riprap-reason"] == "upstream-failed"
    assert int(r.headers["x-riprap-attempts"]) >= 1


def test_retry_until_success_and_5xx_passed_through_after_retries(sc: Any, ups: dict[str, FaultServer]) -> None:
    server = ups["retry"]
    server.set(fail_next=2)
    r = sc.client.get("/retrying/r")
    assert r.status_code == 200 and r.headers["x-riprap-attempts"] == "3"
    server.set(fail_next=3)
    r = sc.client.get("/retrying/r")
    assert r.status_code == 503 and r.headers["x-riprap-attempts"] == "3"
    assert r.json()["server"] == "retry"  # the upstream's own answer
    server.set(fail_next=1)
    r = sc.client.post("/retrying/r", content=b"{}")  # not idempotent: no retry
    assert r.status_code == 503 and r.headers["x-riprap-attempts"] == "1"
    server.set(fail_next=0)
    assert sc.metric("riprap_retries_total", service="retrying") >= 4


def test_breaker_opens_after_consecutive_failures(sc: Any, ups: dict[str, FaultServer]) -> None:
    server = ups["brk"]
    server.set(error_rate=1.0)
    codes = [sc.client.get("/breaking/b").status_code for _ in range(3)]
    assert codes == [503, 503, 503]
    hits = server.hits
    r = sc.client.get("/breaking/b")
    assert r.status_code == 503 and r.headers["x-riprap-reason"] == "breaker-open"
    assert r.headers["x-riprap-attempts"] == "0"
    assert server.hits == hits  # failed fast: nothing sent
    state = json.dumps(sc.admin.get("/state").json()["services"]["breaking"])
    assert "open" in state
    assert sc.metric("riprap_breaker_state", service="breaking") == 2


def test_failover_tier_takes_over_when_the_primary_is_ejected(sc: Any, ups: dict[str, FaultServer]) -> None:
    r = sc.client.get("/failing-over/f")
    assert r.status_code == 200 and r.json()["server"] == "fo"
    assert r.headers["x-riprap-attempts"] == "2"
    r = sc.client.get("/failing-over/f")
    assert r.json()["server"] == "fo" and r.headers["x-riprap-attempts"] == "1"
    assert sc.metric("riprap_ejections_total", service="failing-over") >= 1


def test_failover_when_health_checks_mark_the_primary_down(sc: Any, until: Any) -> None:
    def primary_down() -> bool:
        eps = sc.admin.get("/state").json()["services"]["health-over"]["endpoints"]
        return any(e["tier"] == 0 and e["healthy"] is False for e in eps)

    until(primary_down, timeout=5, what="the health check to mark the primary down")
    r = sc.client.get("/health-over/h")
    assert r.status_code == 200 and r.json()["server"] == "hfo"
    assert r.headers["x-riprap-attempts"] == "1"


def test_sharding_is_sticky_per_key_and_spreads_keys(sc: Any) -> None:
    owner = {}
    for key in [f"sku-{i}" for i in range(16)]:
        first = sc.client.get("/sharded/s", headers={"X-Sku": key}).json()["server"]
        again = sc.client.get("/sharded/s", headers={"X-Sku": key}).json()["server"]
        assert first == again
        owner[key] = first
    assert set(owner.values()) == {"sa", "sb"}
    r = sc.client.get("/sharded/s")  # no key, no default shard
    assert r.status_code == 400 and "x-riprap-reason" in r.headers


def test_limit_answers_429_with_retry_after(sc: Any) -> None:
    codes = [sc.client.get("/limited/l") for _ in range(4)]
    assert [r.status_code for r in codes[:3]] == [200, 200, 200]
    assert codes[3].status_code == 429
    assert codes[3].headers["x-riprap-reason"] == "rate-limited"
    assert int(codes[3].headers["retry-after"]) >= 1
    assert sc.metric("riprap_rejections_total", service="limited", by="limit") >= 1


def test_concurrency_cap_answers_503_overloaded(sc: Any) -> None:
    results: list[int] = []
    holder = threading.Thread(target=lambda: results.append(
        sc.client.get("/capped/c?delay=0.8").status_code))
    holder.start()
    time.sleep(0.3)
    r = sc.client.get("/capped/c")
    holder.join()
    assert results == [200]
    assert r.status_code == 503 and r.headers["x-riprap-reason"] == "overloaded"


def test_hedge_wins_over_a_slow_endpoint(sc: Any) -> None:
    answers = []
    for _ in range(4):
        t = time.monotonic()
        r = sc.client.get("/hedged/h")
        answers.append((r.json()["server"], r.headers["x-riprap-attempts"], time.monotonic() - t))
    assert all(server == "hfast" and took < 1.0 for server, _, took in answers), answers
    assert any(attempts == "2" for _, attempts, _ in answers), answers
    assert sc.metric("riprap_hedges_total", service="hedged") >= 1


def test_static_fallback_json(sc: Any) -> None:
    r = sc.client.get("/fb-static/x")
    assert r.status_code == 503 and r.headers["x-riprap-fallback"] == "static"
    assert r.json() == {"error": "payments down", "retry": True}
    assert sc.metric("riprap_fallbacks_total", service="fb-static", kind="static") >= 1


def test_static_fallback_file_relative_to_the_policy(sc: Any) -> None:
    r = sc.client.get("/fb-file/x")
    assert r.status_code == 200 and r.headers["x-riprap-fallback"] == "static"
    assert r.json() == {"items": [], "cached": True}


def test_stale_fallback_answers_the_last_good_response(sc: Any, ups: dict[str, FaultServer]) -> None:
    good = sc.client.get("/fb-stale/item?id=1")
    assert good.status_code == 200 and "x-riprap-fallback" not in good.headers
    ups["stale"].set(mode="refuse")
    try:
        r = sc.client.get("/fb-stale/item?id=1")
    finally:
        ups["stale"].recover()
    assert r.status_code == 200 and r.headers["x-riprap-fallback"] == "stale"
    assert r.json()["hit"] == good.json()["hit"]


def test_service_fallback_resends_to_another_service(sc: Any) -> None:
    r = sc.client.get("/fb-service/x")
    assert r.status_code == 200 and r.headers["x-riprap-fallback"] == "service"
    assert r.json()["server"] == "ok"


def test_chaos_is_off_without_the_flag(sc: Any) -> None:
    assert sc.client.get("/chaotic/c").status_code == 200


def test_chaos_is_on_with_the_flag_and_the_access_log_has_one_line_per_call(
        policy: Path, sidecar_proc: Any, ups: dict[str, FaultServer]) -> None:
    proc = sidecar_proc(policy, "--chaos", "--access-log", "--grace", "0").start()
    try:
        assert proc.client.get("/chaotic/c").status_code == 418
        assert proc.client.get("/api/c").status_code == 200
        ups["retry"].set(fail_next=1)
        assert proc.client.get("/retrying/r").status_code == 200
        assert proc.client.get("/nope/x").status_code == 404
    finally:
        assert proc.stop() == 0
    lines = [json.loads(line) for line in proc.out_path.read_text().splitlines()
             if line.startswith("{")]
    assert [(x["service"], x["status"]) for x in lines] == [
        ("chaotic", 418), ("api", 200), ("retrying", 200), ("_unknown", 404)]
    api, retried = lines[1], lines[2]
    assert api["endpoint"] == ups["ok"].url and api["attempts"] == 1 and api["outcome"] == "ok"
    assert retried["attempts"] == 2 and retried["endpoint"] == ups["retry"].url
    assert all(isinstance(x["duration_ms"], float) for x in lines)
    assert lines[3]["outcome"] == "unknown-service"


# -- admin -----------------------------------------------------------------------------------

def test_admin_endpoints(sc: Any, policy: Path) -> None:
    assert sc.admin.get("/healthz").status_code == 200
    assert sc.admin.get("/readyz").status_code == 200
    doc = sc.plan()
    unit = load_plan_source(str(policy))
    assert unit.plan is not None
    assert doc["hash"] == unit.plan.digest()
    assert doc["last_error"] is None and "T" in doc["loaded_at"]
    assert set(doc["plan"]["services"]) == set(unit.plan.services)
    state = sc.admin.get("/state").json()
    assert "api" in state["services"] and "sharded" in state["services"]
    assert state["listeners"] == {"proxy": sc.url, "admin": sc.admin_url}
    text = sc.metrics()
    for name in ("riprap_calls_total", "riprap_attempts_total", "riprap_plan_info",
                 "riprap_upstream_latency_seconds_bucket", "riprap_reloads_total"):
        assert name in text, name
    assert sc.metric("riprap_plan_info", hash=unit.plan.digest()) == 1
    assert sc.metric("riprap_calls_total", service="api", outcome="ok") >= 1


def test_head_and_bodiless_statuses_pass_through(sc: Any) -> None:
    head = sc.client.head("/api/x")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) > 0
    assert sc.client.get("/api/status/204").status_code == 204
    r = sc.client.get("/api/status/404")
    assert r.status_code == 404 and "x-riprap-reason" not in r.headers  # the upstream's own
