"""Acceptance tests for the sidecar, written from /work/shared/language.md alone.

Everything goes through a real `riprap run` subprocess on free loopback ports, with real
upstream HTTP servers on 127.0.0.1 (see acc_kit.py). Each test cites the contract section
it checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from acc_kit import Sidecar, Upstream, clean_env, free_port, riprap_cmd, wait_for
from conftest import RunSidecar

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
]


def uid() -> str:
    return uuid.uuid4().hex[:12]


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ups() -> Iterator[dict[str, Any]]:
    a, b, c = Upstream("A"), Upstream("B"), Upstream("C")
    yield {"A": a, "B": b, "C": c, "DEAD": free_port()}
    a.close()
    b.close()
    c.close()


MAIN_SERVICES = ["echo", "pair", "passthru", "halfdead", "dead", "slow", "limited", "capped",
                 "brk", "sick", "fbstatic", "fb5xx", "stalesvc", "fbsvc", "tiers", "tiersok",
                 "sharded", "shardnodef", "chaotic", "hedged", "roomy", "resetter",
                 "dflt", "ra", "rashort", "perkey", "queued", "capfb", "limfb", "brkprobe",
                 "brk4xx", "ejecting", "pertry", "methods", "tight", "chain", "sickfb",
                 "pathshard", "qshard", "cshard", "weighted", "shardpol", "timeoutfb",
                 "capdisc", "brkfb", "median", "frbrk", "slowbrk", "shbrk", "pairlr",
                 "resetretry", "hedgegood", "limdef", "budgeted", "hedgep95", "tiers2",
                 "expect", "staleshort", "backoffx", "brkreopen", "outmax", "rise", "wlr",
                 "hedge3", "brkk2", "fbchain2", "headhc", "usesvc", "useover", "rnd",
                 "retry4xx", "brkhalf"]


def main_policy(A: str, B: str, C: str, DEAD: str, listen: int, admin: int) -> str:
    return f"""\
# acceptance: one sidecar, many services
app acc
listen 127.0.0.1:{listen}
admin 127.0.0.1:{admin}

service echo {{
    host echo.internal, alias.example
    endpoint {A}
}}

service pair {{
    retry 1 on 503 backoff 1ms
    balance round-robin
    endpoint {A}
    endpoint {B}
}}

service passthru {{
    retry 2 on 5xx backoff 1ms
    endpoint {A}
}}

service halfdead {{
    retry 1 on connect-failure backoff 1ms
    balance round-robin
    endpoint {DEAD}
    endpoint {A}
}}

service dead {{
    endpoint {DEAD}
}}

service resetter {{
    endpoint {A}
}}

service slow {{
    timeout 300ms
    endpoint {A}
}}

service roomy {{
    timeout 5s
    endpoint {A}
}}

service limited {{
    limit 1/m burst 2
    endpoint {A}
}}

service capped {{
    concurrency 1
    endpoint {A}
}}

service brk {{
    breaker failures 2 open 30s
    endpoint {A}
}}

service sick {{
    health GET /s/503/health every 100ms timeout 500ms fall 1 rise 1
    endpoint {A}
}}

service fbstatic {{
    fallback status 200 json {{"from": "fallback",
                             "ok": true}}
    endpoint {DEAD}
}}

service fb5xx {{
    retry 1 on 5xx backoff 1ms
    fallback status 200 text "static-fallback"
    endpoint {A}
}}

service stalesvc {{
    fallback stale 5m
    endpoint {A}
}}

service fbsvc {{
    fallback service echo
    endpoint {DEAD}
}}

service tiers {{
    health GET /healthz every 100ms timeout 300ms fall 1 rise 1
    endpoint {DEAD}
    failover {B}
}}

service tiersok {{
    endpoint {A}
    failover {B}
}}

service sharded {{
    shard by header X-Key
    shard default a
    shard a {{
        endpoint {A}
    }}
    shard b {{
        endpoint {B}
    }}
}}

service shardnodef {{
    shard by header X-Key
    shard a {{
        endpoint {A}
    }}
    shard b {{
        endpoint {B}
    }}
}}

service chaotic {{
    chaos abort 100% status 418
    endpoint {A}
}}

service hedged {{
    hedge after 50ms
    balance round-robin
    endpoint {A}
    endpoint {B}
}}

service dflt {{
    retry 2 backoff 1ms
    endpoint {A}
}}

service ra {{
    retry 1 on 503 backoff 1ms
    endpoint {A}
}}

service rashort {{
    timeout 500ms
    retry 1 on 503 backoff 1ms
    endpoint {A}
}}

service perkey {{
    limit 1/m burst 1 per header X-User
    endpoint {A}
}}

service queued {{
    concurrency 1 queue 1 queue-timeout 300ms
    endpoint {A}
}}

service capfb {{
    concurrency 1
    fallback status 200 text "busy-fallback"
    endpoint {A}
}}

service capdisc {{
    concurrency 1
    endpoint {A}
}}

service limfb {{
    limit 1/m burst 1
    fallback status 200 text "limit-fallback"
    endpoint {A}
}}

service brkprobe {{
    breaker failures 1 open 300ms probes 1
    endpoint {A}
}}

service brk4xx {{
    breaker failures 2 open 30s
    endpoint {A}
}}

service brkfb {{
    breaker failures 1 open 30s
    fallback status 200 text "breaker-fallback"
    endpoint {A}
}}

service ejecting {{
    outlier failures 1 eject 30s
    balance round-robin
    endpoint {DEAD}
    endpoint {A}
}}

service pertry {{
    retry 1 on timeout backoff 1ms per-try 200ms
    balance round-robin
    endpoint {A}
    endpoint {B}
}}

service methods {{
    retry 2 on 503 backoff 1ms methods POST
    endpoint {A}
}}

service tight {{
    timeout 300ms
    retry 5 on 503 backoff 200ms
    endpoint {A}
}}

service chain {{
    fallback stale 5m
    fallback status 200 text "chain-static"
    endpoint {DEAD}
}}

service sickfb {{
    health GET /s/503/health every 100ms timeout 500ms fall 1 rise 1
    fallback stale 5m
    endpoint {A}
}}

service timeoutfb {{
    timeout 300ms
    fallback status 200 text "slow-fallback"
    endpoint {A}
}}

service pathshard {{
    shard by path-segment 1
    shard a {{
        endpoint {A}
    }}
    shard b {{
        endpoint {B}
    }}
}}

service qshard {{
    shard by query k
    shard a {{
        endpoint {A}
    }}
    shard b {{
        endpoint {B}
    }}
}}

service cshard {{
    shard by cookie k
    shard a {{
        endpoint {A}
    }}
    shard b {{
        endpoint {B}
    }}
}}

service shardpol {{
    shard by header X-Key
    shard default a
    shard a {{
        endpoint {A}
        timeout 300ms
    }}
    shard b {{
        endpoint {B}
    }}
}}

service median {{
    timeout 600ms
    retry 3 on 503 backoff 1ms
    endpoint {A}
}}

service frbrk {{
    breaker failure-rate 50% window 4 min 4 open 30s
    endpoint {A}
}}

service slowbrk {{
    breaker failure-rate 50% window 2 min 2 open 30s slow 100ms
    endpoint {A}
}}

service shbrk {{
    shard by header X-Key
    breaker failures 1 open 30s
    shard a {{
        endpoint {A}
    }}
    shard b {{
        endpoint {B}
    }}
}}

service pairlr {{
    retry 1 on 503 backoff 1ms
    endpoint {A}
    endpoint {B}
}}

service resetretry {{
    retry 1 on reset backoff 1ms
    balance round-robin
    endpoint {A}
    endpoint {B}
}}

service hedgegood {{
    hedge after 50ms
    balance round-robin
    endpoint {A}
    endpoint {B}
}}

service budgeted {{
    retry 3 on 503 backoff 1ms budget 10% min 1/s
    endpoint {A}
}}

service hedgep95 {{
    hedge at p95
    balance round-robin
    endpoint {A}
    endpoint {B}
}}

service tiers2 {{
    health GET /healthz every 100ms timeout 300ms fall 1 rise 1
    endpoint {DEAD}
    failover {DEAD}/t1
    failover {B} tier 2
}}

service expect {{
    health GET /s/404/expect every 100ms timeout 300ms fall 1 rise 1 expect 404
    fallback status 200 text "expect-fallback"
    endpoint {A}
}}

service staleshort {{
    fallback stale 300ms
    endpoint {A}
}}

service backoffx {{
    retry 2 on 503 backoff 100ms..1s jitter none
    endpoint {A}
}}

service brkreopen {{
    breaker failures 1 open 200ms
    endpoint {A}
}}

service outmax {{
    outlier failures 1 eject 30s max 34%
    balance round-robin
    endpoint {DEAD}
    endpoint {DEAD}/second
    endpoint {A}
}}

service rise {{
    health GET /hstate/rise every 100ms timeout 300ms fall 1 rise 3
    fallback status 200 text "rise-fallback"
    endpoint {A}
}}

service wlr {{
    endpoint {A} weight 3
    endpoint {B}
}}

service hedge3 {{
    hedge after 50ms max 2
    balance round-robin
    endpoint {A}
    endpoint {B}
    endpoint {C}
}}

service brkk2 {{
    breaker failures 3 open 200ms probes 2
    endpoint {A}
}}

service fbchain2 {{
    endpoint {DEAD}
    fallback service dead
    fallback status 200 text "second-fallback"
}}

service headhc {{
    health HEAD /hchead every 100ms timeout 300ms
    endpoint {A}
}}

service usesvc {{
    use quick
    endpoint {A}
}}

service useover {{
    use quick
    timeout 2s
    endpoint {A}
}}

service rnd {{
    balance random
    endpoint {A}
    endpoint {B}
}}

policy quick {{
    timeout 250ms
    retry 1 on 503 backoff 1ms
}}

service retry4xx {{
    retry 1 on 429 backoff 1ms
    fallback status 200 text "4xx-fallback"
    endpoint {A}
}}

service brkhalf {{
    breaker failures 1 open 200ms
    endpoint {A}
}}

service limdef {{
    limit 3/s
    endpoint {A}
}}

