"""The checkout demo's story on the Envoy engine, fault by fault (issue 11).

`riprap demo --engine envoy` must show what the Python engine shows: a dead inventory
shard fails fast behind its own breaker while stock reads come from `fallback stale`; slow
recommendations are hedged, trip the slow-call breaker and are answered from the stale
copy or the file fallback; and `/metrics` and `/state` count all of it under the Python
engine's names. Each test drives a checkout-like policy through one fault with real
sockets: `riprap run --engine envoy` as a subprocess, `riprap_testing.faults` upstreams.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from riprap_testing.faults import FaultServer, free_port

pytestmark = pytest.mark.timeout(120)

POLICY = """
app story
listen 127.0.0.1:{listen}
admin  127.0.0.1:{admin}

service inventory {{
    timeout 1s
    retry 2 on connect-failure, reset, 502, 503, 504 backoff 5ms..20ms per-try 300ms budget 20%
    shard by header X-Sku
    shard a {{
        endpoint {inv_a}
        health GET /healthz every 300ms timeout 200ms fall 2 rise 2
    }}
    shard b {{
        endpoint {inv_b}
        health GET /healthz every 300ms timeout 200ms fall 2 rise 2
    }}
    breaker failures 5 open 1s probes 1
    fallback stale 10m
}}

service payments {{
    timeout 1s
    retry 4 on connect-failure, reset, 5xx backoff 5ms..40ms per-try 150ms
    endpoint {pay_1}
    endpoint {pay_2}
    outlier failures 3 eject 3s max 50%
}}

service catalog {{
    endpoint {recs}
    fallback stale 10m
}}

