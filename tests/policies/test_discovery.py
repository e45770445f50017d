"""policies.discovery against a real DNS server on loopback (tests/dns_kit.py): A and
AAAA lookups on a non-53 port, answers and failures, TCP after a truncated UDP answer, and
how a line's address set follows lookups (kept, added, removed, kept on failure)."""

from __future__ import annotations

import asyncio
import time

import pytest
from dns_kit import FakeDns

from dsl.plan import EndpointSpec
from policies.clock import SystemClock
from policies.discovery import (
    Discovery,
    DnsResolver,
    FamilyAnswer,
    Lookup,
    ResolvedLine,
    address_url,
    needs_lookup,
    parse_server,
    run_line,
)


def resolver_for(dns: FakeDns, lifetime: float = 2.5) -> DnsResolver:
    return DnsResolver([dns.address], timeout=min(1.0, lifetime), lifetime=lifetime)


# -- parsing -------------------------------------------------------------------------


def test_parse_server() -> None:
    assert parse_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_server("[::1]:53") == ("::1", 53)
    assert parse_server("kube-dns.kube-system:53") == ("kube-dns.kube-system", 53)
    for bad in ("127.0.0.1", "::1:53", "[::1]", "host:0", "host:99999", ":53", "[zz]:53"):
        with pytest.raises(ValueError):
            parse_server(bad)


def test_address_url_keeps_scheme_port_and_path() -> None:
    assert address_url("http://pool.test:8080", "127.0.0.2") == "http://127.0.0.2:8080"
    assert address_url("https://pool.test/api/v1", "10.0.0.1") == "https://10.0.0.1/api/v1"
    assert address_url("http://pool.test:81/x", "::1") == "http://[::1]:81/x"


def test_needs_lookup() -> None:
    assert needs_lookup(EndpointSpec("http://pool.test:80", resolve=5.0))
    assert not needs_lookup(EndpointSpec("http://pool.test:80"))
    assert not needs_lookup(EndpointSpec("http://127.0.0.1:80", resolve=5.0))  # nothing to resolve
    assert not needs_lookup(EndpointSpec("http://[::1]:80", resolve=5.0))


# -- lookups against the server -------------------------------------------------------


async def test_a_and_aaaa_on_a_non_53_port(fake_dns: FakeDns) -> None:
    fake_dns.set("pool.test", a=["127.0.0.3", "127.0.0.2"], aaaa=["::1"])
    got = await resolver_for(fake_dns).lookup("pool.test")
    assert got.result == "ok" and not got.failed
    assert got.v4.addresses == ("127.0.0.2", "127.0.0.3")  # sorted: no churn from rotation
    assert got.v6.addresses == ("::1",)
    assert fake_dns.count("udp", "pool.test") == 2


async def test_empty_answer_and_nxdomain_are_answers(fake_dns: FakeDns) -> None:
    fake_dns.set("empty.test")
    r = resolver_for(fake_dns)
    empty = await r.lookup("empty.test")
    assert (empty.result, empty.failed, empty.v4.addresses, empty.v6.addresses) == (
        "empty", False, (), ())
    gone = await r.lookup("missing.test")
    assert (gone.result, gone.failed, gone.v4.addresses) == ("nxdomain", False, ())


@pytest.mark.parametrize("mode, result", [("servfail", "servfail"), ("refused", "refused")])
async def test_error_rcodes_are_failures(fake_dns: FakeDns, mode: str, result: str) -> None:
    fake_dns.set("pool.test", a=["127.0.0.2"])
    fake_dns.mode = mode
    got = await resolver_for(fake_dns).lookup("pool.test")
    assert got.failed and got.result == result
    assert got.v4.addresses is None and got.v6.addresses is None
    assert mode.upper() in (got.error or "") and fake_dns.address in (got.error or "")


async def test_no_answer_is_a_bounded_timeout(fake_dns: FakeDns) -> None:
    fake_dns.mode = "drop"
    t0 = time.monotonic()
    got = await resolver_for(fake_dns, lifetime=0.4).lookup("pool.test")
    assert got.failed and got.result == "timeout"
    assert time.monotonic() - t0 < 1.5


async def test_server_down_is_a_failure_not_a_hang(fake_dns: FakeDns) -> None:
    fake_dns.stop()
    t0 = time.monotonic()
    got = await resolver_for(fake_dns, lifetime=0.5).lookup("pool.test")
    assert got.failed and got.result in ("unreachable", "timeout")
    assert time.monotonic() - t0 < 1.5


async def test_truncated_udp_answer_is_retried_over_tcp(fake_dns: FakeDns) -> None:
    many = [f"127.0.1.{i}" for i in range(1, 201)]  # 200 addresses: over any UDP size
    fake_dns.set("big.test", a=many)
    fake_dns.truncate.add("big.test")
    got = await resolver_for(fake_dns).lookup("big.test")
    assert got.result == "ok" and got.v4.addresses is not None
    assert len(got.v4.addresses) == 200
    assert fake_dns.count("udp", "big.test") >= 1
    assert fake_dns.count("tcp", "big.test") >= 1


async def test_lookups_do_not_block_the_loop(fake_dns: FakeDns) -> None:
    fake_dns.mode = "drop"
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await resolver_for(fake_dns, lifetime=0.3).lookup("pool.test")
    task.cancel()
    assert ticks >= 15  # the loop kept turning through a 0.3 s unanswered lookup


