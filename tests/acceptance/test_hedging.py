"""Acceptance: hedging.

A real `riprap run` on loopback with this file's own small policy, next to its tests
(written from /work/shared/language.md; each test cites its contract section). The
sidecar comes from the `run_sidecar` fixture (conftest.py), the upstreams from `ups`."""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from acc_kit import (
    RunSidecar,
    sidecar_env,
    uid,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
]

# the services of this file's policy (the admin listener names each one)
SERVICES = ['hedged', 'hedgegood', 'hedgep95', 'hedge3', 'hedgemin']


def policy(A: str, B: str, C: str, DEAD: str, listen: int, admin: int) -> str:
    return f"""\
app acc
listen 127.0.0.1:{listen}
admin 127.0.0.1:{admin}

service hedged {{
    hedge after 50ms
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

service hedgep95 {{
    hedge at p95
    balance round-robin
    endpoint {A}
    endpoint {B}
}}

service hedgemin {{
    hedge at p95 min 400ms
    balance round-robin
    endpoint {A}
    endpoint {B}
}}

service hedge3 {{
    hedge after 50ms max 2
    balance round-robin
    endpoint {A}
    endpoint {B}
    endpoint {C}
}}

"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, ups: dict[str, Any],
        run_sidecar: RunSidecar) -> Iterator[dict[str, Any]]:
    yield from sidecar_env(policy, tmp_path_factory, ups, run_sidecar)


def test_hedge_answers_from_the_fast_endpoint(env: dict[str, Any]) -> None:
    # contract §4 hedge after D: "send extra copies, to other endpoints; the first good answer wins"
    sc = env["sc"]
    for _ in range(2):  # round-robin: one of the two starts on the slow A
        t = time.monotonic()
        r = sc.get(f"/hedged/slowon/A/1.5/{uid()}")
        assert r.status_code == 200 and r.headers["x-upstream"] == "B"
        assert time.monotonic() - t < 1.0


def test_hedge_not_for_post(env: dict[str, Any]) -> None:
    """Section 4: hedges are for idempotent requests only."""
    sc, A, B = env["sc"], env["A"], env["B"]
    for _ in range(2):
        i = uid()
        r = sc.get(f"/hedged/slowon/A,B/0.3/{i}", method="POST", content=b"x")
        assert r.status_code == 200
        assert len(A.hits(i)) + len(B.hits(i)) == 1


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


def test_hedge_at_p95_starts_at_100ms_before_20_calls(env: dict[str, Any]) -> None:
    # contract §4 hedge at pNN: "100ms until 20 calls were seen"
    sc = env["sc"]
    for _ in range(2):
        t = time.monotonic()
        r = sc.get(f"/hedgep95/slowon/A/1.5/{uid()}")
        took = time.monotonic() - t
        assert r.status_code == 200 and r.headers["x-upstream"] == "B"
        assert took < 0.6


def test_hedge_max_sends_more_copies(env: dict[str, Any]) -> None:
    # contract §4 hedge: "send up to N extra copies, to other endpoints"
    sc = env["sc"]
    for _ in range(3):
        t = time.monotonic()
        r = sc.get(f"/hedge3/slowon/A,B/1.5/{uid()}")
        assert r.status_code == 200 and r.headers["x-upstream"] == "C"
        assert time.monotonic() - t < 0.8


def test_hedge_at_pnn_never_below_min(env: dict[str, Any]) -> None:
    # contract §4 hedge at pNN: "never below min" (here 400ms, above the 100ms start)
    sc, A = env["sc"], env["A"]
    started_on_a = 0
    for _ in range(2):  # round-robin: one of the two starts on the slow A
        i = uid()
        t = time.monotonic()
        r = sc.get(f"/hedgemin/slowon/A/1.5/{i}")
        took = time.monotonic() - t
        assert r.status_code == 200 and r.headers["x-upstream"] == "B"
        if A.hits(i):
            started_on_a += 1
            assert 0.38 <= took < 1.3, took  # the copy went after 400ms, not 100ms
    assert started_on_a >= 1
