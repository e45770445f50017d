"""Acceptance: timeouts and deadlines.

A real `riprap run` on loopback with this file's own small policy, next to its tests
(written from /work/shared/language.md; each test cites its contract section). The
sidecar comes from the `run_sidecar` fixture (conftest.py), the upstreams from `ups`."""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from acc_kit import (
    RunSidecar,
    attempts,
    reason,
    sidecar_env,
    uid,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
]

# the services of this file's policy (the admin listener names each one)
SERVICES = ['echo', 'slow', 'roomy', 'rashort', 'tight', 'median', 'medianfb', 'hedgeto', 'dlbrk', 'medpt']


def policy(A: str, B: str, C: str, DEAD: str, listen: int, admin: int) -> str:
    return f"""\
app acc
listen 127.0.0.1:{listen}
admin 127.0.0.1:{admin}

service echo {{
    host echo.internal, alias.example
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

service rashort {{
    timeout 500ms
    retry 1 on 503 backoff 1ms
    endpoint {A}
}}

service tight {{
    timeout 300ms
    retry 5 on 503 backoff 200ms
    endpoint {A}
}}

service median {{
    timeout 600ms
    retry 3 on 503 backoff 1ms
    endpoint {A}
}}

service medianfb {{
    timeout 600ms
    retry 3 on 503 backoff 1ms
    fallback status 200 text "median-fallback"
    endpoint {A}
}}

service medpt {{
    timeout 1s
    retry 3 on timeout per-try 400ms backoff 1ms
    endpoint {A}
}}

service hedgeto {{
    timeout 300ms
    hedge after 50ms
    endpoint {A}
    endpoint {B}
}}

service dlbrk {{
    timeout 5s
    breaker failures 1 open 30s
    endpoint {A}
}}

"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, ups: dict[str, Any],
        run_sidecar: RunSidecar) -> Iterator[dict[str, Any]]:
    yield from sidecar_env(policy, tmp_path_factory, ups, run_sidecar)


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


def test_timeout_is_504(env: dict[str, Any]) -> None:
    sc = env["sc"]
    t = time.monotonic()
    r = sc.get(f"/slow/sleep/2/{uid()}")
    took = time.monotonic() - t
    assert r.status_code == 504 and reason(r) == "timeout"
    assert took < 1.0  # section 4: timeout 300ms is the deadline of the whole call
    attempts(r)


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


def test_smaller_of_incoming_deadline_and_timeout(env: dict[str, Any]) -> None:
    # contract §9 Deadlines: "the smaller of it and the service's timeout"
    r = env["sc"].get(f"/slow/dl/{uid()}", headers={"x-riprap-deadline-ms": "60000"})
    assert 0 < float(r.json()["headers"]["x-riprap-deadline-ms"]) <= 300


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


def test_garbage_deadline_header_ignored(env: dict[str, Any]) -> None:
    # contract §9 Deadlines (silent on garbage: Envoy ignores a bad x-envoy-expected-rq-timeout-ms)
    r = env["sc"].get(f"/echo/x/{uid()}", headers={"x-riprap-deadline-ms": "soon"})
    assert r.status_code == 200


def test_retry_skipped_below_median_goes_to_the_fallback(env: dict[str, Any]) -> None:
    """Section 4: a retry is not started when the time left is shorter than the observed
    median latency: "the call goes to its fallback ... at once"."""
    sc, A = env["sc"], env["A"]
    for _ in range(2):  # the first call teaches the median (~250ms)
        i = uid()
        t = time.monotonic()
        r = sc.get(f"/medianfb/sleepcode/0.25/503/{i}")
        took = time.monotonic() - t
    assert len(A.hits(i)) == 2, [h["path"] for h in A.hits(i)]
    assert r.status_code == 200 and r.text == "median-fallback"
    assert r.headers.get("x-riprap-fallback") == "static"
    assert took < 0.7  # at once: not at the 600ms deadline


def test_timeout_covers_hedges(env: dict[str, Any]) -> None:
    # contract §4 timeout: "deadline for the whole call, retries and hedges included"
    sc = env["sc"]
    t = time.monotonic()
    r = sc.get(f"/hedgeto/slowon/A,B/1.5/{uid()}")
    took = time.monotonic() - t
    assert r.status_code == 504 and reason(r) == "timeout"
    assert took < 1.0


def test_call_cut_by_callers_deadline_is_no_breaker_failure(env: dict[str, Any]) -> None:
    # contract §9 Deadlines: "A call that runs out of time only because its caller's deadline
    # was shorter than the service's timeout is not a failure of the upstream: it counts
    # toward no breaker"
    sc = env["sc"]
    for _ in range(2):
        r = sc.get(f"/dlbrk/sleep/1/{uid()}", headers={"x-riprap-deadline-ms": "150"})
        assert r.status_code == 504 and reason(r) == "timeout"
    r = sc.get(f"/dlbrk/x/{uid()}")  # breaker failures 1: one counted failure would open it
    assert r.status_code == 200, (r.status_code, reason(r))
    assert sc.get(f"/dlbrk/s/500/{uid()}").status_code == 500  # a real failure does count
    r = sc.get(f"/dlbrk/x/{uid()}")
    assert r.status_code == 503 and reason(r) == "breaker-open"


def test_retry_after_a_per_try_timeout_skipped_below_median(env: dict[str, Any]) -> None:
    """Section 4: a retry is not started when the time left is shorter than the observed
    median latency, whatever failed (here a per-try timeout): 504 at once."""
    sc, A = env["sc"], env["A"]
    assert sc.get(f"/medpt/sleep/0.3/{uid()}").status_code == 200  # the median: ~300ms
    i = uid()
    r = sc.get(f"/medpt/sleep/2/{i}")
    # attempt 1 is cut at 400ms (600ms left: retry), attempt 2 at 800ms (200ms < 300ms)
    assert r.status_code == 504 and reason(r) == "timeout"
    assert len(A.hits(i)) == 2 and attempts(r) == 2, (len(A.hits(i)), attempts(r))
