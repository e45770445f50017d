"""Acceptance: breakers.

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

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
]

# the services of this file's policy (the admin listener names each one)
SERVICES = ['brk', 'brkprobe', 'brk4xx', 'brkfb', 'frbrk', 'slowbrk', 'shbrk', 'brkreopen', 'brkk2', 'brkhalf', 'brkdead', 'brkto', 'brkcap', 'brkretry', 'brkretrycf', 'brkmid']


def policy(A: str, B: str, C: str, DEAD: str, listen: int, admin: int) -> str:
    return f"""\
app acc
listen 127.0.0.1:{listen}
admin 127.0.0.1:{admin}

service brk {{
    breaker failures 2 open 30s
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

service brkreopen {{
    breaker failures 1 open 200ms
    endpoint {A}
}}

service brkk2 {{
    breaker failures 3 open 200ms probes 2
    endpoint {A}
}}

service brkhalf {{
    breaker failures 1 open 200ms
    endpoint {A}
}}

service brkdead {{
    breaker failures 2 open 30s
    endpoint {DEAD}
}}

service brkto {{
    timeout 200ms
    breaker failures 2 open 30s
    endpoint {A}
}}

service brkretry {{
    retry 2 on 503 backoff 1ms
    breaker failures 3 open 30s
    endpoint {A}
}}

service brkretrycf {{
    retry 2 on connect-failure backoff 1ms
    breaker failures 3 open 30s
    endpoint {DEAD}
}}

service brkmid {{
    retry 3 on 503 backoff 1ms
    breaker failures 2 open 30s
    endpoint {A}
}}

service brkcap {{
    breaker failures 1 open 60ms
    endpoint {A}
}}

"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, ups: dict[str, Any],
        run_sidecar: RunSidecar) -> Iterator[dict[str, Any]]:
    yield from sidecar_env(policy, tmp_path_factory, ups, run_sidecar)


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


def test_connection_errors_count_as_failures(env: dict[str, Any]) -> None:
    # contract §4 breaker: "Failures are connection errors, timeouts and 5xx answers"
    sc = env["sc"]
    for _ in range(2):
        r = sc.get(f"/brkdead/x/{uid()}")
        assert r.status_code == 502 and reason(r) == "upstream-failed"
    r = sc.get(f"/brkdead/x/{uid()}")
    assert r.status_code == 503 and reason(r) == "breaker-open"


def test_timeouts_count_as_failures(env: dict[str, Any]) -> None:
    # contract §4 breaker: "Failures are connection errors, timeouts and 5xx answers"
    sc, A = env["sc"], env["A"]
    for _ in range(2):
        r = sc.get(f"/brkto/sleep/1/{uid()}")
        assert r.status_code == 504 and reason(r) == "timeout"
    i = uid()
    r = sc.get(f"/brkto/x/{i}")
    assert r.status_code == 503 and reason(r) == "breaker-open" and A.hits(i) == []


def test_reopen_doubling_stops_at_ten_times_open(env: dict[str, Any]) -> None:
    # contract §4 breaker: "open for D (default 30s, doubling on each reopen up to 10 times D)"
    sc = env["sc"]
    assert sc.get(f"/brkcap/s/500/{uid()}").status_code == 500  # open 60ms
    for _ in range(4):  # each failed probe reopens it: 120, 240, 480, then 600 (not 960)
        assert wait_for(lambda: sc.get(f"/brkcap/s/500/{uid()}").status_code == 500, 5)
    tripped = time.monotonic()
    time.sleep(0.3)
    assert reason(sc.get(f"/brkcap/x/{uid()}")) == "breaker-open"  # open for longer than 300ms
    time.sleep(max(0.0, tripped + 0.78 - time.monotonic()))
    r = sc.get(f"/brkcap/x/{uid()}")  # 600ms are over (960ms would not be)
    assert r.status_code == 200, (r.status_code, reason(r))


def test_each_failed_attempt_counts(env: dict[str, Any]) -> None:
    """Section 4: the breaker opens after N consecutive failures; the retries of one call
    are attempts that fail (order: the breaker is inside the retries, per attempt)."""
    sc, A = env["sc"], env["A"]
    r = sc.get(f"/brkretry/s/503/{uid()}")
    assert r.status_code == 503 and attempts(r) == 3  # three failures in one call
    i = uid()
    r = sc.get(f"/brkretry/x/{i}")
    assert r.status_code == 503 and reason(r) == "breaker-open" and A.hits(i) == []
    r = sc.get(f"/brkretrycf/x/{uid()}")
    assert r.status_code == 502 and reason(r) == "upstream-failed"  # three refused attempts
    r = sc.get(f"/brkretrycf/x/{uid()}")
    assert r.status_code == 503 and reason(r) == "breaker-open"


def test_breaker_opened_by_a_call_refuses_its_next_attempt(env: dict[str, Any]) -> None:
    """Section 4: the breaker opens after N consecutive failures, and an open breaker fails
    fast: a call whose own retries open it sends no further attempt."""
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/brkmid/s/503/{i}")
    assert len(A.hits(i)) == 2, len(A.hits(i))  # two failures opened it: no third attempt
    assert r.status_code == 503 and reason(r) == "breaker-open", (r.status_code, reason(r))
    assert attempts(r) == 2  # exactly as many as the upstream was sent
    i = uid()
    r = sc.get(f"/brkmid/x/{i}")
    assert r.status_code == 503 and reason(r) == "breaker-open" and A.hits(i) == []