service recommendations {{
    timeout 120ms
    retry 1 on connect-failure, reset, 503 per-try 50ms budget 10%
    endpoint {recs}
    hedge after 30ms
    breaker failure-rate 50% window 20 min 10 open 3s slow 50ms
    fallback stale 10m
    fallback status 200 file "recommendations.json"
}}
"""
FILE_BODY = '{"items": ["gift-card"], "source": "static fallback"}'


def _envoy_or_skip() -> None:
    try:
        from sidecar.engines.envoy.process import find_envoy
        find_envoy()
    except Exception as exc:  # noqa: BLE001 - no Envoy binary: nothing to test here
        pytest.skip(f"no Envoy binary: {exc}")


class Story:
    """The running sidecar, its upstreams, and helpers to read what it says."""

    def __init__(self, tmp: Path) -> None:
        self.inv_a, self.inv_b, self.recs, self.pay_1, self.pay_2 = (
            FaultServer(name=n).start()
            for n in ("inventory-a", "inventory-b", "recs", "payments-1", "payments-2"))
        self.listen, self.admin = free_port(), free_port()
        (tmp / "recommendations.json").write_text(FILE_BODY)
        self.policy = tmp / "story.riprap"
        self.policy.write_text(POLICY.format(listen=self.listen, admin=self.admin,
                                             inv_a=self.inv_a.url, inv_b=self.inv_b.url,
                                             recs=self.recs.url, pay_1=self.pay_1.url,
                                             pay_2=self.pay_2.url))
        self.log = open(tmp / "riprap.log", "wb")
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from dsl.cli import main; sys.exit(main(sys.argv[1:]))",
             "run", str(self.policy), "--engine", "envoy"],
            cwd=str(tmp), stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.log_path = tmp / "riprap.log"
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.listen}", trust_env=False,
                                   timeout=10)
        self.adm = httpx.Client(base_url=f"http://127.0.0.1:{self.admin}", trust_env=False,
                                timeout=10)
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        end = time.monotonic() + 40
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"riprap run exited {self.proc.returncode}:\n{self.logs()}")
            try:
                if self.adm.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"not ready:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        self.client.close()
        self.adm.close()
        for s in (self.inv_a, self.inv_b, self.recs, self.pay_1, self.pay_2):
            s.stop()

    def stock(self, sku: str) -> httpx.Response:
        return self.client.get(f"/stock/{sku}", headers={"Host": "inventory", "X-Sku": sku})

    def recommend(self, user: str) -> httpx.Response:
        return self.client.get(f"/recommendations?user={user}", headers={"Host": "recommendations"})

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = self.adm.get("/metrics").text
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        want = tuple(sorted(labels.items()))
        return self.metrics().get((name, want), 0.0)

    def state(self) -> Any:
        return self.adm.get("/state").json()


def until(pred: Callable[[], Any], timeout: float = 10.0, step: float = 0.1) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > end:
            return value
        time.sleep(step)


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    _envoy_or_skip()
    s = Story(tmp_path_factory.mktemp("story"))
    try:
        yield s
    finally:
        s.close()


def _sku_on(story: Story, shard: FaultServer) -> str:
    """A SKU whose key lands on `shard` (the answer names its server)."""
    for i in range(1, 200):
        r = story.stock(f"SKU-{i}")
        if r.status_code == 200 and r.headers.get("x-fault-server") == shard.name:
            return f"SKU-{i}"
    raise AssertionError(f"no SKU lands on {shard.name}")


def test_dead_shard_answers_stale_then_its_own_breaker_fails_fast(story: Story) -> None:
    sku_b = _sku_on(story, story.inv_b)
    sku_a = _sku_on(story, story.inv_a)
    assert story.stock(sku_b).status_code == 200  # the last good answer, kept
    story.inv_b.set(mode="refuse")
    try:
        answers = [story.stock(sku_b) for _ in range(8)]
        for r in answers:
            # served from the stale copy: the same body as before, marked as such
            assert r.status_code == 200, (r.status_code, r.headers, story.logs())
            assert r.headers["x-riprap-fallback"] == "stale"
            assert r.json()["server"] == "inventory-b"
        # the shard's breaker opened after 5 failed calls: the rest never went out
        # (the health checks may call the shard down first: no endpoint, nothing sent)
        assert [r.headers["x-riprap-reason"] for r in answers[5:]] == ["breaker-open"] * 3, \
            [r.headers["x-riprap-reason"] for r in answers]
        assert all(r.headers["x-riprap-attempts"] == "0" for r in answers[5:])
        # a key that never had a good answer gets the breaker's own 503
        fresh = next(f"SKU-{i}" for i in range(200, 400)
                     if story.stock(f"SKU-{i}").headers.get("x-riprap-reason") == "breaker-open")
        r = story.stock(fresh)
        assert r.status_code == 503 and r.headers["x-riprap-reason"] == "breaker-open"
        # shard a is another breaker: still closed, still served
        r = story.stock(sku_a)
        assert r.status_code == 200 and "x-riprap-fallback" not in r.headers
        shards = until(lambda: (lambda s: s if s["b"]["breaker"]["opened"] >= 1 else None)(
            story.state()["services"]["inventory"]["shards"]))
        assert shards, story.state()
        assert shards["a"]["breaker"]["state"] == "closed" and shards["a"]["breaker"]["opened"] == 0
        # the demo's counters: the same names as the Python engine's
        assert until(lambda: story.metric("riprap_breaker_transitions_total", service="inventory",
                                          shard="b", state="open") >= 1)
        assert story.metric("riprap_breaker_state", service="inventory", shard="a") == 0.0
        assert story.metric("riprap_fallbacks_total", service="inventory", kind="stale") >= 8
    finally:
        story.inv_b.recover()


def test_healed_shard_closes_its_breaker_at_the_next_probe(story: Story) -> None:
    """Step 6: while the health checks say the shard is down, a probe finds no healthy
    endpoint: nothing was sent, so it is no failure (as on the Python engine) and does not
    reopen the breaker for twice as long; once the checks pass, the next probe closes it."""
    sku_b = _sku_on(story, story.inv_b)
    story.inv_b.set(mode="refuse")
    try:
        until(lambda: story.stock(sku_b).headers.get("x-riprap-reason") == "no-healthy-endpoint"
              or story.state()["services"]["inventory"]["shards"]["b"]["endpoints"][0]["healthy"]
              is False, timeout=10)
        end = time.monotonic() + 6  # down for a while: probes come and find no endpoint
        while time.monotonic() < end:
            assert story.stock(sku_b).status_code == 200  # the stale copy
            time.sleep(0.1)
        # probes that found no endpoint did not double the open time (one probe may
        # have met the dead endpoint before the checks called it down)
        down = story.state()["services"]["inventory"]["shards"]["b"]["breaker"]
        assert down["opened"] >= 1 and down["open_for"] <= 2.0, down
    finally:
        story.inv_b.recover()
    healed = time.monotonic()
    fresh = until(lambda: "x-riprap-fallback" not in story.stock(sku_b).headers, timeout=12, step=0.1)
    took = time.monotonic() - healed
    assert fresh, story.state()["services"]["inventory"]["shards"]["b"]
    # health rise (2 x 300 ms) and at most one open period (1 s), with room for a loaded
    # machine; a breaker reopened by each probe would be open 8 s or more by now
    assert took < 6.0, (took, story.state()["services"]["inventory"]["shards"]["b"])
    b = story.state()["services"]["inventory"]["shards"]["b"]["breaker"]
    assert b["state"] == "closed" and b["open_for"] <= 2.0, b
    assert story.metric("riprap_breaker_transitions_total", service="inventory", shard="b",
                        state="closed") >= 1
    # a breaker that never moved has no transition series (as on the Python engine)
    assert ("riprap_breaker_transitions_total", (("service", "inventory"), ("shard", "a"),
                                                 ("state", "open"))) not in story.metrics()


def test_slow_answers_trip_the_slow_call_breaker_and_stale_copies_answer(story: Story) -> None:
    for user in ("u1", "u2"):
        r = story.recommend(user)
        assert r.status_code == 200 and "x-riprap-fallback" not in r.headers
    # slower than `slow 50ms`, within the 120 ms timeout: answered, yet counted as failures
    story.recs.set(delay=0.07)
    try:
        slow = [story.recommend("u1") for _ in range(12)]
        assert all(r.status_code == 200 for r in slow)
        state = until(lambda: (lambda b: b if b["opened"] >= 1 else None)(
            story.state()["services"]["recommendations"]["breaker"]))
        assert state, (story.state()["services"]["recommendations"], story.logs())
        # open: answered at once from the last good answer to the same URL
        t0 = time.monotonic()
        r = story.recommend("u2")
        assert time.monotonic() - t0 < 0.1
        assert r.status_code == 200 and r.headers["x-riprap-reason"] == "breaker-open"
        assert r.headers["x-riprap-fallback"] == "stale" and r.json()["server"] == "recs"
        # a user never seen: the file fallback
        r = story.recommend("u-new")
        assert r.status_code == 200 and r.headers["x-riprap-fallback"] == "static"
        assert r.json() == {"items": ["gift-card"], "source": "static fallback"}
        # copies were sent after 30 ms: counted as hedges, not as retries (Envoy counts
        # both as retries; no answer was a 503 or a failed connection)
        assert until(lambda: story.metric("riprap_hedges_total", service="recommendations") >= 2)
        assert story.metric("riprap_retries_total", service="recommendations") == 0.0
        assert story.metric("riprap_breaker_transitions_total", service="recommendations",
                            shard="", state="open") >= 1
        assert story.metric("riprap_fallbacks_total", service="recommendations", kind="stale") >= 1
        assert story.metric("riprap_fallbacks_total", service="recommendations", kind="static") >= 1
        assert "attempt to compare" not in story.logs()
    finally:
        story.recs.recover()


def test_ejections_are_counted_per_endpoint(story: Story) -> None:
    """Step 2: the replica answering 503 is ejected; /state and riprap_ejections_total say
    which one (Envoy's own statistics count ejections per cluster only)."""
    story.pay_2.set(error_rate=1.0)
    try:
        for i in range(30):
            r = story.client.post("/charge", headers={"Host": "payments", "Idempotency-Key": f"k{i}"})
            assert r.status_code == 200 and r.json()["server"] == "payments-1"  # retried there
        bad = story.pay_2.url
        assert until(lambda: story.metric("riprap_ejections_total", service="payments",
                                          endpoint=bad) >= 1), story.metrics()
        eps = {e["url"]: e for e in story.state()["services"]["payments"]["endpoints"]}
        assert eps[bad]["ejections"] >= 1 and eps[story.pay_1.url]["ejections"] == 0
        assert story.metric("riprap_ejections_total", service="payments",
                            endpoint=story.pay_1.url) == 0.0
        assert ("riprap_ejections_total", (("endpoint", ""), ("service", "payments"))) \
            not in story.metrics()
    finally:
        story.pay_2.recover()


def test_stale_copies_are_bounded_per_service(story: Story) -> None:
    """As riprap's StaleCache: at most 1024 copies per service, the oldest out first; one
    service's many URLs never push out another service's copies."""
    sku = _sku_on(story, story.inv_a)
    assert story.stock(sku).status_code == 200
    before = story.state()["services"]["inventory"]["stale_cache"]
    assert before["entries"] >= 1 and before["max_entries"] == 1024
    with httpx.Client(base_url=story.client.base_url, trust_env=False, timeout=10,
                      headers={"Host": "catalog"}) as c:
        for i in range(1100):
            assert c.get(f"/item/{i}").status_code == 200
        story.recs.set(mode="refuse")
        try:
            newest, oldest = c.get("/item/1099"), c.get("/item/3")
            assert newest.status_code == 200 and newest.headers["x-riprap-fallback"] == "stale"
            assert oldest.status_code == 502  # pushed out: no copy, no other fallback
        finally:
            story.recs.recover()
    caches = until(lambda: (lambda s: s if s["catalog"]["stale_cache"]["entries"] == 1024 else None)(
        story.state()["services"]))
    assert caches, story.state()["services"]["catalog"]["stale_cache"]
    assert caches["inventory"]["stale_cache"]["entries"] == before["entries"]
