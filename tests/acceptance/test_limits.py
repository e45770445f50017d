"""Acceptance: rate limits, concurrency and the retry budget.

A real `riprap run` on loopback with this file's own small policy, next to its tests
(written from /work/shared/language.md; each test cites its contract section). The
sidecar comes from the `run_sidecar` fixture (conftest.py), the upstreams from `ups`."""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import httpx
import pytest

from acc_kit import (
    RunSidecar,
    attempts,
    reason,
    sidecar_env,
    uid,
    wait_for,
)
from engine_differences import ENVOY_DIFFERENCES

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
]

# the services of this file's policy (the admin listener names each one)
SERVICES = ['echo', 'limited', 'capped', 'perkey', 'queued', 'queuedlong', 'capfb', 'capdisc', 'limfb', 'budgeted', 'slowbucket', 'limstate', 'limdef']


def policy(A: str, B: str, C: str, DEAD: str, listen: int, admin: int) -> str:
    return f"""\
app acc
listen 127.0.0.1:{listen}
admin 127.0.0.1:{admin}

service echo {{
    host echo.internal, alias.example
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

service perkey {{
    limit 1/m burst 1 per header X-User
    endpoint {A}
}}

service queued {{
    concurrency 1 queue 1 queue-timeout 300ms
    endpoint {A}
}}

service queuedlong {{
    concurrency 1 queue 1 queue-timeout 5s
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

service budgeted {{
    retry 3 on 503 backoff 1ms budget 10% min 1/s
    endpoint {A}
}}

service slowbucket {{
    limit 30/m burst 1
    endpoint {A}
}}

service limstate {{
    limit 1/m burst 2
    endpoint {A}
}}

service limdef {{
    limit 3/s
    endpoint {A}
}}

"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, ups: dict[str, Any],
        run_sidecar: RunSidecar) -> Iterator[dict[str, Any]]:
    yield from sidecar_env(policy, tmp_path_factory, ups, run_sidecar)


def test_limit_burst_then_429_with_retry_after(env: dict[str, Any]) -> None:
    # contract §4 limit: "Over the limit: 429 with Retry-After"; §5 "A token bucket starts full"
    sc = env["sc"]
    codes = [sc.get(f"/limited/x/{uid()}") for _ in range(3)]
    assert [r.status_code for r in codes[:2]] == [200, 200]  # the bucket starts full (5)
    r = codes[2]
    assert r.status_code == 429 and reason(r) == "rate-limited"
    attempts(r)
    assert float(r.headers["retry-after"]) > 0


def test_limit_retry_after_says_when_a_token_is_back(env: dict[str, Any]) -> None:
    """Section 4 limit: "Over the limit: 429 with Retry-After": the seconds until the bucket
    has a token again (30/m: one every 2 s, not a generic 1 or 60), and a client that waits
    that long is served."""
    sc = env["sc"]
    assert sc.get(f"/slowbucket/x/{uid()}").status_code == 200
    r = sc.get(f"/slowbucket/x/{uid()}")
    assert r.status_code == 429 and reason(r) == "rate-limited"
    wait = float(r.headers["retry-after"])
    assert 1 <= wait <= 2, wait
    time.sleep(wait + 0.3)
    assert sc.get(f"/slowbucket/x/{uid()}").status_code == 200


def test_limit_per_header_long_values_keep_their_own_buckets(env: dict[str, Any]) -> None:
    """Section 4 limit ... per header: one bucket per header value, a long value included
    (kept as a fixed-size digest on the Python engine): two long values that differ only
    at their end are two buckets."""
    sc = env["sc"]
    one, two = "u" * 4000 + "-one", "u" * 4000 + "-two"
    assert sc.get(f"/perkey/x/{uid()}", headers={"X-User": one}).status_code == 200
    r = sc.get(f"/perkey/x/{uid()}", headers={"X-User": one})
    assert r.status_code == 429 and reason(r) == "rate-limited"
    assert sc.get(f"/perkey/x/{uid()}", headers={"X-User": two}).status_code == 200


def test_limited_calls_show_at_state_and_in_metrics(env: dict[str, Any]) -> None:
    """Section 9 Admin: `/state` has the limiter state of every service, and `/metrics`
    counts the calls a limit refused."""
    from prometheus_client.parser import text_string_to_metric_families

    sc = env["sc"]

    def refused() -> tuple[float, float]:
        lim = sc.admin.get("/state").json()["services"]["limstate"]["limiter"]
        total = 0.0
        for fam in text_string_to_metric_families(sc.admin.get("/metrics").text):
            for smp in fam.samples:
                if smp.name == "riprap_rejections_total" and smp.labels.get("service") == "limstate" \
                        and smp.labels.get("by") == "limit":
                    total += smp.value
        return float(lim["limited"]), total

    before = refused()
    codes = [sc.get(f"/limstate/x/{uid()}").status_code for _ in range(8)]
    over = codes.count(429)
    assert over >= 6, codes  # 1/m, burst 2
    after = refused()
    assert after[0] - before[0] >= over, (before, after)
    assert after[1] - before[1] >= over, (before, after)


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


def test_limit_per_header_keeps_separate_buckets(env: dict[str, Any]) -> None:
    # contract §4 limit: "per header keeps one bucket per header value"
    sc = env["sc"]
    assert sc.get(f"/perkey/x/{uid()}", headers={"X-User": "u1"}).status_code == 200
    r = sc.get(f"/perkey/x/{uid()}", headers={"X-User": "u1"})
    assert r.status_code == 429 and reason(r) == "rate-limited" and "retry-after" in r.headers
    assert sc.get(f"/perkey/x/{uid()}", headers={"X-User": "u2"}).status_code == 200


def test_concurrency_queue_then_503(env: dict[str, Any]) -> None:
    # contract §4 concurrency N queue Q: "up to Q wait ...; the rest get 503 at once"
    sc, A = env["sc"], env["A"]
    res: dict[str, Any] = {}
    clients = [httpx.Client(base_url=sc.url, trust_env=False, timeout=10) for _ in range(2)]

    def call(k: int, path: str) -> None:
        t = time.monotonic()
        res[k] = (clients[k].get(path), time.monotonic() - t)

    try:
        i = uid()
        th0 = threading.Thread(target=call, args=(0, f"/queuedlong/sleep/1/{i}"))
        th0.start()
        assert wait_for(lambda: A.hits(i), 3)
        th1 = threading.Thread(target=call, args=(1, f"/queuedlong/x/{uid()}"))
        th1.start()
        assert wait_for(lambda: sc.admin.get("/state").json()["services"]["queuedlong"]["bulkhead"]
                        ["queued"] == 1, 3), "the second call never queued"
        t = time.monotonic()
        r = sc.get(f"/queuedlong/x/{uid()}")  # one in flight, one queued: at once 503
        assert r.status_code == 503 and reason(r) == "overloaded"
        assert time.monotonic() - t < 0.25
        th0.join(5)
        th1.join(5)
        assert res[0][0].status_code == 200
        assert res[1][0].status_code == 200  # waited in the queue, then served
    finally:
        for c in clients:
            c.close()


def test_concurrency_queue_timeout(env: dict[str, Any], engine: str) -> None:
    # contract §4 concurrency ... queue-timeout D: a queued call waits "each at most D"
    sc, A = env["sc"], env["A"]
    i = uid()
    with httpx.Client(base_url=sc.url, trust_env=False, timeout=10) as cli:
        th0 = threading.Thread(target=lambda: cli.get(f"/queued/sleep/1.5/{i}"))
        th0.start()
        try:
            assert wait_for(lambda: A.hits(i), 3)
            t = time.monotonic()
            r = sc.get(f"/queued/x/{uid()}")
            took = time.monotonic() - t
        finally:
            th0.join(5)
    if engine == "envoy":
        # the closest thing (engine_differences: concurrency-queue-timeout): the queued call
        # waits for the slot, not at most queue-timeout, and is served once it frees
        assert r.status_code == 200, ENVOY_DIFFERENCES["concurrency-queue-timeout"].what
        assert took >= 0.8, took
        return
    assert r.status_code == 503 and reason(r) == "overloaded"
    assert 0.2 <= took < 0.9, took  # queue-timeout 300ms


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


def test_limit_default_burst_is_one_second(env: dict[str, Any]) -> None:
    # contract §4 limit: "burst B (default: one second of R)"
    sc = env["sc"]
    codes = [sc.get(f"/limdef/x/{uid()}").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]


def test_retry_budget_caps_retries(env: dict[str, Any]) -> None:
    # contract §4 retry budget: "caps retries at P% of requests over a 10 s window"
    sc, A = env["sc"], env["A"]
    i = uid()
    for n in range(20):
        r = sc.get(f"/budgeted/s/503/{i}/{n}")
        assert r.status_code == 503
    # without a budget: 20 x 4 = 80 attempts; with it, max(10% of 20 calls, 1/s over the
    # 10 s window) = 10 retries: 30 attempts
    assert len(A.hits(i)) == 30, len(A.hits(i))
    # section 9 /state: the budget's state says what it refused (the last 10 calls' retries)
    budget = sc.admin.get("/state").json()["services"]["budgeted"]["budget"]
    assert budget["refused"] >= 10, budget
    # the window is the budget's: a quiet second later, no retry is left either
    time.sleep(1.1)
    r = sc.get(f"/budgeted/s/503/{i}/late")
    assert r.status_code == 503 and attempts(r) == 1


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


def test_client_gone_mid_answer_frees_its_slot(env: dict[str, Any]) -> None:
    """Section 9: a client that disconnects (here: while the answer streams) cancels its
    upstream call: its concurrency slot is free again."""
    sc = env["sc"]
    with httpx.Client(base_url=sc.url, trust_env=False, timeout=5) as c:
        with c.stream("GET", f"/capdisc/drip/30/0.1/{uid()}") as resp:
            assert resp.status_code == 200
            chunks = resp.iter_raw()  # held: a dropped iterator closes the answer at once
            next(chunks)
            r = sc.get(f"/capdisc/x/{uid()}")
            assert r.status_code == 503 and reason(r) == "overloaded"  # still streaming
    # leaving the blocks closed the connection mid-answer
    r = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(
        sc.get(f"/capdisc/x/{uid()}")), 1.0, step=0.1)
    assert r is not None, "the abandoned call still holds the concurrency slot"