# -- a line follows its lookups ----------------------------------------------------------


class Ep:
    def __init__(self, address: str) -> None:
        self.address = address


def line(every: float = 5.0) -> ResolvedLine:
    ln = ResolvedLine(EndpointSpec("http://pool.test:8080", weight=2, resolve=every),
                      "payments", None)
    ln.make_endpoint = Ep
    return ln


def ok(*v4: str, v6: tuple[str, ...] = ()) -> Lookup:
    return Lookup(FamilyAnswer(tuple(v4), "ok"), FamilyAnswer(v6, "ok" if v6 else "empty"))


FAIL = Lookup(FamilyAnswer(None, "timeout", "no answer"), FamilyAnswer(None, "timeout", "x"))


def test_an_address_that_stays_keeps_its_endpoint() -> None:
    ln = line()
    assert ln.apply(ok("127.0.0.2", "127.0.0.3"), 0.0) == (["127.0.0.2", "127.0.0.3"], [])
    first = ln.by_address["127.0.0.2"]
    assert ln.apply(ok("127.0.0.2", "127.0.0.4"), 5.0) == (["127.0.0.4"], ["127.0.0.3"])
    assert ln.by_address["127.0.0.2"] is first
    assert [e.address for e in ln.endpoints] == ["127.0.0.2", "127.0.0.4"]
    assert ln.apply(ok("127.0.0.2", "127.0.0.4"), 10.0) == ([], [])  # no change: no swap
    assert ln.next_due == 15.0 and ln.lookups == 3


def test_a_failed_lookup_keeps_the_last_addresses() -> None:
    ln = line()
    ln.apply(ok("127.0.0.2"), 0.0, wall=100.0)
    assert ln.apply(FAIL, 5.0, wall=105.0) == ([], [])
    assert ln.addresses == ("127.0.0.2",)
    assert ln.result == "timeout" and ln.last_error is not None and ln.failures == 1
    assert ln.resolved_at == 100.0 and ln.checked_at == 105.0
    snap = ln.snapshot()
    assert snap["addresses"] == ["127.0.0.2"] and snap["result"] == "timeout"
    assert snap["resolved_at"].startswith("1970-01-01T00:01:40")


def test_a_failed_family_keeps_its_own_addresses_only() -> None:
    ln = line()
    ln.apply(ok("127.0.0.2", v6=("::1",)), 0.0)
    half = Lookup(FamilyAnswer(("127.0.0.3",), "ok"), FamilyAnswer(None, "servfail", "SERVFAIL"))
    assert ln.apply(half, 5.0) == (["127.0.0.3"], ["127.0.0.2"])
    assert ln.addresses == ("127.0.0.3", "::1")
    assert half.result == "servfail"


def test_an_empty_answer_empties_the_line() -> None:
    ln = line()
    ln.apply(ok("127.0.0.2"), 0.0)
    empty = Lookup(FamilyAnswer((), "nxdomain"), FamilyAnswer((), "nxdomain"))
    assert empty.result == "nxdomain" and not empty.failed
    assert ln.apply(empty, 5.0) == ([], ["127.0.0.2"])
    assert ln.endpoints == () and ln.addresses == ()


async def test_run_line_re_resolves_every_interval(fake_dns: FakeDns) -> None:
    fake_dns.set("pool.test", a=["127.0.0.2"])
    ln = line(every=0.1)
    changes: list[list[str]] = []
    ln.on_change = lambda new: changes.append([e.address for e in new])  # type: ignore[func-returns-value]
    task = asyncio.create_task(run_line(ln, resolver_for(fake_dns), SystemClock()))
    try:
        for _ in range(200):
            if ln.addresses == ("127.0.0.2",):
                break
            await asyncio.sleep(0.01)
        fake_dns.set("pool.test", a=["127.0.0.2", "127.0.0.5"])
        for _ in range(200):
            if ln.addresses == ("127.0.0.2", "127.0.0.5"):
                break
            await asyncio.sleep(0.01)
        assert ln.addresses == ("127.0.0.2", "127.0.0.5")
        assert changes == [["127.0.0.2"], ["127.0.0.5"]]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_discovery_keeps_one_task_per_line_and_restarts_a_changed_one(
        fake_dns: FakeDns) -> None:
    fake_dns.set("pool.test", a=["127.0.0.2"])
    disc = Discovery(SystemClock())
    a, b = line(every=30.0), line(every=30.0)
    servers = [fake_dns.address]
    await disc.prime([a, b], servers)  # the first lookups, awaited
    assert a.addresses == b.addresses == ("127.0.0.2",) and a.lookups == 1
    assert disc.run([a, b], servers) == []
    first = {id(ln): t for ln, t in ((x, disc._tasks[id(x)][3]) for x in (a, b))}
    a.every = 0.05  # a reload changed `every`: its task restarts, due from the last lookup
    stopped = disc.run([a], servers)  # and b is gone from the plan
    assert len(stopped) == 2 and all(t.cancelled() or t.cancelling() for t in stopped)
    assert disc._tasks[id(a)][3] is not first[id(a)] and disc.lines() == [a]
    for _ in range(100):
        if a.lookups >= 3:
            break
        await asyncio.sleep(0.02)
    assert a.lookups >= 3 and b.lookups == 1
    await disc.stop()
    assert disc.lines() == []