service weighted {{
    balance round-robin
    endpoint {A} weight 3
    endpoint {B}
}}
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, ups: dict[str, Any],
        run_sidecar: RunSidecar) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("acc_main")
    file_listen, file_admin = free_port(), free_port()
    policy = d / "acc.riprap"
    policy.write_text(main_policy(ups["A"].url, ups["B"].url, ups["C"].url,
                                  f"http://127.0.0.1:{ups['DEAD']}",
                                  file_listen, file_admin), encoding="utf-8")
    port, admin = free_port(), free_port()
    # section 8: --listen and --admin override the file
    sc = run_sidecar(policy, "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                     port=port, admin=admin)
    proxy = httpx.Client(proxy=sc.url, trust_env=False, timeout=10)
    try:
        yield {"sc": sc, "A": ups["A"], "B": ups["B"], "proxy": proxy, "dir": d,
               "file_listen": file_listen, "file_admin": file_admin, "policy": policy}
    finally:
        proxy.close()
        sc.stop()


def reason(r: httpx.Response) -> str | None:
    return r.headers.get("x-riprap-reason")


def attempts(r: httpx.Response) -> int:
    assert "x-riprap-attempts" in r.headers, f"no x-riprap-attempts: {dict(r.headers)}"
    return int(r.headers["x-riprap-attempts"])


# --------------------------------------------------------------------------------------
# section 8: --listen / --admin override the file
# --------------------------------------------------------------------------------------
def test_listen_and_admin_flags_override_the_file(env: dict[str, Any]) -> None:
    # contract §8 run: "--listen and --admin override the file"
    sc = env["sc"]
    assert sc.admin.get("/healthz").status_code == 200
    assert sc.get("/echo/x").status_code == 200
    for p in (env["file_listen"], env["file_admin"]):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{p}/healthz", trust_env=False, timeout=2)


# --------------------------------------------------------------------------------------
# section 9: routing
# --------------------------------------------------------------------------------------
def test_route_by_host_name_port_ignored(env: dict[str, Any]) -> None:
    sc, A = env["sc"], env["A"]
    for host in ("echo", "echo:8080", "ECHO", "echo.internal", "alias.example:1"):
        i = uid()
        r = sc.get(f"/host/{i}?q=1", host=host)
        assert r.status_code == 200, (host, r.text)
        assert r.json()["path"] == f"/host/{i}?q=1"  # no prefix removed with Host routing
        assert len(A.hits(i)) == 1
        assert attempts(r) == 1  # section 9: every proxied answer carries x-riprap-attempts


def test_absolute_form_request_through_http_proxy(env: dict[str, Any]) -> None:
    # contract §9 Routing: "absolute-form requests ... are routed the same way"
    proxy, A = env["proxy"], env["A"]
    for host in ("echo", "echo.internal:9999", "alias.example"):
        i = uid()
        r = proxy.get(f"http://{host}/abs/{i}?x=2")
        assert r.status_code == 200, r.text
        assert r.json()["path"] == f"/abs/{i}?x=2"
        assert len(A.hits(i)) == 1
        assert attempts(r) == 1


def test_path_prefix_routes_and_is_removed(env: dict[str, Any]) -> None:
    # contract §9 Routing: "a path /NAME/rest goes to service NAME with the prefix removed"
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/echo/a/{i}/b?k=v")  # Host is 127.0.0.1:PORT, not a service
    assert r.status_code == 200, r.text
    assert r.json()["path"] == f"/a/{i}/b?k=v"
    assert r.headers["x-upstream"] == "A"
    assert [h["path"] for h in A.hits(i)] == [f"/a/{i}/b?k=v"]


def _names_all_services(r: httpx.Response) -> None:
    doc = r.json()
    text = json.dumps(doc)
    for name in MAIN_SERVICES:
        assert f'"{name}"' in text, f"{name} not named in {text}"


def test_unknown_host_forward_proxy_form_is_403(env: dict[str, Any]) -> None:
    # contract §9: "never forwards to a host that the plan does not name: 403 (forward proxy form)"
    proxy, A, B = env["proxy"], env["A"], env["B"]
    i = uid()
    r = proxy.get(f"http://evil.example/{i}")
    assert r.status_code == 403
    assert reason(r) == "unknown-service"
    _names_all_services(r)
    # never forwarded anywhere: also not to an upstream the plan names by address
    r = proxy.get(f"http://127.0.0.1:{A.port}/{i}")
    assert r.status_code == 403 and reason(r) == "unknown-service"
    assert A.hits(i) == [] and B.hits(i) == []


def test_unknown_host_and_unknown_prefix_is_404(env: dict[str, Any]) -> None:
    # contract §9: "404 (anything else), x-riprap-reason: unknown-service, JSON body naming the known services"
    sc, A, B = env["sc"], env["A"], env["B"]
    i = uid()
    r = sc.get(f"/{i}", host="nope.example")
    assert r.status_code == 404 and reason(r) == "unknown-service"
    _names_all_services(r)
    r = sc.get(f"/nosuch/{i}")
    assert r.status_code == 404 and reason(r) == "unknown-service"
    assert "application/json" in r.headers.get("content-type", "")
    _names_all_services(r)
    assert A.hits(i) == [] and B.hits(i) == []


# --------------------------------------------------------------------------------------
# section 9: headers
# --------------------------------------------------------------------------------------
def test_hop_by_hop_headers_dropped_both_ways(env: dict[str, Any]) -> None:
    sc = env["sc"]
    i = uid()
    r = sc.get(f"/echo/hop/{i}", headers={
        "Connection": "keep-alive, X-Req-Hop", "X-Req-Hop": "1", "Keep-Alive": "timeout=5",
        "TE": "trailers", "Proxy-Authorization": "Basic eDp5", "X-Req-Kept": "yes"})
    assert r.status_code == 200
    seen = r.json()["headers"]
    assert seen.get("x-req-kept") == "yes"
    for h in ("x-req-hop", "keep-alive", "te", "proxy-authorization"):
        assert h not in seen, f"hop-by-hop {h} forwarded upstream: {seen}"
    assert seen.get("connection", "").lower() in ("", "keep-alive", "close")
    assert r.headers.get("x-resp-kept") == "yes"
    for h in ("x-resp-hop", "keep-alive", "proxy-authenticate"):
        assert h not in r.headers, f"hop-by-hop {h} passed to the app: {dict(r.headers)}"


def test_deadline_header_sent_upstream(env: dict[str, Any]) -> None:
    sc = env["sc"]
    r = sc.get(f"/slow/dl/{uid()}")
    assert r.status_code == 200
    ms = float(r.json()["headers"]["x-riprap-deadline-ms"])
    assert 0 < ms <= 300  # section 9: the remaining time of the 300ms timeout
    r = sc.get(f"/echo/dl/{uid()}")
    ms = float(r.json()["headers"]["x-riprap-deadline-ms"])
    assert 1000 < ms <= 15000  # built-in default timeout 15s (section 4)


def test_incoming_deadline_header_is_honoured(env: dict[str, Any]) -> None:
    # contract §9 Deadlines: "a call that arrives with that header gets the smaller of it and the service's timeout"
    sc = env["sc"]
    r = sc.get(f"/roomy/dl/{uid()}", headers={"x-riprap-deadline-ms": "200"})
    ms = float(r.json()["headers"]["x-riprap-deadline-ms"])
    assert 0 < ms <= 200  # the smaller of 200 ms and the 5 s timeout
    t = time.monotonic()
    r = sc.get(f"/roomy/sleep/2/{uid()}", headers={"x-riprap-deadline-ms": "200"})
    took = time.monotonic() - t
    assert r.status_code == 504 and reason(r) == "timeout", (r.status_code, dict(r.headers))
    assert took < 1.0


# --------------------------------------------------------------------------------------
# section 9: x-riprap-reason values
# --------------------------------------------------------------------------------------
def test_timeout_is_504(env: dict[str, Any]) -> None:
    sc = env["sc"]
    t = time.monotonic()
    r = sc.get(f"/slow/sleep/2/{uid()}")
    took = time.monotonic() - t
    assert r.status_code == 504 and reason(r) == "timeout"
    assert took < 1.0  # section 4: timeout 300ms is the deadline of the whole call
    attempts(r)


def test_refused_is_502_upstream_failed(env: dict[str, Any]) -> None:
    # contract §9: "upstream-failed (502, no answer could be had: refused, ...)"
    r = env["sc"].get(f"/dead/x/{uid()}")
    assert r.status_code == 502 and reason(r) == "upstream-failed"
    attempts(r)


def test_reset_is_502_upstream_failed(env: dict[str, Any]) -> None:
    # contract §9: "upstream-failed (502, ... reset ...)"
    r = env["sc"].get(f"/resetter/reset/{uid()}")
    assert r.status_code == 502 and reason(r) == "upstream-failed"
    attempts(r)


def test_limit_burst_then_429_with_retry_after(env: dict[str, Any]) -> None:
    # contract §4 limit: "Over the limit: 429 with Retry-After"; §5 "A token bucket starts full"
    sc = env["sc"]
    codes = [sc.get(f"/limited/x/{uid()}") for _ in range(3)]
    assert [r.status_code for r in codes[:2]] == [200, 200]  # the bucket starts full (5)
    r = codes[2]
    assert r.status_code == 429 and reason(r) == "rate-limited"
    attempts(r)
    assert float(r.headers["retry-after"]) > 0


def test_concurrency_cap_overloaded_503(env: dict[str, Any]) -> None:
    # contract §4 concurrency: "the rest get 503 at once"; §9 overloaded (503)
    sc, A = env["sc"], env["A"]
    i = uid()
    out: dict[str, Any] = {}
    cli = httpx.Client(base_url=sc.url, trust_env=False, timeout=10)

    def first() -> None:
        out["r"] = cli.get(f"/capped/sleep/1/{i}")

    th = threading.Thread(target=first)
    th.start()
    try:
        assert wait_for(lambda: A.hits(i), 3), "first call never arrived"
        t = time.monotonic()
        r = sc.get(f"/capped/x/{uid()}")
        assert r.status_code == 503 and reason(r) == "overloaded"
        assert time.monotonic() - t < 0.5  # queue 0: "the rest get 503 at once"
        attempts(r)
    finally:
        th.join(5)
        cli.close()
    assert out["r"].status_code == 200


def test_breaker_opens_after_consecutive_failures(env: dict[str, Any]) -> None:
    # contract §4 breaker failures N: "opens after N consecutive failures"; §9 breaker-open (503)
    sc, A = env["sc"], env["A"]
    for _ in range(2):
        assert sc.get(f"/brk/s/500/{uid()}").status_code == 500
    i = uid()
    r = sc.get(f"/brk/x/{i}")
    assert r.status_code == 503 and reason(r) == "breaker-open"
    assert A.hits(i) == []  # fails fast, never sent
    attempts(r)


def test_no_healthy_endpoint_503(env: dict[str, Any]) -> None:
    # contract §9: "no-healthy-endpoint (503)"; §5 health checks
    sc, A = env["sc"], env["A"]
    assert wait_for(lambda: A.hits("/s/503/health"), 3), "no active health checks seen"
    r = wait_for(lambda: (lambda r: r if reason(r) == "no-healthy-endpoint" else None)(
        sc.get(f"/sick/x/{uid()}")), 3)
    assert r is not None, "the unhealthy endpoint kept being used"
    assert r.status_code == 503


def test_upstream_5xx_passed_through_after_retries(env: dict[str, Any]) -> None:
    # contract §9: "An upstream's own 5xx that survives retries and has no fallback is passed through as the upstream sent it"
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/passthru/s/500/{i}")
    assert r.status_code == 500
    assert r.text == "A says 500"  # as the upstream sent it
    assert r.headers["x-upstream"] == "A"
    assert "x-riprap-reason" not in r.headers  # riprap did not make this answer
    assert "x-riprap-fallback" not in r.headers
    assert attempts(r) == 3 and len(A.hits(i)) == 3  # retry 2: N+1 attempts


# --------------------------------------------------------------------------------------
# section 4: retries
# --------------------------------------------------------------------------------------
def test_retry_goes_to_another_endpoint(env: dict[str, Any]) -> None:
    # contract §4 retry: "A retry goes to a different endpoint when one is available"; N+1 attempts
    sc, A, B = env["sc"], env["A"], env["B"]
    for _ in range(3):
        i = uid()
        r = sc.get(f"/pair/s/503/{i}")
        assert r.status_code == 503 and attempts(r) == 2
        assert len(A.hits(i)) == 1 and len(B.hits(i)) == 1


def test_retry_recovers_on_other_endpoint(env: dict[str, Any]) -> None:
    # contract §4 retry: "A retry goes to a different endpoint when one is available"
    sc = env["sc"]
    for _ in range(4):
        r = sc.get(f"/pair/failon/A/{uid()}")
        assert r.status_code == 200 and r.headers["x-upstream"] == "B"
        assert attempts(r) in (1, 2)


def test_post_not_retried(env: dict[str, Any]) -> None:
    # contract §4 retry: "Only idempotent methods ... are retried"
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/passthru/s/503/{i}", method="POST", content=b"payload")
    assert r.status_code == 503
    assert attempts(r) == 1 and len(A.hits(i)) == 1


def test_post_with_idempotency_key_is_retried(env: dict[str, Any]) -> None:
    # contract §4 retry: "... or requests with an Idempotency-Key header are retried"
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/passthru/s/503/{i}", method="POST", content=b"payload",
               headers={"Idempotency-Key": i})
    assert r.status_code == 503
    assert attempts(r) == 3 and len(A.hits(i)) == 3
    assert all(h["body"] == "payload" for h in A.hits(i))  # the body is replayed


def test_post_retried_on_connect_failure(env: dict[str, Any]) -> None:
    # contract §4 retry: "except on connect-failure (nothing was sent)"
    sc, A = env["sc"], env["A"]
    for _ in range(4):  # round-robin: some of these go to the dead endpoint first
        i = uid()
        r = sc.get(f"/halfdead/x/{i}", method="POST", content=b"body-" + i.encode())
        assert r.status_code == 200, (r.status_code, r.text)
        assert r.json()["body"] == "body-" + i
        assert len(A.hits(i)) == 1


