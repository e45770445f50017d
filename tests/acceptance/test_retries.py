"""Acceptance: retries.

A real `riprap run` on loopback with this file's own small policy, next to its tests
(written from /work/shared/language.md; each test cites its contract section). The
sidecar comes from the `run_sidecar` fixture (conftest.py), the upstreams from `ups`."""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from engine_differences import ENVOY_DIFFERENCES

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
SERVICES = ['pair', 'passthru', 'halfdead', 'dead', 'resetter', 'dflt', 'ra', 'pertry', 'methods', 'pairlr', 'resetretry', 'backoffx', 'backoffc', 'backoffeq', 'ptjitter', 'rapertry', 'backoffcap', 'backoffdec']


def policy(A: str, B: str, C: str, DEAD: str, listen: int, admin: int) -> str:
    return f"""\
app acc
listen 127.0.0.1:{listen}
admin 127.0.0.1:{admin}

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

service dflt {{
    retry 2 backoff 1ms
    endpoint {A}
}}

service ra {{
    retry 1 on 503 backoff 1ms
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

service backoffx {{
    retry 2 on 503 backoff 100ms..1s jitter none
    endpoint {A}
}}

service backoffc {{
    retry 3 on 503 backoff 150ms jitter none
    endpoint {A}
}}

service backoffeq {{
    retry 3 on 503 backoff 240ms jitter equal
    endpoint {A}
}}

service backoffcap {{
    retry 3 on 503 backoff 100ms..150ms jitter none
    endpoint {A}
}}

service backoffdec {{
    retry 3 on 503 backoff 100ms..1s jitter decorrelated
    endpoint {A}
}}

service ptjitter {{
    retry 2 on 503 backoff 150ms jitter none per-try 1s
    endpoint {A}
}}

service rapertry {{
    retry 1 on 503 backoff 1ms per-try 2s
    endpoint {A}
}}

"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, ups: dict[str, Any],
        run_sidecar: RunSidecar) -> Iterator[dict[str, Any]]:
    yield from sidecar_env(policy, tmp_path_factory, ups, run_sidecar)


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


def test_exponential_backoff_without_jitter(env: dict[str, Any]) -> None:
    # contract §4 retry: "backoff A..B is exponential from A doubling up to B"; jitter none
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/backoffx/s/503/{i}")
    assert r.status_code == 503 and attempts(r) == 3
    t = [h["t0"] for h in sorted(A.hits(i), key=lambda h: h["t0"])]
    g1, g2 = t[1] - t[0], t[2] - t[1]
    assert 0.09 <= g1 and 0.19 <= g2 and g2 > 1.4 * g1 and g1 < 0.4, (g1, g2)


def test_retry_after_http_date_is_honoured(env: dict[str, Any]) -> None:
    # contract §4: "A Retry-After from the upstream is honoured within the deadline"
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/ra/raflip/date2/{i}")
    assert r.status_code == 200 and attempts(r) == 2
    hits = A.hits(i)
    assert len(hits) == 2 and hits[1]["t0"] - hits[0]["t0"] >= 0.9


def _gaps(hits: list[dict[str, Any]]) -> list[float]:
    t = [h["t0"] for h in sorted(hits, key=lambda h: h["t0"])]
    return [t[k + 1] - t[k] for k in range(len(t) - 1)]


def test_constant_backoff(env: dict[str, Any]) -> None:
    # contract §4 retry: "backoff D is constant"; jitter none
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/backoffc/s/503/{i}")
    assert r.status_code == 503 and attempts(r) == 4
    gaps = _gaps(A.hits(i))
    # 150ms each time (doubling would wait 600ms before the third retry); the machine is
    # loaded, so the upper margin is wide
    assert len(gaps) == 3 and all(0.14 <= g < 0.45 for g in gaps), gaps


def test_equal_jitter_waits_at_least_half(env: dict[str, Any]) -> None:
    # contract §4 retry: "jitter full|equal|decorrelated|none": equal jitter waits D/2 plus a
    # random part up to D/2 (full jitter would wait under D/2 half of the time)
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/backoffeq/s/503/{i}")
    assert r.status_code == 503 and attempts(r) == 4
    gaps = _gaps(A.hits(i))
    assert len(gaps) == 3 and all(0.115 <= g < 0.6 for g in gaps), gaps


def test_retry_after_honoured_with_per_try(env: dict[str, Any]) -> None:
    """Section 4: a Retry-After is honoured within the deadline, also with a per-try time."""
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/rapertry/raflip/1/{i}")
    assert r.status_code == 200 and attempts(r) == 2
    hits = A.hits(i)
    assert len(hits) == 2 and hits[1]["t0"] - hits[0]["t0"] >= 0.9
    assert "x-riprap-retry-after" not in r.headers and "x-riprap-retry" not in r.headers


def test_backoff_with_per_try_time(env: dict[str, Any]) -> None:
    # contract §4 retry: "backoff D is constant"; jitter none; with per-try D
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/ptjitter/s/503/{i}")
    assert r.status_code == 503 and attempts(r) == 3
    gaps = _gaps(A.hits(i))
    if sc.engine == "envoy":
        # the closest thing (engine_differences: retry-wait-with-per-try): Envoy's own
        # backoff, fully jittered up to 150ms then 300ms; `run --engine envoy` says so
        warning = ENVOY_DIFFERENCES["retry-wait-with-per-try"].warning
        assert warning is not None and f"service ptjitter: retry: {warning}" in \
            sc.log_path.read_text(errors="replace")
        assert len(gaps) == 2 and gaps[0] < 0.35 and gaps[1] < 0.5, gaps
        return
    assert len(gaps) == 2 and all(0.14 <= g < 0.4 for g in gaps), gaps


def test_exponential_backoff_stops_doubling_at_its_maximum(env: dict[str, Any]) -> None:
    # contract §4 retry: "backoff A..B is exponential from A doubling up to B"
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/backoffcap/s/503/{i}")
    assert r.status_code == 503 and attempts(r) == 4
    g1, g2, g3 = _gaps(A.hits(i))
    # 100ms, then 150ms twice (doubling without the cap would wait 200ms, then 400ms)
    assert 0.09 <= g1 < 0.3 and 0.14 <= g2 < 0.3 and 0.14 <= g3 < 0.3, (g1, g2, g3)


def test_decorrelated_jitter_never_waits_under_the_base(env: dict[str, Any]) -> None:
    # contract §4 retry: "jitter ... decorrelated": each wait is between the base and three
    # times the previous one (full jitter would wait under 100ms before the first retry)
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/backoffdec/s/503/{i}")
    assert r.status_code == 503 and attempts(r) == 4
    gaps = _gaps(A.hits(i))
    assert len(gaps) == 3 and all(g >= 0.095 for g in gaps), gaps
    assert gaps[0] < 0.3 + 0.15, gaps  # at most 3 x base, with room for a loaded machine
