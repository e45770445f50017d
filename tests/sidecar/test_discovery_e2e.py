"""Service discovery end to end: a real `riprap run` process, a real DNS server on loopback
(tests/dns_kit.py) whose records the tests change while the sidecar runs, and a real
upstream on each address (127.0.0.2, 127.0.0.3, ... and [::1], all on one port).

Covers: calls spread over a name's addresses (with `Host` the name); addresses added and
removed under load with no failed call; an ejected address still ejected after a
re-resolution that keeps it; a new address not used before its first health check
passes; the DNS server down (last set kept, calls succeed, visible at /state, in the
metrics and in one log line); an empty answer (failover, or no-healthy-endpoint); AAAA on
[::1]; a truncated UDP answer retried over TCP; a hot reload that changes `every`.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest
from dns_kit import FakeDns, free_port_on

from riprap_testing.faults import FaultServer

pytestmark = pytest.mark.slow

ADDRS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"]
ORDER = ["fallback", "limit", "concurrency", "timeout", "retry", "hedge", "breaker", "chaos",
         "balance"]


def service(name: str, endpoints: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name, "hosts": [], "endpoints": endpoints, "balance": "round-robin",
        "health": None, "outlier": None, "timeout": 5.0, "retry": None, "hedge": None,
        "breaker": None, "limit": None, "concurrency": None, "fallbacks": [], "chaos": [],
        "tls": None, "sharding": None, "shards": [], "order": ORDER,
        "max_body_buffer": 1048576,
    }
    doc.update(over)
    return doc


def ep(url: str, every: float | None = 1.0, tier: int = 0) -> dict[str, Any]:
    return {"url": url, "weight": 1, "tier": tier, "resolve": every}


class World:
    """The DNS server, the upstreams, the plan file and the sidecar."""

    def __init__(self, root: Path, sidecar_proc: Any) -> None:
        self.dns = FakeDns().start()
        self.port = free_port_on(ADDRS + ["::1"])
        self.ups = {a: FaultServer(name=a, host=a, port=self.port).start() for a in ADDRS}
        self.ups["::1"] = FaultServer(name="::1", host="::1", port=self.port).start()
        self.ups["6"] = self.ups["127.0.0.6"]
        self.ups["127.0.0.6"].set(error_rate=1.0, error_status=500)  # always fails
        self.backup = FaultServer(name="backup").start()
        self.root = root
        self.path = root / "plan.json"
        d = self.dns
        d.set("spread.test", a=ADDRS[:3])
        d.set("churn.test", a=ADDRS[:2])
        d.set("eject.test", a=["127.0.0.2", "127.0.0.6"])
        d.set("checked.test", a=["127.0.0.2"])
        d.set("empty.test", a=["127.0.0.2"])
        d.set("v6.test", aaaa=["::1"])
        d.set("big.test", a=ADDRS[:2])
        d.truncate.add("big.test")
        d.set("reload.test", a=["127.0.0.2"])
        self.write(reload_every=30.0)
        self.proc = sidecar_proc(self.path, "--grace", "0").start()

    def url(self, host: str) -> str:
        return f"http://{host}:{self.port}"

    def plan(self, reload_every: float) -> dict[str, Any]:
        u = self.url
        services = {
            "spread": service("spread", [ep(u("spread.test"))]),
            "churn": service("churn", [ep(u("churn.test"), every=0.2)]),
            "eject": service("eject", [ep(u("eject.test"), every=0.2)],
                             outlier={"failures": 1, "eject": 60.0, "max_fraction": 0.5}),
            "checked": service("checked", [ep(u("checked.test"), every=0.2)],
                               health={"path": "/healthz", "method": "GET", "interval": 0.2,
                                       "timeout": 0.5, "fall": 1, "rise": 3,
                                       "expect": ["2xx"]}),
            "emptyfo": service("emptyfo", [ep(u("empty.test"), every=0.2),
                                           ep(self.backup.url, every=None, tier=1)]),
            "emptynone": service("emptynone", [ep(u("empty.test"), every=0.2)]),
            "v6": service("v6", [ep(u("v6.test"))]),
            "big": service("big", [ep(u("big.test"))]),
            "reload": service("reload", [ep(u("reload.test"), every=reload_every)]),
        }
        return {"version": 1, "app": "dns-e2e", "listen": "127.0.0.1:7400",
                "admin": "127.0.0.1:7401", "services": services, "supervise": None,
                "resolver": [self.dns.address], "store": None}

    def write(self, reload_every: float) -> None:
        tmp = self.path.with_name(f".plan.{time.monotonic_ns()}.json")
        tmp.write_text(json.dumps(self.plan(reload_every)))
        tmp.replace(self.path)

    def get(self, svc: str, path: str = "/who") -> Any:
        return self.proc.client.get(f"/{svc}{path}")

    def servers(self, svc: str, n: int) -> Counter[str]:
        seen: Counter[str] = Counter()
        for _ in range(n):
            r = self.get(svc)
            assert r.status_code == 200, (r.status_code, r.headers, r.text)
            seen[r.json()["server"]] += 1
        return seen

    def state(self, svc: str) -> dict[str, Any]:
        return self.proc.admin.get("/state").json()["services"][svc]  # type: ignore[no-any-return]

    def line(self, svc: str) -> dict[str, Any]:
        (line,) = self.state(svc)["lines"]
        return line  # type: ignore[no-any-return]

    def addresses(self, svc: str) -> list[str]:
        return self.line(svc)["addresses"]  # type: ignore[no-any-return]

    def close(self) -> None:
        try:
            self.proc.stop()
        finally:
            self.dns.stop()
            for up in {id(u): u for u in self.ups.values()}.values():
                up.stop()
            self.backup.stop()


@pytest.fixture(scope="module")
def world(module_tmp: Path, sidecar_proc: Any) -> Iterator[World]:
    w = World(module_tmp, sidecar_proc)
    yield w
    w.close()


def test_calls_spread_over_every_address_with_the_name_as_host(world: World) -> None:
    seen = world.servers("spread", 30)
    assert set(seen) == set(ADDRS[:3]), seen
    assert min(seen.values()) >= 5, seen  # round-robin: even shares
    r = world.get("spread")
    assert dict(r.json()["headers"])["host"] == f"spread.test:{world.port}"
    line = world.line("spread")
    assert line["addresses"] == ADDRS[:3] and line["result"] == "ok"
    assert line["resolved_at"] is not None and line["last_error"] is None
    eps = world.state("spread")["endpoints"]
    assert [e["url"] for e in eps] == [f"http://{a}:{world.port}" for a in ADDRS[:3]]
    assert {e["line"] for e in eps} == {world.url("spread.test")}


def test_addresses_added_and_removed_under_load_fail_no_call(world: World) -> None:
    statuses: Counter[int] = Counter()
    servers: list[str] = []
    stop = threading.Event()

    def load() -> None:
        import httpx

        with httpx.Client(base_url=world.proc.url, trust_env=False, timeout=10) as c:
            deadline = time.monotonic() + 20
            while not stop.is_set() and time.monotonic() < deadline:
                r = c.get("/churn/who?delay=0.02")
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    servers.append(r.json()["server"])

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        world.dns.set("churn.test", a=ADDRS[:3])  # scale up
        world.proc.wait_for(lambda: "127.0.0.4" in servers, timeout=5, what="the new address")
        world.dns.set("churn.test", a=ADDRS[1:3])  # scale down: 127.0.0.2 goes
        world.proc.wait_for(lambda: world.addresses("churn") == ADDRS[1:3], timeout=5,
                            what="the removed address to leave")
        mark = len(servers)
        world.proc.wait_for(lambda: len(servers) > mark + 40, timeout=10, what="more calls")
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert statuses and set(statuses) == {200}, statuses
    late = servers[mark + 8:]  # after the calls in flight at the swap
    assert late and "127.0.0.2" not in late and set(late) == set(ADDRS[1:3]), Counter(late)


def test_an_ejected_address_stays_ejected_across_re_resolution(world: World) -> None:
    world.proc.wait_for(lambda: len(world.state("eject")["endpoints"]) == 2, what="2 addresses")
    bad = f"http://127.0.0.6:{world.port}"
    for _ in range(4):  # round-robin reaches 127.0.0.6 within two calls: a 500, ejected
        world.get("eject")
    (ej,) = [e for e in world.state("eject")["endpoints"] if e["url"] == bad]
    assert ej["ejected"] and ej["ejections"] == 1
    world.dns.set("eject.test", a=["127.0.0.2", "127.0.0.3", "127.0.0.6"])  # keeps it
    world.proc.wait_for(lambda: len(world.state("eject")["endpoints"]) == 3, what="3 addresses")
    before = world.ups["127.0.0.6"].hits
    assert set(world.servers("eject", 12)) == {"127.0.0.2", "127.0.0.3"}
    assert world.ups["127.0.0.6"].hits == before
    (ej,) = [e for e in world.state("eject")["endpoints"] if e["url"] == bad]
    assert ej["ejected"] and ej["ejections"] == 1


def test_a_new_address_is_not_used_before_its_first_health_check_passes(world: World) -> None:
    assert set(world.servers("checked", 4)) == {"127.0.0.2"}
    world.dns.set("checked.test", a=["127.0.0.2", "127.0.0.6"])  # .6 fails its checks
    world.proc.wait_for(lambda: len(world.state("checked")["endpoints"]) == 2, what="2 addresses")
    assert set(world.servers("checked", 10)) == {"127.0.0.2"}
    eps = {e["address"]: e for e in world.state("checked")["endpoints"]}
    assert eps["127.0.0.6"]["healthy"] is False and eps["127.0.0.2"]["healthy"] is True
    world.dns.set("checked.test", a=["127.0.0.2", "127.0.0.3"])  # .3 passes: in at once
    world.proc.wait_for(lambda: {e["address"]: e["healthy"] for e in
                                 world.state("checked")["endpoints"]}.get("127.0.0.3") is True,
                        timeout=3, what="127.0.0.3 healthy after one check (rise 3)")
    assert set(world.servers("checked", 10)) == {"127.0.0.2", "127.0.0.3"}


def test_aaaa_records_reach_an_upstream_on_ipv6_loopback(world: World) -> None:
    assert set(world.servers("v6", 3)) == {"::1"}
    assert world.addresses("v6") == ["::1"]
    r = world.get("v6")
    assert dict(r.json()["headers"])["host"] == f"v6.test:{world.port}"


def test_a_truncated_udp_answer_is_retried_over_tcp(world: World) -> None:
    assert set(world.servers("big", 10)) == set(ADDRS[:2])
    assert world.dns.count("tcp", "big.test") >= 1


def test_an_empty_answer_empties_the_line(world: World) -> None:
    assert world.servers("emptyfo", 2) == Counter({"127.0.0.2": 2})
    world.dns.set("empty.test")  # NOERROR, no records
    world.proc.wait_for(lambda: world.addresses("emptynone") == [] and
                        world.addresses("emptyfo") == [], what="the lines to empty")
    assert world.servers("emptyfo", 3) == Counter({"backup": 3})  # the failover tier
    r = world.get("emptynone")
    assert r.status_code == 503 and r.headers["x-riprap-reason"] == "no-healthy-endpoint"
    assert world.line("emptynone")["result"] == "empty"
    world.dns.remove("empty.test")  # NXDOMAIN: still empty
    world.proc.wait_for(lambda: world.line("emptynone")["result"] == "nxdomain", what="NXDOMAIN")
    world.dns.set("empty.test", a=["127.0.0.3"])
    world.proc.wait_for(lambda: world.addresses("emptyfo") == ["127.0.0.3"], what="back")
    assert world.servers("emptyfo", 2) == Counter({"127.0.0.3": 2})


def test_dns_down_keeps_the_last_addresses_and_says_so(world: World) -> None:
    line = world.url("spread.test")
    ok_before = world.proc.metric("riprap_dns_lookups_total", service="spread", line=line,
                                  result="ok")
    assert ok_before >= 1
    assert world.proc.metric("riprap_dns_addresses", service="spread", line=line) == 3
    world.dns.stop()
    try:
        world.proc.wait_for(lambda: world.line("spread")["result"] == "timeout", timeout=8,
                            what="a failed lookup")
        assert set(world.servers("spread", 9)) == set(ADDRS[:3])  # the last set, still served
        snap = world.line("spread")
        assert snap["addresses"] == ADDRS[:3] and "no answer" in snap["last_error"]
        assert world.proc.metric("riprap_dns_lookups_total", service="spread", line=line,
                                 result="timeout") >= 1
        assert world.proc.metric("riprap_dns_addresses", service="spread", line=line) == 3
    finally:
        world.dns.start()
    world.proc.wait_for(lambda: world.line("spread")["result"] == "ok", timeout=8,
                        what="lookups answered again")
    assert world.line("spread")["last_error"] is None
    logs = world.proc.logs()
    # one line per state change, not one per failed lookup
    assert logs.count("DNS lookup of spread.test failed") == 1, logs
    assert logs.count("DNS lookup of spread.test answers again") == 1, logs


def test_a_hot_reload_that_changes_every_takes_effect(world: World) -> None:
    assert world.line("reload")["every"] == 30.0
    looked = world.line("reload")["lookups"]
    world.dns.set("reload.test", a=["127.0.0.2", "127.0.0.3"])
    time.sleep(0.5)
    assert world.addresses("reload") == ["127.0.0.2"]  # every 30s: not looked up again yet
    old = world.proc.plan()["hash"]
    world.write(reload_every=0.2)
    world.proc.wait_for(lambda: world.proc.plan()["hash"] != old, what="the reload")
    world.proc.wait_for(lambda: world.addresses("reload") == ["127.0.0.2", "127.0.0.3"],
                        timeout=3, what="the new interval's lookup")
    line = world.line("reload")
    assert line["every"] == 0.2 and line["lookups"] > looked  # the same line, carried
    assert set(world.servers("reload", 6)) == {"127.0.0.2", "127.0.0.3"}