def test_hedge_answers_from_the_fast_endpoint(env: dict[str, Any]) -> None:
    # contract §4 hedge after D: "send extra copies, to other endpoints; the first good answer wins"
    sc = env["sc"]
    for _ in range(2):  # round-robin: one of the two starts on the slow A
        t = time.monotonic()
        r = sc.get(f"/hedged/slowon/A/1.5/{uid()}")
        assert r.status_code == 200 and r.headers["x-upstream"] == "B"
        assert time.monotonic() - t < 1.0


# --------------------------------------------------------------------------------------
# section 4: fallbacks
# --------------------------------------------------------------------------------------
def test_static_json_fallback(env: dict[str, Any]) -> None:
    r = env["sc"].get(f"/fbstatic/x/{uid()}")
    assert r.status_code == 200
    assert r.headers.get("x-riprap-fallback") == "static"
    assert r.json() == {"from": "fallback", "ok": True}
    assert "x-riprap-reason" in r.headers  # section 9: riprap made this answer
    assert "json" in r.headers.get("content-type", "")


def test_static_fallback_after_5xx_but_never_for_4xx(env: dict[str, Any]) -> None:
    # contract §4: "A fallback answers ... a 5xx answer after retries. It never replaces an upstream 4xx."
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/fb5xx/s/500/{i}")
    assert r.status_code == 200 and r.text == "static-fallback"
    assert r.headers.get("x-riprap-fallback") == "static"
    assert len(A.hits(i)) == 2  # retried first, then the fallback
    for code in (404, 429, 400):
        r = sc.get(f"/fb5xx/s/{code}/{uid()}")
        assert r.status_code == code and r.text == f"A says {code}"
        assert "x-riprap-fallback" not in r.headers
        assert attempts(r) == 1


def test_stale_fallback(env: dict[str, Any]) -> None:
    # contract §4 fallback stale D: "the last good response to the same method and URL"; §9 x-riprap-fallback: stale
    sc = env["sc"]
    path = f"/stalesvc/flip/{uid()}"
    first = sc.get(path)
    assert first.status_code == 200 and "x-riprap-fallback" not in first.headers
    again = sc.get(path)
    assert again.status_code == 200
    assert again.headers.get("x-riprap-fallback") == "stale"
    assert again.json() == first.json()
    other = sc.get(f"/stalesvc/flip/{uid()}x")  # another URL has no stale copy
    assert other.headers.get("x-riprap-fallback") != "stale"


def test_service_fallback(env: dict[str, Any]) -> None:
    # contract §4 fallback service NAME; §9 x-riprap-fallback: service
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/fbsvc/via/{i}")
    assert r.status_code == 200
    assert r.headers.get("x-riprap-fallback") == "service"
    assert r.headers["x-upstream"] == "A" and len(A.hits(i)) == 1


# --------------------------------------------------------------------------------------
# section 5: failover tiers and sharding
# --------------------------------------------------------------------------------------
def test_failover_tier_unused_while_primary_up(env: dict[str, Any]) -> None:
    # contract §5 failover: "a tier is used only when every endpoint of the tiers before it is unhealthy"
    sc = env["sc"]
    for _ in range(6):
        r = sc.get(f"/tiersok/x/{uid()}")
        assert r.status_code == 200 and r.headers["x-upstream"] == "A"


def test_failover_tier_used_when_primaries_down(env: dict[str, Any]) -> None:
    # contract §5 failover: tier 1 used when every primary is unhealthy
    sc = env["sc"]
    r = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(
        sc.get(f"/tiers/x/{uid()}")), 3)
    assert r is not None, "failover tier never used"
    assert r.headers["x-upstream"] == "B"
    for _ in range(3):
        r = sc.get(f"/tiers/x/{uid()}")
        assert r.status_code == 200 and r.headers["x-upstream"] == "B"


def test_shard_by_header_is_stable_and_spread(env: dict[str, Any]) -> None:
    # contract §5 shard: "A key maps to a shard by rendezvous hashing with a stable hash"
    sc = env["sc"]
    where: dict[str, str] = {}
    for k in range(16):
        r = sc.get(f"/sharded/x/{uid()}", headers={"X-Key": f"key-{k}"})
        assert r.status_code == 200
        where[f"key-{k}"] = r.headers["x-upstream"]
    assert set(where.values()) == {"A", "B"}  # 16 keys over 2 shards: both used
    for k, up in list(where.items())[:6]:
        assert sc.get(f"/sharded/y/{uid()}", headers={"X-Key": k}).headers["x-upstream"] == up


def test_shard_default_and_400_without_one(env: dict[str, Any]) -> None:
    sc, A, B = env["sc"], env["A"], env["B"]
    r = sc.get(f"/sharded/nokey/{uid()}")
    assert r.status_code == 200 and r.headers["x-upstream"] == "A"  # shard default a
    i = uid()
    r = sc.get(f"/shardnodef/nokey/{i}")
    assert r.status_code == 400
    assert "x-riprap-reason" in r.headers  # section 9: riprap made this answer
    assert A.hits(i) == [] and B.hits(i) == []


# --------------------------------------------------------------------------------------
# section 4: chaos is off without --chaos
# --------------------------------------------------------------------------------------
def test_chaos_inactive_without_flag(env: dict[str, Any]) -> None:
    for _ in range(3):
    # contract §4 chaos: "active only when the sidecar runs with --chaos"
        r = env["sc"].get(f"/chaotic/x/{uid()}")
        assert r.status_code == 200


# --------------------------------------------------------------------------------------
# section 9: admin
# --------------------------------------------------------------------------------------
def test_admin_healthz_readyz(env: dict[str, Any]) -> None:
    # contract §9 Admin: "/healthz 200 while the process lives; /readyz 200 once a plan is loaded"
    adm = env["sc"].admin
    assert adm.get("/healthz").status_code == 200
    assert adm.get("/readyz").status_code == 200


def test_admin_metrics_is_prometheus_text(env: dict[str, Any]) -> None:
    # contract §9 Admin: "GET /metrics Prometheus text"
    from prometheus_client.parser import text_string_to_metric_families

    env["sc"].get(f"/echo/m/{uid()}")
    r = env["sc"].admin.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    fams = list(text_string_to_metric_families(r.text))
    assert fams and "# TYPE" in r.text


def test_admin_plan(env: dict[str, Any]) -> None:
    doc = env["sc"].admin.get("/plan").json()
    assert {"plan", "hash", "loaded_at", "last_error"} <= set(doc)
    assert doc["last_error"] is None
    assert isinstance(doc["hash"], str) and doc["hash"]
    datetime.fromisoformat(doc["loaded_at"].replace("Z", "+00:00"))
    plan = doc["plan"]
    assert plan["version"] == 1 and plan["app"] == "acc"
    assert set(MAIN_SERVICES) <= set(plan["services"])
    assert plan["services"]["slow"]["timeout"] == pytest.approx(0.3)
    assert plan["services"]["passthru"]["retry"]["retries"] == 2
    assert plan["services"]["echo"]["retry"] is None  # section 5: what is not written is off


def test_admin_state_names_services_shards_endpoints(env: dict[str, Any]) -> None:
    # contract §9 Admin: "/state health, ejection, breaker and limiter state of every service, shard and endpoint"
    r = env["sc"].admin.get("/state")
    assert r.status_code == 200
    text = json.dumps(r.json())
    for name in MAIN_SERVICES:
        assert f'"{name}"' in text
    assert f"127.0.0.1:{env['A'].port}" in text and f"127.0.0.1:{env['B'].port}" in text
    for word in ("breaker", "health", "eject", "limit"):
        assert word in text.lower()


