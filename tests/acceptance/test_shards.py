"""Acceptance: sharding, failover tiers, balancing, health and ejection.

A real `riprap run` on loopback with this file's own small policy, next to its tests
(written from /work/shared/language.md; each test cites its contract section). The
sidecar comes from the `run_sidecar` fixture (conftest.py), the upstreams from `ups`."""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from acc_kit import (
    RunSidecar,
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
SERVICES = ['headhc', 'sick', 'tiers', 'tiersok', 'sharded', 'shardnodef', 'ejecting', 'pathshard', 'qshard', 'cshard', 'shardpol', 'tiers2', 'expect', 'outmax', 'rise', 'wlr', 'rnd', 'weighted', 'fall3', 'hcslow', 'ejtwice', 'tierej']


def policy(A: str, B: str, C: str, DEAD: str, listen: int, admin: int) -> str:
    return f"""\
app acc
listen 127.0.0.1:{listen}
admin 127.0.0.1:{admin}

service sick {{
    health GET /s/503/health every 100ms timeout 500ms fall 1 rise 1
    endpoint {A}
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

service ejecting {{
    outlier failures 1 eject 30s
    balance round-robin
    endpoint {DEAD}
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

service rnd {{
    balance random
    endpoint {A}
    endpoint {B}
}}

service weighted {{
    balance round-robin
    endpoint {A} weight 3
    endpoint {B}
}}

service headhc {{
    health HEAD /hchead every 100ms timeout 300ms
    endpoint {A}
}}

service fall3 {{
    health GET /hstate/fall3 every 100ms timeout 300ms fall 3 rise 1
    fallback status 200 text "fall-fallback"
    endpoint {A}
}}

service hcslow {{
    health GET /sleep/0.6/hcslow every 100ms timeout 200ms fall 1 rise 1
    fallback status 200 text "hcslow-fallback"
    endpoint {A}
}}

service tierej {{
    outlier failures 1 eject 30s
    endpoint {DEAD}
    failover {B}
}}

service ejtwice {{
    outlier failures 1 eject 600ms
    balance round-robin
    endpoint {DEAD}
    endpoint {A}
}}

"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, ups: dict[str, Any],
        run_sidecar: RunSidecar) -> Iterator[dict[str, Any]]:
    yield from sidecar_env(policy, tmp_path_factory, ups, run_sidecar)


def test_no_healthy_endpoint_503(env: dict[str, Any]) -> None:
    # contract §9: "no-healthy-endpoint (503)"; §5 health checks
    sc, A = env["sc"], env["A"]
    assert wait_for(lambda: A.hits("/s/503/health"), 3), "no active health checks seen"
    r = wait_for(lambda: (lambda r: r if reason(r) == "no-healthy-endpoint" else None)(
        sc.get(f"/sick/x/{uid()}")), 3)
    assert r is not None, "the unhealthy endpoint kept being used"
    assert r.status_code == 503


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


def test_outlier_never_ejects_more_than_max(env: dict[str, Any]) -> None:
    """Section 5: never more than P% of a tier ejected at once (34% of 3: one)."""
    sc = env["sc"]
    for _ in range(6):
        sc.get(f"/outmax/x/{uid()}")
    codes = [sc.get(f"/outmax/x/{uid()}").status_code for _ in range(8)]
    assert 502 in codes and 200 in codes, codes


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


def test_path_segment_shard_without_segment_is_400(env: dict[str, Any]) -> None:
    # contract §5 shard default: "without it they get 400"
    r = env["sc"].get("/pathshard/")
    assert r.status_code == 400


def test_health_check_method(env: dict[str, Any]) -> None:
    # contract §5 health [METHOD] PATH
    A = env["A"]
    assert wait_for(lambda: A.hits("/hchead"), 3)
    assert {h["method"] for h in A.hits("/hchead")} == {"HEAD"}


def test_balance_random_uses_every_endpoint(env: dict[str, Any]) -> None:
    # contract §5 balance random
    sc = env["sc"]
    seen = {sc.get(f"/rnd/x/{uid()}").headers["x-upstream"] for _ in range(30)}
    assert seen == {"A", "B"}


def test_health_fall_needs_consecutive_failures(env: dict[str, Any]) -> None:
    # contract §5 health: "fall N" (N failed checks in a row make an endpoint unhealthy)
    sc, A = env["sc"], env["A"]
    assert wait_for(lambda: sc.get("/fall3/x").headers.get("x-upstream") == "A", 3)
    A.unhealthy.add("fall3")
    try:
        t = time.monotonic()
        assert wait_for(lambda: sc.get("/fall3/x").text == "fall-fallback", 3)
        failed = [h for h in A.hits("/hstate/fall3") if h["t"] >= t]
        assert len(failed) >= 3, len(failed)  # not after the first failed check
        assert time.monotonic() - t >= 0.2
    finally:
        A.unhealthy.discard("fall3")


def test_health_check_slower_than_its_timeout_fails(env: dict[str, Any]) -> None:
    # contract §5 health: "timeout D" (a check without an answer within D failed)
    sc, A = env["sc"], env["A"]
    assert wait_for(lambda: len(A.hits("/sleep/0.6/hcslow")) >= 2, 3)
    r = wait_for(lambda: (lambda r: r if r.text == "hcslow-fallback" else None)(
        sc.get(f"/hcslow/x/{uid()}")), 3)
    assert r is not None and reason(r) == "no-healthy-endpoint"
    i = uid()
    assert sc.get(f"/hcslow/x/{i}").text == "hcslow-fallback" and A.hits(i) == []


def test_outlier_ejection_lasts_d_times_the_ejections(env: dict[str, Any]) -> None:
    # contract §5 outlier: ejected "for D (default 30s) times the number of times it was ejected"
    sc = env["sc"]
    failures: list[float] = []
    end = time.monotonic() + 6
    while len(failures) < 3 and time.monotonic() < end:
        if sc.get(f"/ejtwice/x/{uid()}").status_code == 502:  # the dead endpoint, tried again
            failures.append(time.monotonic())
        time.sleep(0.03)
    assert len(failures) == 3, failures
    first, second = failures[1] - failures[0], failures[2] - failures[1]
    assert 0.5 <= first <= 1.1, (first, second)  # ejected 600ms
    assert 1.1 <= second <= 2.0 and second > first + 0.3, (first, second)  # then 1.2s


def test_failover_tier_used_when_primaries_are_ejected(env: dict[str, Any]) -> None:
    # contract §5 failover: "a tier is used only when every endpoint of the tiers before it
    # is unhealthy, ejected or broken" (here: ejected by outlier detection, no health checks)
    sc = env["sc"]
    r = sc.get(f"/tierej/x/{uid()}")
    assert r.status_code in (200, 502), r.status_code  # the dead primary: failed, then ejected
    for _ in range(4):
        r = sc.get(f"/tierej/x/{uid()}")
        assert r.status_code == 200 and r.headers["x-upstream"] == "B", r.status_code