# --------------------------------------------------------------------------------------
# section 8/4: a compiled plan .json as FILE; chaos with --chaos
# --------------------------------------------------------------------------------------
def test_compiled_plan_json_with_chaos(tmp_path: Path, ups: dict[str, Any],
                                       env: dict[str, Any], run_sidecar: RunSidecar) -> None:
    A, B, C = ups["A"], ups["B"], ups["C"]
    src = tmp_path / "chaos.riprap"
    src.write_text(f"""\
app chaosapp
defaults {{
    timeout 450ms
}}
service chaotic {{
    chaos abort 100% status 418
    endpoint {A.url}
}}
service calm {{
    endpoint {A.url}
}}
service abortdef {{
    chaos abort 100%
    endpoint {A.url}
}}
service sharded {{
    shard by header X-Key
    shard default a
    shard a {{
        endpoint {A.url}
    }}
    shard b {{
        endpoint {B.url}
    }}
}}
service sharded3 {{
    shard by header X-Key
    shard a {{
        endpoint {A.url}
    }}
    shard b {{
        endpoint {B.url}
    }}
    shard c {{
        endpoint {C.url}
    }}
}}
service delayed {{
    chaos delay 100% 300ms
    endpoint {A.url}
}}
""", encoding="utf-8")
    out = tmp_path / "chaos-plan.json"
    cp = subprocess.run([*riprap_cmd(), "compile", str(src), "-o", str(out)],
                        capture_output=True, env=clean_env(), timeout=30)
    assert cp.returncode == 0, cp.stderr
    port, admin = free_port(), free_port()
    sc = run_sidecar(out, "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                     "--chaos", port=port, admin=admin)
    try:
        i = uid()
        r = sc.get(f"/chaotic/x/{i}")
        assert r.status_code == 418
        assert "x-riprap-reason" in r.headers  # section 9: an answer riprap made itself
        attempts(r)
        assert A.hits(i) == []  # injected before the call leaves
        assert sc.get(f"/calm/x/{uid()}").status_code == 200
        assert sc.get(f"/abortdef/x/{uid()}").status_code == 503  # default status 503
        r = sc.get(f"/calm/sleep/1/{uid()}")  # section 3: defaults apply to every service
        assert r.status_code == 504 and reason(r) == "timeout"
        # section 5: a key maps the same way in every process (stable hash), and adding a
        # shard moves keys only to the new shard (rendezvous hashing)
        moved = 0
        for n in range(48):
            k = {"X-Key": f"user-{n}"}
            here = sc.get("/sharded/x", headers=k).headers["x-upstream"]
            there = env["sc"].get("/sharded/x", headers=k).headers["x-upstream"]
            assert here == there, f"user-{n}: {here} here, {there} in another process"
            three = sc.get("/sharded3/x", headers=k).headers["x-upstream"]
            assert three in (here, "C"), f"user-{n} moved from {here} to {three}"
            moved += three == "C"
        assert 5 <= moved <= 30, moved
        t = time.monotonic()
        assert sc.get(f"/delayed/x/{uid()}").status_code == 200
        assert time.monotonic() - t >= 0.29
        assert sc.admin.get("/plan").json()["plan"]["app"] == "chaosapp"
        # section 8/9: a plan .json is hot-reloaded too
        src.write_text(src.read_text() + f"service later {{\n    endpoint {A.url}\n}}\n")
        tmp = tmp_path / "next.json"
        cp = subprocess.run([*riprap_cmd(), "compile", str(src), "-o", str(tmp)],
                            capture_output=True, env=clean_env(), timeout=30)
        assert cp.returncode == 0, cp.stderr
        os.replace(tmp, out)
        t = time.monotonic()
        assert wait_for(lambda: sc.get(f"/later/x/{uid()}").status_code == 200, 3)
        assert time.monotonic() - t <= 1.2
    finally:
        sc.stop()


# --------------------------------------------------------------------------------------
# section 9: hot reload
# --------------------------------------------------------------------------------------
RELOAD_BASE = """\
app rel
listen 127.0.0.1:{port}
admin 127.0.0.1:{admin}

service one {{
    endpoint {dead}
    fallback status 200 file "fb.json"
}}
{extra}
"""


@pytest.fixture(scope="module")
def rel(tmp_path_factory: pytest.TempPathFactory, ups: dict[str, Any],
        run_sidecar: RunSidecar) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("acc_reload")
    port, admin = free_port(), free_port()
    fmt = {"port": port, "admin": admin, "dead": f"http://127.0.0.1:{ups['DEAD']}"}
    (d / "fb.json").write_text('{"v": 1}', encoding="utf-8")
    policy = d / "rel.riprap"
    policy.write_text(RELOAD_BASE.format(extra="", **fmt), encoding="utf-8")
    # addresses from the file itself; run from elsewhere: the fallback file's path is
    # relative to the policy file (section 4), not to the working directory
    sc = run_sidecar(policy, port=port, admin=admin, cwd=d.parent)
    try:
        yield {"sc": sc, "dir": d, "policy": policy, "fmt": fmt, "A": ups["A"]}
    finally:
        sc.stop()


def save_by_rename(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".swp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def test_reload_named_file_within_1s(rel: dict[str, Any]) -> None:
    # contract §9 Hot reload: "a saved change ... to a file it names, takes effect within 1 s"
    sc = rel["sc"]
    r = sc.get("/one/x")
    assert r.json() == {"v": 1} and r.headers.get("x-riprap-fallback") == "static"
    time.sleep(0.05)
    (rel["dir"] / "fb.json").write_text('{"v": 2}', encoding="utf-8")
    t = time.monotonic()
    ok = wait_for(lambda: sc.get("/one/x").json() == {"v": 2}, 3)
    took = time.monotonic() - t
    assert ok, "fallback file change never took effect"
    assert took <= 1.2, f"took {took:.2f}s"


def test_reload_policy_saved_by_rename_within_1s(rel: dict[str, Any]) -> None:
    # contract §9 Hot reload: "within 1 s"; "Editors that save by rename ... are handled"
    sc, A = rel["sc"], rel["A"]
    extra = f"service two {{\n    endpoint {A.url}\n}}\n"
    before = sc.admin.get("/plan").json()
    assert sc.get("/two/x").status_code == 404
    save_by_rename(rel["policy"], RELOAD_BASE.format(extra=extra, **rel["fmt"]))
    t = time.monotonic()
    ok = wait_for(lambda: sc.get(f"/two/x/{uid()}").status_code == 200, 3)
    took = time.monotonic() - t
    assert ok, "new service never routed"
    assert took <= 1.2, f"took {took:.2f}s"
    after = sc.admin.get("/plan").json()
    assert after["hash"] != before["hash"] and "two" in after["plan"]["services"]
    assert after["last_error"] is None


def _reload_error_count(sc: Sidecar) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(sc.admin.get("/metrics").text):
        if "reload" not in fam.name:
            continue
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            if any(v in ("error", "failed", "failure") for v in s.labels.values()) or \
                    "error" in s.name or "fail" in s.name:
                total += s.value
    return total


def test_broken_change_keeps_plan_and_reports_then_clears(rel: dict[str, Any]) -> None:
    # contract §9: "A change that does not compile leaves the running plan in force, logs ..., shows them at /plan and counts them in the metrics"; last_error "null again after a successful one"
    sc, A = rel["sc"], rel["A"]
    extra = f"service two {{\n    endpoint {A.url}\n}}\n"
    good = RELOAD_BASE.format(extra=extra, **rel["fmt"])
    save_by_rename(rel["policy"], good)
    assert wait_for(lambda: sc.get(f"/two/x/{uid()}").status_code == 200, 3)
    before = sc.admin.get("/plan").json()
    errs0 = _reload_error_count(sc)
    rel["policy"].write_text(good + "service broken {\n    retry lots\n    endpoint nowhere\n",
                             encoding="utf-8")
    doc = wait_for(lambda: (lambda d: d if d["last_error"] else None)(
        sc.admin.get("/plan").json()), 3)
    assert doc is not None, "last_error never shown at /plan"
    assert doc["hash"] == before["hash"]  # the running plan stays in force
    assert "lots" in json.dumps(doc["last_error"]) or "retry" in json.dumps(doc["last_error"])
    assert "rel.riprap" in sc.logs(), "diagnostics not logged"
    assert sc.get(f"/two/x/{uid()}").status_code == 200
    assert sc.admin.get("/readyz").status_code == 200
    assert _reload_error_count(sc) > errs0, "failed reload not counted in the metrics"
    extra3 = extra + f"service three {{\n    endpoint {A.url}\n}}\n"
    rel["policy"].write_text(RELOAD_BASE.format(extra=extra3, **rel["fmt"]), encoding="utf-8")
    doc = wait_for(lambda: (lambda d: d if d["last_error"] is None else None)(
        sc.admin.get("/plan").json()), 3)
    assert doc is not None, "last_error not null again after a fix"
    assert "three" in doc["plan"]["services"]
    assert wait_for(lambda: sc.get(f"/three/x/{uid()}").status_code == 200, 2)


def test_reload_carries_over_limiter_state(rel: dict[str, Any]) -> None:
    """Section 9: state of services that did not change (buckets) carries over."""
    sc, A = rel["sc"], rel["A"]
    lim = (f"service lim {{\n    limit 1/m burst 1\n    endpoint {A.url}\n}}\n"
           f"service brk {{\n    breaker failures 1 open 30s\n    endpoint {A.url}\n}}\n")
    save_by_rename(rel["policy"], RELOAD_BASE.format(extra=lim, **rel["fmt"]))
    assert wait_for(lambda: sc.get(f"/lim/x/{uid()}").status_code in (200, 429), 3)
    r = sc.get(f"/lim/x/{uid()}")
    assert r.status_code == 429  # the bucket (burst 1) is empty now
    assert sc.get(f"/brk/s/500/{uid()}").status_code == 500
    assert reason(sc.get(f"/brk/x/{uid()}")) == "breaker-open"
    other = lim + f"service other {{\n    endpoint {A.url}\n}}\n"
    save_by_rename(rel["policy"], RELOAD_BASE.format(extra=other, **rel["fmt"]))
    assert wait_for(lambda: sc.get(f"/other/x/{uid()}").status_code == 200, 3)
    r = sc.get(f"/lim/x/{uid()}")
    assert r.status_code == 429 and reason(r) == "rate-limited"
    assert reason(sc.get(f"/brk/x/{uid()}")) == "breaker-open"  # the breaker too


# --------------------------------------------------------------------------------------
# section 6 (supervision), section 9 (SIGHUP, SIGTERM)
# --------------------------------------------------------------------------------------
APP_PY = """\
import os, signal, sys, time
log = sys.argv[1]
with open(log, "a") as f:
    f.write(f"start {os.getpid()} {time.time()}\\n")
n = sum(1 for line in open(log) if line.startswith("start"))
if n < 3:
    time.sleep(0.1)
    sys.exit(3 if n == 1 else 0)  # a crash, then a clean exit: both are restarted
def bye(*_):
    with open(log, "a") as f:
        f.write(f"stopped {os.getpid()}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
while True:
    time.sleep(0.05)
"""

SUP_POLICY = """\
app sup {{
    run "{python} {app} {log}"
    restart backoff 200ms..2s
}}
listen 127.0.0.1:{port}
admin 127.0.0.1:{admin}

service up {{
    endpoint {A}
}}
{extra}
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_supervision_sighup_and_sigterm(tmp_path: Path, ups: dict[str, Any],
                                       run_sidecar: RunSidecar) -> None:
    A = ups["A"]
    real = tmp_path / "real"
    real.mkdir()
    linkdir = tmp_path / "conf"
    linkdir.mkdir()
    app, log = tmp_path / "app.py", tmp_path / "app.log"
    app.write_text(APP_PY, encoding="utf-8")
    port, admin = free_port(), free_port()
    fmt = {"python": sys.executable, "app": app, "log": log, "port": port, "admin": admin,
           "A": A.url}
    target = real / "sup.riprap"
    target.write_text(SUP_POLICY.format(extra="", **fmt), encoding="utf-8")
    link = linkdir / "sup.riprap"
    link.symlink_to(target)
    sc = run_sidecar(link, port=port, admin=admin)
    try:
        # section 6: the app is started, and restarted each time it exits
        starts = wait_for(lambda: (lambda ls: ls if len(ls) >= 3 else None)(
            [ln for ln in log.read_text().splitlines() if ln.startswith("start")]), 6)
        assert starts, f"app not restarted: {log.read_text() if log.exists() else ''}"
        pids = {int(ln.split()[1]) for ln in starts}
        assert len(pids) == 3
        last = int(starts[-1].split()[1])
        t = [float(ln.split()[2]) for ln in starts]
        # exponential backoff between restarts: 200ms, then 400ms
        assert t[1] - t[0] >= 0.3 and (t[2] - t[1]) - (t[1] - t[0]) >= 0.12, t
        time.sleep(0.3)
        assert _alive(last)

        # section 9: SIGHUP reloads (the file changed where no watcher of its directory sees)
        extra = f"service added {{\n    endpoint {A.url}\n}}\n"
        target.write_text(SUP_POLICY.format(extra=extra, **fmt), encoding="utf-8")
        sc.signal(signal.SIGHUP)
        assert wait_for(lambda: sc.get(f"/added/x/{uid()}").status_code == 200, 2), \
            "SIGHUP did not reload"
        assert sc.proc is not None and sc.proc.poll() is None

        # section 9: SIGTERM: readiness 503, new calls still served, in-flight drain, exit 0
        i = uid()
        out: dict[str, Any] = {}
        cli = httpx.Client(base_url=sc.url, trust_env=False, timeout=10)

        def inflight() -> None:
            out["r"] = cli.get(f"/up/sleep/1.2/{i}")

        th = threading.Thread(target=inflight)
        th.start()
        assert wait_for(lambda: A.hits(i), 3)
        sc.signal(signal.SIGTERM)
        assert wait_for(lambda: sc.admin.get("/readyz").status_code == 503, 0.5), \
            "readiness did not turn 503"
        r = sc.get(f"/up/x/{uid()}")
        assert r.status_code == 200  # the grace period still serves new calls
        th.join(10)
        cli.close()
        assert out["r"].status_code == 200, "the call in flight was not drained"
        assert sc.proc is not None
        rc = sc.proc.wait(20)
        assert rc == 0
        # section 6: the app is stopped when the sidecar stops
        assert f"stopped {last}" in log.read_text()
        assert wait_for(lambda: not _alive(last), 2)
    finally:
        sc.stop()


# --------------------------------------------------------------------------------------
# more of sections 4, 5 and 9 on the shared sidecar
# --------------------------------------------------------------------------------------
def test_default_retry_conditions(env: dict[str, Any]) -> None:
    """Section 4: default COND is connect-failure, reset, 502, 503, 504 (not 500)."""
    sc, A = env["sc"], env["A"]
    for code, n in ((500, 1), (502, 3), (503, 3), (504, 3), (404, 1)):
        i = uid()
        r = sc.get(f"/dflt/s/{code}/{i}")
        assert r.status_code == code
        assert attempts(r) == n and len(A.hits(i)) == n, code


def test_retry_after_is_honoured(env: dict[str, Any]) -> None:
    """Section 4: a Retry-After from the upstream is honoured within the deadline."""
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/ra/raflip/1/{i}")
    assert r.status_code == 200 and attempts(r) == 2
    hits = A.hits(i)
    assert len(hits) == 2 and hits[1]["t"] - hits[0]["t"] >= 0.9


def test_retry_after_beyond_deadline_is_not_waited(env: dict[str, Any]) -> None:
    # contract §4: "A Retry-After from the upstream is honoured within the deadline"
    sc = env["sc"]
    t = time.monotonic()
    r = sc.get(f"/rashort/raflip/5/{uid()}")
    assert time.monotonic() - t < 1.0  # timeout 500ms bounds the whole call
    assert r.status_code in (503, 504)


def test_retries_stop_at_the_whole_call_deadline(env: dict[str, Any]) -> None:
    """Section 4: timeout is the deadline for the whole call, retries included."""
    sc = env["sc"]
    t = time.monotonic()
    r = sc.get(f"/tight/s/503/{uid()}")
    assert time.monotonic() - t < 0.8
    assert r.status_code in (503, 504)
    attempts(r)


def test_retry_methods_option(env: dict[str, Any]) -> None:
    # contract §4 retry: "unless methods names others"
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/methods/s/503/{i}", method="POST", content=b"p")
    assert r.status_code == 503 and attempts(r) == 3 and len(A.hits(i)) == 3


def test_per_try_timeout_retries_elsewhere(env: dict[str, Any]) -> None:
    # contract §4 retry COND timeout: "per-try timeout hit"; retry goes to a different endpoint
    sc = env["sc"]
    for _ in range(2):  # round-robin: one of these starts on the slow A
        t = time.monotonic()
        r = sc.get(f"/pertry/slowon/A/2/{uid()}")
        assert r.status_code == 200 and r.headers["x-upstream"] == "B"
        assert time.monotonic() - t < 1.0


def test_put_body_retried_small_not_above_1mib(env: dict[str, Any]) -> None:
    """Section 9: a request body is buffered for retries only up to 1 MiB."""
    sc, A = env["sc"], env["A"]
    i = uid()
    small = b"s" * 100_000
    r = sc.get(f"/passthru/s/503/{i}", method="PUT", content=small)
    assert attempts(r) == 3 and all(len(h["body"]) == len(small) for h in A.hits(i))
    i = uid()
    big = b"b" * (2 * 1024 * 1024)
    r = sc.get(f"/passthru/s/503/{i}", method="PUT", content=big)
    assert r.status_code == 503
    assert attempts(r) == 1 and len(A.hits(i)) == 1
    assert len(A.hits(i)[0]["body"]) == len(big)


def test_bodies_stream_both_ways(env: dict[str, Any]) -> None:
    # contract §9: "Bodies stream in both directions"
    sc = env["sc"]
    n = 3_000_001
    r = sc.get(f"/echo/big/{n}/{uid()}")
    assert r.status_code == 200 and len(r.content) == n
    assert r.content[:32] == b"0123456789abcdef" * 2

    def gen() -> Iterator[bytes]:
        for _ in range(30):
            yield b"x" * 100_000

    r = sc.get(f"/echo/size/{uid()}", method="POST", content=gen())
    assert r.status_code == 200 and r.json()["size"] == 3_000_000
    # a slow chunked answer reaches the app before it is complete
    t = time.monotonic()
    with sc.client.stream("GET", f"/echo/drip/4/0.25/{uid()}") as resp:
        it = resp.iter_raw()
        first = next(it)
        t_first = time.monotonic() - t
        rest = b"".join(it)
    assert (first + rest) == b"chunk0;chunk1;chunk2;chunk3;"
    assert t_first < 0.6 and time.monotonic() - t >= 0.9


def test_client_disconnect_cancels_upstream_call(env: dict[str, Any]) -> None:
    """Section 9: a client that disconnects cancels its upstream call (frees its slot)."""
    sc, A = env["sc"], env["A"]
    i = uid()
    with httpx.Client(base_url=sc.url, trust_env=False, timeout=0.3) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.get(f"/capdisc/sleep/3/{i}")
    assert A.hits(i)
    r = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(
        sc.get(f"/capdisc/x/{uid()}")), 1.0, step=0.1)
    assert r is not None, "the cancelled call still holds the concurrency slot"


def test_limit_per_header_keeps_separate_buckets(env: dict[str, Any]) -> None:
    # contract §4 limit: "per header keeps one bucket per header value"
    sc = env["sc"]
    assert sc.get(f"/perkey/x/{uid()}", headers={"X-User": "u1"}).status_code == 200
    r = sc.get(f"/perkey/x/{uid()}", headers={"X-User": "u1"})
    assert r.status_code == 429 and reason(r) == "rate-limited" and "retry-after" in r.headers
    assert sc.get(f"/perkey/x/{uid()}", headers={"X-User": "u2"}).status_code == 200


def test_concurrency_queue_and_queue_timeout(env: dict[str, Any]) -> None:
    # contract §4 concurrency N queue Q queue-timeout D: "up to Q wait, each at most D; the rest get 503 at once"
    sc, A = env["sc"], env["A"]
    res: dict[str, Any] = {}
    clients = [httpx.Client(base_url=sc.url, trust_env=False, timeout=10) for _ in range(2)]

    def call(k: int, path: str) -> None:
        t = time.monotonic()
        res[k] = (clients[k].get(path), time.monotonic() - t)

    try:
        i = uid()
        th0 = threading.Thread(target=call, args=(0, f"/queued/sleep/0.15/{i}"))
        th0.start()
        assert wait_for(lambda: A.hits(i), 3)
        th1 = threading.Thread(target=call, args=(1, f"/queued/x/{uid()}"))
        th1.start()
        assert wait_for(lambda: sc.admin.get("/state").json()["services"]["queued"]["bulkhead"]
                        ["queued"] == 1, 3), "the second call never queued"
        t = time.monotonic()
        r = sc.get(f"/queued/x/{uid()}")  # one in flight, one queued: at once 503
        assert r.status_code == 503 and reason(r) == "overloaded"
        assert time.monotonic() - t < 0.25
        th0.join(5)
        th1.join(5)
        assert res[0][0].status_code == 200
        assert res[1][0].status_code == 200  # waited in the queue, then served
        # queue-timeout: a queued call waits at most 300ms
        i = uid()
        th0 = threading.Thread(target=call, args=(0, f"/queued/sleep/1.5/{i}"))
        th0.start()
        assert wait_for(lambda: A.hits(i), 3)
        t = time.monotonic()
        r = sc.get(f"/queued/x/{uid()}")
        took = time.monotonic() - t
        assert r.status_code == 503 and reason(r) == "overloaded"
        assert 0.2 <= took < 0.9
        th0.join(5)
    finally:
        for c in clients:
            c.close()


def test_overloaded_goes_to_fallback(env: dict[str, Any]) -> None:
    # contract §4: "A fallback answers a call that failed: ... overloaded"
    sc, A = env["sc"], env["A"]
    i = uid()
    cli = httpx.Client(base_url=sc.url, trust_env=False, timeout=10)
    th = threading.Thread(target=lambda: cli.get(f"/capfb/sleep/0.8/{i}"))
    th.start()
    try:
        assert wait_for(lambda: A.hits(i), 3)
        r = sc.get(f"/capfb/x/{uid()}")
        assert r.status_code == 200 and r.text == "busy-fallback"
        assert r.headers.get("x-riprap-fallback") == "static"
    finally:
        th.join(5)
        cli.close()


def test_rate_limited_is_not_a_failure_for_fallback(env: dict[str, Any]) -> None:
    """Section 4: a fallback answers failed calls (unreachable, breaker open, overloaded,
    timed out, 5xx); being over the limit is not one of them: 429."""
    sc = env["sc"]
    assert sc.get(f"/limfb/x/{uid()}").status_code == 200
    r = sc.get(f"/limfb/x/{uid()}")
    assert r.status_code == 429 and reason(r) == "rate-limited"


def test_breaker_probe_closes_it_again(env: dict[str, Any]) -> None:
    # contract §4 breaker: "then K probe calls are let through; all succeed: closed"
    sc = env["sc"]
    assert sc.get(f"/brkprobe/s/500/{uid()}").status_code == 500
    r = sc.get(f"/brkprobe/x/{uid()}")
    assert r.status_code == 503 and reason(r) == "breaker-open"
    # open 300ms: until then every call is refused at once, then one probe is let through
    assert wait_for(lambda: sc.get(f"/brkprobe/x/{uid()}").status_code == 200, 3)
    for _ in range(3):  # the probe succeeded: closed
        assert sc.get(f"/brkprobe/x/{uid()}").status_code == 200


def test_breaker_ignores_4xx(env: dict[str, Any]) -> None:
    """Section 4: failures are connection errors, timeouts and 5xx answers."""
    sc = env["sc"]
    for _ in range(4):
        assert sc.get(f"/brk4xx/s/404/{uid()}").status_code == 404
    r = sc.get(f"/brk4xx/x/{uid()}")
    assert r.status_code == 200


def test_breaker_open_goes_to_fallback(env: dict[str, Any]) -> None:
    # contract §4: "A fallback answers a call that failed: ... breaker open"
    sc, A = env["sc"], env["A"]
    r = sc.get(f"/brkfb/s/500/{uid()}")
    assert r.headers.get("x-riprap-fallback") == "static"  # a 5xx: the fallback answers
    i = uid()
    r = sc.get(f"/brkfb/x/{i}")
    assert r.status_code == 200 and r.text == "breaker-fallback"
    assert r.headers.get("x-riprap-fallback") == "static" and A.hits(i) == []


def test_timeout_goes_to_fallback(env: dict[str, Any]) -> None:
    # contract §4: "A fallback answers a call that failed: ... timed out"
    t = time.monotonic()
    r = env["sc"].get(f"/timeoutfb/sleep/2/{uid()}")
    assert r.status_code == 200 and r.text == "slow-fallback"
    assert r.headers.get("x-riprap-fallback") == "static"
    assert time.monotonic() - t < 1.0


def test_fallback_chain_in_order(env: dict[str, Any]) -> None:
    """Section 4: several fallback lines are tried in order (stale, then static)."""
    r = env["sc"].get(f"/chain/x/{uid()}")
    assert r.status_code == 200 and r.text == "chain-static"
    assert r.headers.get("x-riprap-fallback") == "static"
    attempts(r)  # section 9: every proxied answer carries x-riprap-attempts


def test_no_healthy_endpoint_with_stale_fallback_and_no_copy(env: dict[str, Any]) -> None:
    # contract §9: "no-healthy-endpoint (503)" when the fallback chain has nothing
    sc, A = env["sc"], env["A"]
    i = uid()
    r = wait_for(lambda: (lambda r: r if reason(r) == "no-healthy-endpoint" else None)(
        sc.get(f"/sickfb/x/{uid()}")), 3)
    assert r is not None and r.status_code == 503
    sc.get(f"/sickfb/x/{i}")
    assert A.hits(i) == []


def test_outlier_ejection_stops_using_failing_endpoint(env: dict[str, Any]) -> None:
    sc = env["sc"]
    codes = [sc.get(f"/ejecting/x/{uid()}").status_code for _ in range(3)]
    assert codes.count(502) <= 1  # one failure ejects the dead endpoint (max 50%: 1 of 2)
    for _ in range(6):
        r = sc.get(f"/ejecting/x/{uid()}")
        assert r.status_code == 200 and r.headers["x-upstream"] == "A"


def test_weights_respected(env: dict[str, Any]) -> None:
    # contract §5 balance: "weights respected" (round-robin)
    sc = env["sc"]
    ups = [sc.get(f"/weighted/x/{uid()}").headers["x-upstream"] for _ in range(40)]
    assert 24 <= ups.count("A") <= 36, ups.count("A")


def test_shard_by_path_segment_counts_in_path_sent_upstream(env: dict[str, Any]) -> None:
    """Section 5: path segments count from 1 in the path as sent upstream."""
    sc = env["sc"]
    seen = set()
    for k in range(12):
        key = f"seg{k}"
        via_prefix = sc.get(f"/pathshard/{key}/x")  # upstream path /segK/x
        via_host = sc.get(f"/{key}/y", host="pathshard")  # upstream path /segK/y
        assert via_prefix.status_code == 200 and via_host.status_code == 200
        assert via_prefix.json()["path"] == f"/{key}/x"
        assert via_prefix.headers["x-upstream"] == via_host.headers["x-upstream"], key
        seen.add(via_prefix.headers["x-upstream"])
    assert seen == {"A", "B"}


def test_shard_by_query_and_cookie(env: dict[str, Any]) -> None:
    # contract §5: "shard by query NAME | cookie NAME"; no key, no default: 400
    sc = env["sc"]
    for svc in ("qshard", "cshard"):
        seen: dict[str, str] = {}
        for k in range(12):
            key = f"key{k}"
            for _ in range(2):
                if svc == "qshard":
                    r = sc.get(f"/{svc}/x?k={key}&z=1")
                else:
                    r = sc.get(f"/{svc}/x", headers={"Cookie": f"a=1; k={key}"})
                assert r.status_code == 200, (svc, r.status_code)
                assert seen.setdefault(key, r.headers["x-upstream"]) == r.headers["x-upstream"]
        assert set(seen.values()) == {"A", "B"}, svc
        assert sc.get(f"/{svc}/nokey").status_code == 400


def test_shard_policy_overrides_service(env: dict[str, Any]) -> None:
    # contract §5 shard: "any policy statements, which override the service's for that shard"
    sc = env["sc"]
    t = time.monotonic()
    r = sc.get(f"/shardpol/sleep/1/{uid()}")  # no key: shard a, timeout 300ms
    assert r.status_code == 504 and reason(r) == "timeout"
    assert time.monotonic() - t < 0.9
    key = next(k for k in (f"k{n}" for n in range(64))
               if sc.get("/shardpol/x", headers={"X-Key": k}).headers["x-upstream"] == "B")
    r = sc.get(f"/shardpol/sleep/0.5/{uid()}", headers={"X-Key": key})
    assert r.status_code == 200 and r.headers["x-upstream"] == "B"


def test_hedge_not_for_post(env: dict[str, Any]) -> None:
    """Section 4: hedges are for idempotent requests only."""
    sc, A, B = env["sc"], env["A"], env["B"]
    for _ in range(2):
        i = uid()
        r = sc.get(f"/hedged/slowon/A,B/0.3/{i}", method="POST", content=b"x")
        assert r.status_code == 200
        assert len(A.hits(i)) + len(B.hits(i)) == 1


def test_smaller_of_incoming_deadline_and_timeout(env: dict[str, Any]) -> None:
    # contract §9 Deadlines: "the smaller of it and the service's timeout"
    r = env["sc"].get(f"/slow/dl/{uid()}", headers={"x-riprap-deadline-ms": "60000"})
    assert 0 < float(r.json()["headers"]["x-riprap-deadline-ms"]) <= 300


def test_path_details_preserved(env: dict[str, Any]) -> None:
    # contract §9 Routing: "/NAME/rest ... with the prefix removed" (/NAME alone, encoding kept)
    sc = env["sc"]
    assert sc.get("/echo").json()["path"] == "/"
    assert sc.get("/echo?a=1").json()["path"] in ("/?a=1",)
    assert sc.get("/echo/a%2Fb/c%20d").json()["path"] == "/a%2Fb/c%20d"


def test_head_and_empty_answers(env: dict[str, Any]) -> None:
    # contract §9: "Every proxied answer carries x-riprap-attempts"
    sc = env["sc"]
    r = sc.get(f"/echo/x/{uid()}", method="HEAD")
    assert r.status_code == 200 and r.content == b"" and attempts(r) == 1
    r = sc.get(f"/echo/s/204/{uid()}")
    assert r.status_code == 204 and attempts(r) == 1


def test_connect_to_unknown_host_refused(env: dict[str, Any]) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", env["sc"].port), timeout=3) as s:
        s.sendall(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
        data = s.recv(4096)
    assert data.startswith(b"HTTP/1.1 403"), data[:100]
    assert b"unknown-service" in data.lower()


# --------------------------------------------------------------------------------------
# section 9: in-flight calls keep their plan; Kubernetes ConfigMap symlink swaps
# --------------------------------------------------------------------------------------
def test_inflight_call_finishes_on_its_plan(rel: dict[str, Any]) -> None:
    # contract §9: "Calls in flight finish on the plan they started with"
    sc, A = rel["sc"], rel["A"]
    extra = f"service gone {{\n    timeout 5s\n    endpoint {A.url}\n}}\n"
    save_by_rename(rel["policy"], RELOAD_BASE.format(extra=extra, **rel["fmt"]))
    assert wait_for(lambda: sc.get(f"/gone/x/{uid()}").status_code == 200, 3)
    i = uid()
    out: dict[str, Any] = {}
    cli = httpx.Client(base_url=sc.url, trust_env=False, timeout=10)
    th = threading.Thread(target=lambda: out.setdefault("r", cli.get(f"/gone/sleep/1.2/{i}")))
    th.start()
    try:
        assert wait_for(lambda: A.hits(i), 3)
        save_by_rename(rel["policy"], RELOAD_BASE.format(extra="", **rel["fmt"]))
        assert wait_for(lambda: sc.get(f"/gone/x/{uid()}").status_code == 404, 2)
    finally:
        th.join(5)
        cli.close()
    assert out["r"].status_code == 200 and out["r"].json()["upstream"] == "A"


def test_kubernetes_configmap_symlink_swap(tmp_path: Path, ups: dict[str, Any],
                                           run_sidecar: RunSidecar) -> None:
    A = ups["A"]
    port, admin = free_port(), free_port()
    v1, v2 = tmp_path / "..2026_11_27_v1", tmp_path / "..2026_11_27_v2"
    six = Upstream("SIX", host="::1")  # section 2: [IPv6] addresses, in an endpoint URL too
    body = ("service k8s {{\n    endpoint {A}\n    fallback status 200 text \"{t}\"\n}}\n"
            "service six {{\n    endpoint " + six.url + "\n}}\n"
            "service dead {{\n    endpoint http://127.0.0.1:{d}\n"
            "    fallback status 200 text \"{t}\"\n}}\n")
    for v, t in ((v1, "one"), (v2, "two")):
        v.mkdir()
        (v / "k8s.riprap").write_text(body.format(A=A.url, t=t, d=ups["DEAD"]))
    (tmp_path / "..data").symlink_to(v1.name)
    (tmp_path / "k8s.riprap").symlink_to("..data/k8s.riprap")
    # section 2: addresses may be [IPv6]:PORT
    sc = run_sidecar(tmp_path / "k8s.riprap", "--listen", f"127.0.0.1:{port}",
                     "--admin", f"[::1]:{admin}", port=port, admin=admin, admin_host="[::1]")
    try:
        assert sc.get("/dead/x").text == "one"
        assert sc.admin.get("/plan").json()["plan"]["app"] == "k8s"  # section 3: file stem
        r = sc.get(f"/six/x/{uid()}")
        assert r.status_code == 200 and r.headers["x-upstream"] == "SIX"
        tmp_link = tmp_path / "..data_tmp"
        tmp_link.symlink_to(v2.name)
        os.replace(tmp_link, tmp_path / "..data")  # the kubelet's atomic swap
        t = time.monotonic()
        assert wait_for(lambda: sc.get("/dead/x").text == "two", 3), "swap not noticed"
        assert time.monotonic() - t <= 1.2
    finally:
        sc.stop()
        six.close()


# --------------------------------------------------------------------------------------
# section 6: a failing health check restarts the app
# --------------------------------------------------------------------------------------
HEALTH_APP = """\
import os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
with open(sys.argv[2], "a") as f:
    f.write(f"start {os.getpid()}\\n")
seen = []
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        seen.append(1)
        ok = sys.argv[3] == "once" and len(seen) == 1
        self.send_response(200 if ok else 500)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _health_app_sidecar(run_sidecar: RunSidecar, tmp_path: Path, mode: str) -> tuple[Sidecar, Path]:
    app, log = tmp_path / "happ.py", tmp_path / "happ.log"
    app.write_text(HEALTH_APP)
    hp, port, admin = free_port(), free_port(), free_port()
    policy = tmp_path / "happ.riprap"
    policy.write_text(f"""\
app happ {{
    run "{sys.executable} {app} {hp} {log} {mode}"
    health GET http://127.0.0.1:{hp}/healthz every 100ms timeout 300ms fall 2
    restart backoff 100ms..1s
}}
service self {{
    endpoint http://127.0.0.1:{hp}
}}
""")
    sc = run_sidecar(policy, "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                     port=port, admin=admin)
    return sc, log


def _starts(log: Path) -> list[str]:
    try:
        return [ln for ln in log.read_text().splitlines() if ln.startswith("start")]
    except OSError:
        return []


def test_supervised_app_restarted_when_health_fails(tmp_path: Path, run_sidecar: RunSidecar) -> None:
    """Section 6: restarted when its health check fails `fall` times in a row."""
    sc, log = _health_app_sidecar(run_sidecar, tmp_path, "once")
    try:
        starts = wait_for(lambda: (lambda ls: ls if len(ls) >= 2 else None)(_starts(log)), 4)
        assert starts, f"not restarted on failed health: {_starts(log)}"
        first = int(starts[0].split()[1])
        assert wait_for(lambda: not _alive(first), 2), "the unhealthy app was not stopped"
    finally:
        sc.stop()
    last = int(_starts(log)[-1].split()[1])
    assert wait_for(lambda: not _alive(last), 12), "app left running after the sidecar stopped"


def test_never_healthy_app_restarted_after_fall_checks(tmp_path: Path,
                                                      run_sidecar: RunSidecar) -> None:
    # contract §6: "restarts it when ... its health check fails fall times in a row"
    sc, log = _health_app_sidecar(run_sidecar, tmp_path, "never")
    try:
        # every 100ms, fall 2: a few hundred ms after it starts, plus the 100ms backoff (the
        # wait is polled: the bound only matters on a loaded machine, where Python starts slowly)
        assert wait_for(lambda: len(_starts(log)) >= 2, 8.0), "not restarted"
    finally:
        sc.stop()


# --------------------------------------------------------------------------------------
# section 8: riprap run with a file that does not compile / does not exist
# --------------------------------------------------------------------------------------
def test_run_refuses_broken_and_missing_files(tmp_path: Path) -> None:
    # contract §8: run FILE; exit codes as check (1 errors, 2 I/O)
    bad = tmp_path / "bad.riprap"
    bad.write_text("service x {\n    retry lots\n}\n")
    cp = subprocess.run([*riprap_cmd(), "run", str(bad), "--listen", f"127.0.0.1:{free_port()}",
                         "--admin", f"127.0.0.1:{free_port()}"],
                        capture_output=True, env=clean_env(), timeout=20)
    assert cp.returncode == 1
    assert b"bad.riprap:2:" in cp.stderr + cp.stdout
    cp = subprocess.run([*riprap_cmd(), "run", str(tmp_path / "nope.riprap")],
                        capture_output=True, env=clean_env(), timeout=20)
    assert cp.returncode == 2


def test_retry_not_started_when_time_left_below_median(env: dict[str, Any]) -> None:
    """Section 4: a retry is not started when the time left is shorter than the observed
    median latency: the call fails with 504 at once (no fallback here)."""
    sc, A = env["sc"], env["A"]
    for _ in range(2):  # the first call teaches the median (~250ms)
        i = uid()
        t = time.monotonic()
        r = sc.get(f"/median/sleepcode/0.25/503/{i}")
        took = time.monotonic() - t
    # attempt 1 ends at ~0.25s (0.35s left: retry), attempt 2 at ~0.5s (0.1s left < 0.25s)
    assert len(A.hits(i)) == 2, [h["path"] for h in A.hits(i)]
    assert r.status_code == 504 and reason(r) == "timeout"
    assert took < 0.7


def test_retry_deadline_header_shrinks(env: dict[str, Any]) -> None:
    # contract §9 Deadlines: "the remaining time is sent upstream as x-riprap-deadline-ms"
    sc, A = env["sc"], env["A"]
    i = uid()
    sc.get(f"/median/sleepcode/0.05/503/{i}")
    hits = sorted(A.hits(i), key=lambda h: h["t"])
    assert len(hits) >= 2
    d = [float(h["headers"]["x-riprap-deadline-ms"]) for h in hits]
    assert d[0] <= 600 and d[1] < d[0] - 30


def test_breaker_failure_rate(env: dict[str, Any]) -> None:
    # contract §4 breaker failure-rate P% window N min M
    sc = env["sc"]
    assert sc.get(f"/frbrk/x/{uid()}").status_code == 200
    assert sc.get(f"/frbrk/s/500/{uid()}").status_code == 500
    assert sc.get(f"/frbrk/x/{uid()}").status_code == 200  # 3 seen: under min 4
    assert sc.get(f"/frbrk/s/500/{uid()}").status_code == 500  # 2 of 4 = 50%
    r = sc.get(f"/frbrk/x/{uid()}")
    assert r.status_code == 503 and reason(r) == "breaker-open"


def test_breaker_slow_calls_count_as_failures(env: dict[str, Any]) -> None:
    # contract §4 breaker: "with slow D, a call slower than D counts as a failure"
    sc = env["sc"]
    assert sc.get(f"/slowbrk/sleep/0.2/{uid()}").status_code == 200
    assert sc.get(f"/slowbrk/sleep/0.2/{uid()}").status_code == 200
    r = sc.get(f"/slowbrk/x/{uid()}")
    assert r.status_code == 503 and reason(r) == "breaker-open"


def test_breaker_scope_is_each_shard(env: dict[str, Any]) -> None:
    sc = env["sc"]
    keys: dict[str, str] = {}
    for n in range(32):
        k = f"k{n}"
        # 404s do not count as failures (section 4)
        keys.setdefault(sc.get(f"/shbrk/s/404/{uid()}", headers={"X-Key": k})
                        .headers["x-upstream"], k)
    ka, kb = keys["A"], keys["B"]
    assert sc.get(f"/shbrk/s/500/{uid()}", headers={"X-Key": ka}).status_code == 500
    r = sc.get(f"/shbrk/x/{uid()}", headers={"X-Key": ka})
    assert r.status_code == 503 and reason(r) == "breaker-open"
    r = sc.get(f"/shbrk/x/{uid()}", headers={"X-Key": kb})
    assert r.status_code == 200 and r.headers["x-upstream"] == "B"


def test_retry_goes_elsewhere_with_default_balancer(env: dict[str, Any]) -> None:
    # contract §4: "A retry goes to a different endpoint"; §5 default least-request
    sc, A, B = env["sc"], env["A"], env["B"]
    for _ in range(4):
        i = uid()
        r = sc.get(f"/pairlr/s/503/{i}")
        assert attempts(r) == 2 and len(A.hits(i)) == 1 and len(B.hits(i)) == 1


def test_retry_on_reset(env: dict[str, Any]) -> None:
    # contract §4 retry COND reset; non-idempotent methods not retried
    sc = env["sc"]
    for _ in range(2):
        r = sc.get(f"/resetretry/reseton/A/{uid()}")
        assert r.status_code == 200 and r.headers["x-upstream"] == "B"
    statuses = set()
    for _ in range(2):  # POST: not retried after a reset (something was sent)
        r = sc.get(f"/resetretry/reseton/A/{uid()}", method="POST", content=b"x")
        statuses.add((r.status_code, attempts(r)))
    assert statuses == {(502, 1), (200, 1)}


def test_stale_copy_is_per_method(env: dict[str, Any]) -> None:
    # contract §4 fallback stale: "to the same method and URL"
    sc = env["sc"]
    path = f"/stalesvc/flip/{uid()}"
    assert sc.get(path).status_code == 200
    r = sc.get(path, method="DELETE")
    assert r.status_code == 503 and r.headers.get("x-riprap-fallback") != "stale"


def test_hedge_first_good_answer_wins(env: dict[str, Any]) -> None:
    """Section 4: the first *good* answer wins: a fast 503 from the hedge loses to a 200."""
    sc, A, B = env["sc"], env["A"], env["B"]
    started_on_a = 0
    for _ in range(4):
        i = uid()
        r = sc.get(f"/hedgegood/goodbad/0.3/{i}")
        if A.hits(i):  # A is slow: after 50ms the hedge went to B, whose fast 503 lost
            started_on_a += 1
            assert r.status_code == 200 and r.headers["x-upstream"] == "A", \
                (r.status_code, len(B.hits(i)))
            assert len(B.hits(i)) == 1
        else:  # started on B: its 503 came before the hedge delay, so no copy was sent
            assert r.status_code == 503 and len(B.hits(i)) == 1, r.status_code
    assert started_on_a >= 1  # round-robin over two endpoints: some call starts on A


def test_limit_default_burst_is_one_second(env: dict[str, Any]) -> None:
    # contract §4 limit: "burst B (default: one second of R)"
    sc = env["sc"]
    codes = [sc.get(f"/limdef/x/{uid()}").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]


def _slow_upload(env: dict[str, Any], first: int) -> None:
    sc, A = env["sc"], env["A"]
    i = uid()
    sent: dict[str, float] = {}

    def gen() -> Iterator[bytes]:
        yield b"a" * first
        time.sleep(0.6)
        sent["last"] = time.monotonic()
        yield b"b" * 1000

    r = sc.get(f"/echo/size/{i}", method="POST", content=gen())
    assert r.status_code == 200 and r.json()["size"] == first + 1000
    assert A.hits(i)[0]["t0"] < sent["last"] - 0.3, "upstream call began only after the body"


def test_request_body_streams_upstream_without_retries(env: dict[str, Any]) -> None:
    """Section 9: bodies stream; buffering is for retries (echo has none)."""
    _slow_upload(env, 1000)


def test_request_body_above_bound_streams_upstream(env: dict[str, Any]) -> None:
    # contract §9: "Bodies stream"; above the bound "the call is not retried"
    _slow_upload(env, 1_200_000)


def test_host_routing_wins_over_path_prefix(env: dict[str, Any]) -> None:
    # contract §9 Routing: Host first, "Otherwise, a path /NAME/rest"
    r = env["sc"].get("/pair/x", host="echo")
    assert r.status_code == 200 and r.json()["path"] == "/pair/x"


def test_garbage_deadline_header_ignored(env: dict[str, Any]) -> None:
    # contract §9 Deadlines (silent on garbage: Envoy ignores a bad x-envoy-expected-rq-timeout-ms)
    r = env["sc"].get(f"/echo/x/{uid()}", headers={"x-riprap-deadline-ms": "soon"})
    assert r.status_code == 200


def test_retry_budget_caps_retries(env: dict[str, Any]) -> None:
    # contract §4 retry budget: "caps retries at P% of requests over a 10 s window"
    sc, A = env["sc"], env["A"]
    i = uid()
    for n in range(20):
        r = sc.get(f"/budgeted/s/503/{i}/{n}")
        assert r.status_code == 503
    # without a budget: 20 x 4 = 80 attempts; 10% of 20 calls (min 1/s) is a few retries
    assert len(A.hits(i)) < 40, len(A.hits(i))


def test_hedge_at_p95_starts_at_100ms_before_20_calls(env: dict[str, Any]) -> None:
    # contract §4 hedge at pNN: "100ms until 20 calls were seen"
    sc = env["sc"]
    for _ in range(2):
        t = time.monotonic()
        r = sc.get(f"/hedgep95/slowon/A/1.5/{uid()}")
        took = time.monotonic() - t
        assert r.status_code == 200 and r.headers["x-upstream"] == "B"
        assert took < 0.6


def test_failover_tier_2_after_tier_1(env: dict[str, Any]) -> None:
    # contract §5 failover tier T: "a tier is used only when every endpoint of the tiers before it is unhealthy"
    sc = env["sc"]
    r = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(
        sc.get(f"/tiers2/x/{uid()}")), 3)
    assert r is not None and r.headers["x-upstream"] == "B"


def test_health_expect_status(env: dict[str, Any]) -> None:
    # contract §5 health: "expect STATUS"
    sc, A = env["sc"], env["A"]
    assert wait_for(lambda: len(A.hits("/s/404/expect")) >= 3, 3)
    for _ in range(3):
        r = sc.get(f"/expect/x/{uid()}")
        assert r.status_code == 200 and r.headers.get("x-upstream") == "A", r.text


def test_stale_copy_expires(env: dict[str, Any]) -> None:
    """Section 4: fallback stale D: only a last good response younger than D."""
    sc = env["sc"]
    path = f"/staleshort/flip/{uid()}"
    assert sc.get(path).status_code == 200
    time.sleep(0.4)
    r = sc.get(path)
    assert r.status_code == 503 and r.headers.get("x-riprap-fallback") is None


def test_exponential_backoff_without_jitter(env: dict[str, Any]) -> None:
    # contract §4 retry: "backoff A..B is exponential from A doubling up to B"; jitter none
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/backoffx/s/503/{i}")
    assert r.status_code == 503 and attempts(r) == 3
    t = [h["t0"] for h in sorted(A.hits(i), key=lambda h: h["t0"])]
    g1, g2 = t[1] - t[0], t[2] - t[1]
    assert 0.09 <= g1 and 0.19 <= g2 and g2 > 1.4 * g1 and g1 < 0.4, (g1, g2)


def test_reload_watches_a_file_named_by_a_new_plan(rel: dict[str, Any]) -> None:
    """Section 9: a file the policy names (here, named only after a reload, in another
    directory) is watched too."""
    sc, d = rel["sc"], rel["dir"]
    (d / "more").mkdir(exist_ok=True)
    (d / "more" / "other.json").write_text('{"o": 1}')
    extra = ('service fbo {\n    endpoint ' + rel["fmt"]["dead"] +
             '\n    fallback status 200 file "more/other.json"\n}\n')
    save_by_rename(rel["policy"], RELOAD_BASE.format(extra=extra, **rel["fmt"]))
    assert wait_for(lambda: sc.get("/fbo/x").json() == {"o": 1}, 3)
    time.sleep(0.1)
    (d / "more" / "other.json").write_text('{"o": 2}')
    t = time.monotonic()
    assert wait_for(lambda: sc.get("/fbo/x").json() == {"o": 2}, 3), "change not seen"
    assert time.monotonic() - t <= 1.2


def _raw(port: int, data: bytes) -> bytes:
    """Send raw bytes (the request asks the server to close) and read to the end."""
    import socket

    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_broken_upstream_answer_is_502(env: dict[str, Any]) -> None:
    # contract §9: "upstream-failed (502, no answer could be had: refused, reset, broken)"
    r = env["sc"].get(f"/resetter/garbage/{uid()}")
    assert r.status_code == 502 and reason(r) == "upstream-failed"


def test_http10_request_without_host_uses_path_prefix(env: dict[str, Any]) -> None:
    # contract §9 Routing: "Otherwise, a path /NAME/rest goes to service NAME"
    i = uid()
    out = _raw(env["sc"].port, f"GET /echo/h10/{i} HTTP/1.0\r\n\r\n".encode())
    assert out.split(b"\r\n", 1)[0].split(b" ")[1] == b"200", out[:200]
    assert env["A"].hits(i)[0]["path"] == f"/h10/{i}"


def test_absolute_form_wins_over_host_header(env: dict[str, Any]) -> None:
    """Section 9: never forwards to a host the plan does not name, whatever Host says."""
    i = uid()
    out = _raw(env["sc"].port, f"GET http://evil.example/{i} HTTP/1.1\r\nHost: echo\r\n"
                               "Connection: close\r\n\r\n".encode())
    assert out.split(b"\r\n", 1)[0].split(b" ")[1] == b"403", out[:200]
    assert b"unknown-service" in out
    assert env["A"].hits(i) == [] and env["B"].hits(i) == []


def test_breaker_reopen_doubles_open_time(env: dict[str, Any]) -> None:
    """Section 4: open for D, doubling on each reopen; a failed probe opens it again."""
    sc = env["sc"]
    assert sc.get(f"/brkreopen/s/500/{uid()}").status_code == 500
    assert reason(sc.get(f"/brkreopen/x/{uid()}")) == "breaker-open"
    time.sleep(0.25)
    assert sc.get(f"/brkreopen/s/500/{uid()}").status_code == 500  # the probe fails
    time.sleep(0.25)  # open for 400ms now: still open at 250ms
    assert reason(sc.get(f"/brkreopen/x/{uid()}")) == "breaker-open"
    time.sleep(0.25)
    assert sc.get(f"/brkreopen/x/{uid()}").status_code == 200


def test_outlier_never_ejects_more_than_max(env: dict[str, Any]) -> None:
    """Section 5: never more than P% of a tier ejected at once (34% of 3: one)."""
    sc = env["sc"]
    for _ in range(6):
        sc.get(f"/outmax/x/{uid()}")
    codes = [sc.get(f"/outmax/x/{uid()}").status_code for _ in range(8)]
    assert 502 in codes and 200 in codes, codes


def test_encoded_answer_passed_untouched(env: dict[str, Any]) -> None:
    # contract §9: bodies stream, passed "as the upstream sent it"
    import gzip

    r = env["sc"].get(f"/echo/gzip/{uid()}")
    assert r.status_code == 200 and r.headers.get("content-encoding") == "gzip"
    assert r.content == b"hello gzip " * 50  # httpx decodes: it must be valid gzip
    with env["sc"].client.stream("GET", f"/echo/gzip/{uid()}") as resp:
        raw = b"".join(resp.iter_raw())
    assert gzip.decompress(raw) == b"hello gzip " * 50


def test_redirect_not_followed(env: dict[str, Any]) -> None:
    # contract §9: a proxy passes the upstream's answer (Envoy/nginx never follow redirects)
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/echo/redirect/{i}")
    assert r.status_code == 302 and r.headers["location"] == "/elsewhere"
    assert len(A.hits(i)) == 1 and A.hits("/elsewhere") == []


def test_repeated_headers_preserved(env: dict[str, Any]) -> None:
    # contract §9: only hop-by-hop headers are dropped
    r = env["sc"].get(f"/echo/cookies/{uid()}")
    assert sorted(r.headers.get_list("set-cookie")) == ["a=1; Path=/", "b=2; Path=/"]
    assert ",".join(r.headers.get_list("x-multi")).replace(" ", "") == "one,two"


def test_health_rise_needs_consecutive_passes(env: dict[str, Any]) -> None:
    # contract §5 health: "rise N"
    sc, A = env["sc"], env["A"]
    assert wait_for(lambda: sc.get("/rise/x").headers.get("x-upstream") == "A", 2)
    A.unhealthy.add("rise")
    assert wait_for(lambda: sc.get("/rise/x").text == "rise-fallback", 2)
    A.unhealthy.discard("rise")
    t = time.monotonic()
    assert wait_for(lambda: sc.get("/rise/x").headers.get("x-upstream") == "A", 3)
    took = time.monotonic() - t
    assert 0.2 <= took <= 1.2, took  # rise 3 at every 100ms


def test_weights_respected_by_least_request(env: dict[str, Any]) -> None:
    # contract §5 balance: "default least-request (power of two choices), weights respected"
    sc = env["sc"]
    ups = [sc.get(f"/wlr/x/{uid()}").headers["x-upstream"] for _ in range(60)]
    assert 33 <= ups.count("A") <= 56, ups.count("A")


def test_hedge_max_sends_more_copies(env: dict[str, Any]) -> None:
    # contract §4 hedge: "send up to N extra copies, to other endpoints"
    sc = env["sc"]
    for _ in range(3):
        t = time.monotonic()
        r = sc.get(f"/hedge3/slowon/A,B/1.5/{uid()}")
        assert r.status_code == 200 and r.headers["x-upstream"] == "C"
        assert time.monotonic() - t < 0.8


def test_many_concurrent_calls(env: dict[str, Any]) -> None:
    sc = env["sc"]
    from concurrent.futures import ThreadPoolExecutor

    with httpx.Client(base_url=sc.url, trust_env=False, timeout=10,
                      limits=httpx.Limits(max_connections=64)) as c:
        t = time.monotonic()
        with ThreadPoolExecutor(48) as pool:
            codes = list(pool.map(lambda n: c.get(f"/echo/sleep/0.3/{n}").status_code,
                                  range(48)))
        took = time.monotonic() - t
    assert codes == [200] * 48
    assert took < 2.0, took


def test_breaker_all_probes_must_succeed(env: dict[str, Any]) -> None:
    """Section 4: K probes are let through; all succeed: closed; one fails: open again."""
    sc = env["sc"]
    for _ in range(3):
        assert sc.get(f"/brkk2/s/500/{uid()}").status_code == 500
    assert reason(sc.get(f"/brkk2/x/{uid()}")) == "breaker-open"
    time.sleep(0.25)
    assert sc.get(f"/brkk2/x/{uid()}").status_code == 200  # probe 1 of 2 succeeds
    assert sc.get(f"/brkk2/s/500/{uid()}").status_code == 500  # probe 2 fails
    r = sc.get(f"/brkk2/x/{uid()}")
    assert r.status_code == 503 and reason(r) == "breaker-open"


def test_service_fallback_gets_the_request_body(env: dict[str, Any]) -> None:
    # contract §4 fallback service NAME: "send the failed call to another declared service"
    sc = env["sc"]
    i = uid()
    r = sc.get(f"/fbsvc/post/{i}", method="POST", content=b"the-body",
               headers={"X-Custom": "kept"})
    assert r.status_code == 200 and r.headers.get("x-riprap-fallback") == "service"
    doc = r.json()
    assert doc["method"] == "POST" and doc["body"] == "the-body"
    assert doc["path"] == f"/post/{i}" and doc["headers"].get("x-custom") == "kept"


def test_fallback_chain_after_failed_service_fallback(env: dict[str, Any]) -> None:
    # contract §4: "Several fallback lines form a chain, tried in order"
    r = env["sc"].get(f"/fbchain2/x/{uid()}")
    assert r.status_code == 200 and r.text == "second-fallback"
    assert r.headers.get("x-riprap-fallback") == "static"


def test_path_segment_shard_without_segment_is_400(env: dict[str, Any]) -> None:
    # contract §5 shard default: "without it they get 400"
    r = env["sc"].get("/pathshard/")
    assert r.status_code == 400


def test_deleted_fallback_file_keeps_plan(rel: dict[str, Any]) -> None:
    # contract §9: "A change that does not compile leaves the running plan in force"
    sc, d = rel["sc"], rel["dir"]
    save_by_rename(rel["policy"], RELOAD_BASE.format(extra="", **rel["fmt"]))
    (d / "fb.json").write_text('{"v": 7}')
    assert wait_for(lambda: sc.get("/one/x").json() == {"v": 7}, 3)
    (d / "fb.json").unlink()
    doc = wait_for(lambda: (lambda d: d if d["last_error"] else None)(
        sc.admin.get("/plan").json()), 3)
    try:
        assert doc is not None, "a missing fallback file was not reported"
        r = sc.get("/one/x")
        assert r.status_code == 200 and r.json() == {"v": 7}  # the running plan answers
    finally:
        (d / "fb.json").write_text('{"v": 8}')
    assert wait_for(lambda: sc.admin.get("/plan").json()["last_error"] is None, 3)
    assert sc.get("/one/x").json() == {"v": 8}


def test_health_check_method(env: dict[str, Any]) -> None:
    # contract §5 health [METHOD] PATH
    A = env["A"]
    assert wait_for(lambda: A.hits("/hchead"), 3)
    assert {h["method"] for h in A.hits("/hchead")} == {"HEAD"}


def test_use_policy_and_service_override(env: dict[str, Any]) -> None:
    """Section 4 precedence: a used policy applies; the service's own lines replace it."""
    sc, A = env["sc"], env["A"]
    t = time.monotonic()
    r = sc.get(f"/usesvc/sleep/1/{uid()}")
    assert r.status_code == 504 and time.monotonic() - t < 0.7
    i = uid()
    assert attempts(sc.get(f"/usesvc/s/503/{i}")) == 2 and len(A.hits(i)) == 2
    r = sc.get(f"/useover/sleep/0.5/{uid()}")
    assert r.status_code == 200
    i = uid()
    assert attempts(sc.get(f"/useover/s/503/{i}")) == 2  # retry still from the policy


def test_balance_random_uses_every_endpoint(env: dict[str, Any]) -> None:
    # contract §5 balance random
    sc = env["sc"]
    seen = {sc.get(f"/rnd/x/{uid()}").headers["x-upstream"] for _ in range(30)}
    assert seen == {"A", "B"}


def test_client_gone_mid_answer_frees_its_slot(env: dict[str, Any]) -> None:
    """Section 9: a client that disconnects (here: while the answer streams) cancels its
    upstream call: its concurrency slot is free again."""
    sc = env["sc"]
    with httpx.Client(base_url=sc.url, trust_env=False, timeout=5) as c:
        with c.stream("GET", f"/capdisc/drip/30/0.1/{uid()}") as resp:
            assert resp.status_code == 200
            next(resp.iter_raw())
            r = sc.get(f"/capdisc/x/{uid()}")
            assert r.status_code == 503 and reason(r) == "overloaded"  # still streaming
    # leaving the blocks closed the connection mid-answer
    r = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(
        sc.get(f"/capdisc/x/{uid()}")), 1.0, step=0.1)
    assert r is not None, "the abandoned call still holds the concurrency slot"


def test_reload_vim_style_backup_then_write(rel: dict[str, Any]) -> None:
    """Section 9: editors that save by rename (vim: rename to a backup, write a new file)."""
    sc, A = rel["sc"], rel["A"]
    policy = rel["policy"]
    extra = f"service vim {{\n    endpoint {A.url}\n}}\n"
    os.replace(policy, policy.with_name(policy.name + "~"))
    policy.write_text(RELOAD_BASE.format(extra=extra, **rel["fmt"]), encoding="utf-8")
    t = time.monotonic()
    assert wait_for(lambda: sc.get(f"/vim/x/{uid()}").status_code == 200, 3)
    assert time.monotonic() - t <= 1.2
    assert wait_for(lambda: sc.admin.get("/plan").json()["last_error"] is None, 2)


def test_run_refuses_a_plan_json_that_fails_the_schema(tmp_path: Path) -> None:
    """Section 7: the plan is validated against its schema on every load."""
    src = tmp_path / "ok.riprap"
    src.write_text("service s {\n    endpoint http://127.0.0.1:9\n}\n")
    out = tmp_path / "ok.json"
    cp = subprocess.run([*riprap_cmd(), "compile", str(src), "-o", str(out)],
                        capture_output=True, env=clean_env(), timeout=30)
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(out.read_text())
    doc["version"] = 99
    doc["services"]["s"]["timeout"] = "soon"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    cp = subprocess.run([*riprap_cmd(), "run", str(bad), "--listen", f"127.0.0.1:{free_port()}",
                         "--admin", f"127.0.0.1:{free_port()}"],
                        capture_output=True, env=clean_env(), timeout=20)
    assert cp.returncode not in (0, None)
    assert b"Traceback" not in cp.stderr


def test_retried_4xx_is_still_never_replaced_by_fallback(env: dict[str, Any]) -> None:
    # contract §4: retry on a status; "It never replaces an upstream 4xx."
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/retry4xx/s/429/{i}")
    assert len(A.hits(i)) == 2 and attempts(r) == 2
    assert r.status_code == 429 and r.text == "A says 429"
    assert "x-riprap-fallback" not in r.headers


def test_half_open_breaker_lets_only_k_probes_through(env: dict[str, Any]) -> None:
    # contract §4 breaker: "then K (default 1) probe calls are let through"
    sc, A = env["sc"], env["A"]
    assert sc.get(f"/brkhalf/s/500/{uid()}").status_code == 500
    time.sleep(0.25)
    i = uid()
    out: dict[str, Any] = {}
    cli = httpx.Client(base_url=sc.url, trust_env=False, timeout=10)
    th = threading.Thread(target=lambda: out.setdefault("r", cli.get(f"/brkhalf/sleep/0.4/{i}")))
    th.start()
    try:
        assert wait_for(lambda: A.hits(i), 2)  # the one probe is in flight
        j = uid()
        r = sc.get(f"/brkhalf/x/{j}")
        assert r.status_code == 503 and reason(r) == "breaker-open" and A.hits(j) == []
    finally:
        th.join(5)
        cli.close()
    assert out["r"].status_code == 200
    assert sc.get(f"/brkhalf/x/{uid()}").status_code == 200  # the probe closed it


def test_plan_endpoint_serves_the_compiled_plan(env: dict[str, Any]) -> None:
    # contract §9 Admin: "/plan ... plan (the running plan)"; §7 the plan `riprap compile` prints
    cp = subprocess.run([*riprap_cmd(), "compile", str(env["policy"])], capture_output=True,
                        env=clean_env(), timeout=30, cwd=str(env["dir"]))
    assert cp.returncode == 0, cp.stderr
    compiled = json.loads(cp.stdout)
    running = env["sc"].admin.get("/plan").json()["plan"]
    for doc in (compiled, running):  # the addresses may show the command-line overrides
        doc.pop("listen", None)
        doc.pop("admin", None)
    assert running == compiled


def test_repeated_request_headers_preserved(env: dict[str, Any]) -> None:
    # contract §9: only hop-by-hop headers are dropped (both directions)
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/echo/dup/{i}", headers=[("X-Two", "1"), ("X-Two", "2"), ("Accept", "a/b")],
               method="PATCH", content=b"patch-body")
    assert r.status_code == 200
    hit = A.hits(i)[0]
    assert [v for k, v in hit["raw_headers"] if k == "x-two"] == ["1", "2"]
    assert hit["method"] == "PATCH" and hit["body"] == "patch-body"


def test_retry_after_http_date_is_honoured(env: dict[str, Any]) -> None:
    # contract §4: "A Retry-After from the upstream is honoured within the deadline"
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/ra/raflip/date2/{i}")
    assert r.status_code == 200 and attempts(r) == 2
    hits = A.hits(i)
    assert len(hits) == 2 and hits[1]["t0"] - hits[0]["t0"] >= 0.9
