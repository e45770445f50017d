"""Service discovery: `endpoint|failover URL ... resolve [every D]` lines, looked up in DNS.

A resolved line's host name is looked up (A and AAAA, in parallel) when the plan loads
and every D after that, by a background task per line. Each address becomes an endpoint
of the line's tier with the URL's scheme, port and path; `Host` and TLS SNI stay the name
(`policies.endpoint.EndpointRuntime(address=...)`). The lookups use dnspython's asyncio
resolver (`dns.asyncresolver`): UDP, retried over TCP when an answer is truncated,
bounded per-query timeouts and a bounded total, never blocking the event loop. The
servers are the plan's `resolver HOST:PORT, ...` or the system's (`/etc/resolv.conf`).

What a lookup does to a line (`ResolvedLine.apply`):
- an address that stays keeps its `EndpointRuntime` (health, ejection, in-flight count);
- a new address starts fresh (unhealthy until its first check passes when the shard has
  `health`, as Envoy does), a removed one leaves the pool (calls in flight finish);
- a failed query (timeout, SERVFAIL, REFUSED, unreachable) keeps the last addresses of
  its family; an answer with no address (NOERROR with no records, NXDOMAIN) empties it.
A and AAAA are kept apart so that a server that fails AAAA queries (some forwarders do)
cannot stall the A records.

Nothing here runs on a call: the line's owner (a shard) swaps its endpoint list in one
assignment when the address set changes (`on_change`), and calls read it once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from dsl.plan import EndpointSpec
from policies.clock import Clock

log = logging.getLogger("riprap.discovery")

DEFAULT_EVERY = 5.0  # `resolve` without `every`
QUERY_TIMEOUT = 1.0  # one query to one server
LOOKUP_LIFETIME = 2.5  # one lookup, every server and retry included
EDNS_PAYLOAD = 1232  # the DNS flag day's safe UDP size; a larger answer comes over TCP

# Lookup results (the `result` label of riprap_dns_lookups_total): the first three are
# answers, the rest failures (the last addresses are kept).
ANSWERS = ("ok", "empty", "nxdomain")
FAILURES = ("timeout", "servfail", "refused", "unreachable", "error")
RESULTS = ANSWERS + FAILURES


@dataclass(frozen=True, slots=True)
class FamilyAnswer:
    """One query's outcome: its addresses (None when it failed), result and error text."""

    addresses: tuple[str, ...] | None
    result: str
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Lookup:
    """One lookup of a name: the A and AAAA outcomes and their combined result."""

    v4: FamilyAnswer
    v6: FamilyAnswer

    @property
    def result(self) -> str:
        """The first failure if a query failed, else `ok` / `nxdomain` / `empty`."""
        for fam in (self.v4, self.v6):
            if fam.addresses is None:
                return fam.result
        if self.v4.addresses or self.v6.addresses:
            return "ok"
        if self.v4.result == "nxdomain" and self.v6.result == "nxdomain":
            return "nxdomain"
        return "empty"

    @property
    def failed(self) -> bool:
        return self.v4.addresses is None or self.v6.addresses is None

    @property
    def error(self) -> str | None:
        errors = [f"{kind}: {fam.error}" for kind, fam in (("A", self.v4), ("AAAA", self.v6))
                  if fam.error is not None]
        return "; ".join(errors) if errors else None


def parse_server(text: str) -> tuple[str, int]:
    """`HOST:PORT` (HOST an IPv4 address, `[IPv6]` or a name) as (host, port).

    ValueError with the reason for anything else (the checker reports it located)."""
    s = text.strip()
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or s[end + 1:end + 2] != ":":
            raise ValueError(f"resolver {text!r} is not HOST:PORT (IPv6 as [::1]:53)")
        host, port_text = s[1:end], s[end + 2:]
        ipaddress.IPv6Address(host)
    else:
        host, sep, port_text = s.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(f"resolver {text!r} is not HOST:PORT (IPv6 as [::1]:53)")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"resolver {text!r}: the port must be 1..65535")
    return host, int(port_text)


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def needs_lookup(spec: EndpointSpec) -> bool:
    """Does this endpoint line ask for DNS? (`resolve` on an IP literal: nothing to look up.)"""
    if spec.resolve is None:
        return False
    host = urlsplit(spec.url).hostname
    return bool(host) and not is_ip_literal(host or "")


def _address_key(address: str) -> bytes:
    """Sort key of an address (answers give them canonical: no re-parsing needed)."""
    if ":" in address:
        return b"\x06" + socket.inet_pton(socket.AF_INET6, address)
    return b"\x04" + socket.inet_aton(address)


def _server_text(server: str, port: object) -> str:
    """dnspython's `Do53:HOST@PORT` as `HOST:PORT` (`[IPv6]:PORT`)."""
    host = server.split(":", 1)[1] if server.startswith("Do53:") else server
    host = host.rsplit("@", 1)[0]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _classify(exc: BaseException, lifetime: float = LOOKUP_LIFETIME) -> FamilyAnswer:
    """A query's exception as an answer (NXDOMAIN, no records) or a failure."""
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return FamilyAnswer((), "nxdomain")
    if isinstance(exc, dns.resolver.NoAnswer):
        return FamilyAnswer((), "empty")
    if isinstance(exc, dns.exception.Timeout):
        return FamilyAnswer(None, "timeout", f"no answer within {lifetime:g}s")
    if isinstance(exc, dns.resolver.NoNameservers):
        errors = exc.kwargs.get("errors") or []
        kinds: list[str] = []
        texts: list[str] = []
        for err in errors:
            server, _tcp, port, what = err[0], err[1], err[2], err[3]
            if what == "SERVFAIL":
                kinds.append("servfail")
            elif what == "REFUSED":
                kinds.append("refused")
            elif isinstance(what, OSError):
                kinds.append("unreachable")
            else:
                kinds.append("error")
            text = (f"{what if isinstance(what, str) else type(what).__name__} "
                    f"from {_server_text(str(server), port)}")
            if text not in texts:
                texts.append(text)
        kind = next((k for k in ("servfail", "refused", "unreachable") if k in kinds), "error")
        return FamilyAnswer(None, kind, ", ".join(texts) or "no server answered")
    if isinstance(exc, TimeoutError):
        return FamilyAnswer(None, "timeout", f"no answer within {lifetime:g}s")
    if isinstance(exc, OSError):
        return FamilyAnswer(None, "unreachable", str(exc) or type(exc).__name__)
    return FamilyAnswer(None, "error", str(exc) or type(exc).__name__)


class DnsResolver:
    """A and AAAA lookups against `servers` ("HOST:PORT", any port) or the system's.

    The dnspython resolver is built on first use, off the loop for the system's (it reads
    /etc/resolv.conf); a server given by name is itself looked up once then. No cache:
    every lookup asks the servers, as a re-resolution is meant to."""

    def __init__(self, servers: Sequence[str] = (), *, timeout: float = QUERY_TIMEOUT,
                 lifetime: float = LOOKUP_LIFETIME) -> None:
        self.servers = tuple(servers)
        self._parsed = [parse_server(s) for s in self.servers]
        self.timeout = timeout
        self.lifetime = lifetime
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._building: asyncio.Lock | None = None

    async def _get(self) -> dns.asyncresolver.Resolver:
        if self._resolver is not None:
            return self._resolver
        if self._building is None:
            self._building = asyncio.Lock()
        async with self._building:
            if self._resolver is None:
                self._resolver = await self._build()
        return self._resolver

    async def _build(self) -> dns.asyncresolver.Resolver:
        if not self._parsed:
            resolver = await asyncio.to_thread(dns.asyncresolver.Resolver)
            resolver.timeout = min(resolver.timeout, 2.0)
            resolver.use_search_by_default = True  # short names as the system resolves them
        else:
            resolver = dns.asyncresolver.Resolver(configure=False)
            loop = asyncio.get_running_loop()
            servers: list[dns.nameserver.Nameserver] = []
            for host, port in self._parsed:
                if is_ip_literal(host):
                    servers.append(dns.nameserver.Do53Nameserver(host, port))
                    continue
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
                for info in infos:
                    servers.append(dns.nameserver.Do53Nameserver(str(info[4][0]), port))
            resolver.nameservers = servers
        resolver.timeout = min(resolver.timeout, self.timeout)
        resolver.lifetime = self.lifetime
        resolver.use_edns(0, 0, EDNS_PAYLOAD)
        resolver.cache = None
        return resolver

    async def lookup(self, name: str) -> Lookup:
        """Both families at once; never raises (a failure is a `FamilyAnswer`)."""
        try:
            resolver = await self._get()
        except (OSError, dns.exception.DNSException, ValueError) as exc:
            failed = _classify(exc, self.lifetime)
            return Lookup(failed, failed)
        v4, v6 = await asyncio.gather(self._query(resolver, name, dns.rdatatype.A),
                                      self._query(resolver, name, dns.rdatatype.AAAA))
        return Lookup(v4, v6)

    async def _query(self, resolver: dns.asyncresolver.Resolver, name: str,
                     rdtype: dns.rdatatype.RdataType) -> FamilyAnswer:
        try:
            # the resolver's own lifetime bounds it; this bound only guards against a bug
            async with asyncio.timeout(self.lifetime + 1.0):
                answer = await resolver.resolve(name, rdtype)
        except (dns.exception.DNSException, OSError, TimeoutError) as exc:
            return _classify(exc, self.lifetime)
        found = {rd.address for rd in answer if hasattr(rd, "address")}
        return FamilyAnswer(tuple(sorted(found, key=_address_key)), "ok")


def address_url(spec_url: str, address: str) -> str:
    """The line's URL with its host replaced by `address` (scheme, port and path kept)."""
    parts = urlsplit(spec_url)
    host = f"[{address}]" if ":" in address else address
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if parts.username is not None or parts.password is not None:
        netloc = parts.netloc.rpartition("@")[0] + "@" + netloc
    rest = spec_url.split("://", 1)[1]
    slash = rest.find("/")
    tail = rest[slash:] if slash >= 0 else ""
    return f"{parts.scheme}://{netloc}{tail}"


class ResolvedLine:
    """One resolved endpoint line: its live endpoints (one per address) and lookup state.

    `make_endpoint(address)` builds a new address's endpoint (the owner decides its
    first health state); `on_change()` is called when the address set changed, so the
    owner can swap its endpoint list. Both are set by the owner (`bind`)."""

    def __init__(self, spec: EndpointSpec, service: str, shard: str | None) -> None:
        self.spec = spec
        self.service = service
        self.shard = shard
        host = urlsplit(spec.url).hostname
        if not host:
            raise ValueError(f"endpoint {spec.url!r} has no host name to resolve")
        self.name = host
        self.every = spec.resolve if spec.resolve is not None else DEFAULT_EVERY
        self.v4: tuple[str, ...] = ()
        self.v6: tuple[str, ...] = ()
        self.endpoints: tuple[Any, ...] = ()  # EndpointRuntime, sorted by address
        self.by_address: dict[str, Any] = {}
        self.resolved_at: float | None = None  # wall time of the last answer
        self.checked_at: float | None = None  # wall time of the last lookup, answered or not
        self.last_error: str | None = None
        self.result: str | None = None
        self.lookups = 0
        self.failures = 0
        self.looked_at: float | None = None  # clock time of the last lookup
        self.make_endpoint: Callable[[str], Any] | None = None
        self.on_change: Callable[[list[Any]], Awaitable[None] | None] | None = None

    def same_line(self, spec: EndpointSpec) -> bool:
        """Is `spec` this line again (same URL, weight and tier; `every` may differ)?"""
        return (spec.url, spec.weight, spec.tier) == (self.spec.url, self.spec.weight,
                                                       self.spec.tier)

    @property
    def next_due(self) -> float:
        """Clock time the next lookup is due: `every` after the last one (so a reload
        that changes `every` moves it at once)."""
        return 0.0 if self.looked_at is None else self.looked_at + self.every

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.v4 + self.v6

    def apply(self, lookup: Lookup, now: float, wall: float | None = None) -> tuple[
            list[str], list[str]]:
        """Take one lookup's outcome; (added, removed) addresses."""
        wall = time.time() if wall is None else wall
        self.lookups += 1
        self.checked_at = wall
        self.looked_at = now
        self.result = lookup.result
        self.last_error = lookup.error
        if lookup.failed:
            self.failures += 1
        if lookup.v4.addresses is not None or lookup.v6.addresses is not None:
            self.resolved_at = wall
        v4 = lookup.v4.addresses if lookup.v4.addresses is not None else self.v4
        v6 = lookup.v6.addresses if lookup.v6.addresses is not None else self.v6
        old = self.addresses
        self.v4, self.v6 = v4, v6
        new = self.addresses
        if new == old:
            return [], []
        kept = set(old)
        added = [a for a in new if a not in kept]
        removed = [a for a in old if a not in set(new)]
        by_address: dict[str, Any] = {}
        for address in new:
            ep = self.by_address.get(address)
            if ep is None:
                assert self.make_endpoint is not None, "a line is bound before its first lookup"
                ep = self.make_endpoint(address)
            by_address[address] = ep
        self.by_address = by_address
        self.endpoints = tuple(by_address[a] for a in new)
        return added, removed

    def snapshot(self) -> dict[str, Any]:
        return {
            "url": self.spec.url,
            "name": self.name,
            "tier": self.spec.tier,
            "weight": self.spec.weight,
            "every": self.every,
            "addresses": list(self.addresses),
            "resolved_at": _iso(self.resolved_at),
            "checked_at": _iso(self.checked_at),
            "result": self.result,
            "last_error": self.last_error,
            "lookups": self.lookups,
            "failures": self.failures,
        }


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall * 1000) % 1000:03d}Z"


LookupObserver = Callable[[ResolvedLine, Lookup], None]


async def refresh(line: ResolvedLine, resolver: DnsResolver, clock: Clock,
                  observe: LookupObserver | None = None) -> None:
    """One lookup of the line: apply it, log a state change, tell the owner and observer."""
    lookup = await resolver.lookup(line.name)
    was_failing = line.result in FAILURES
    first = line.lookups == 0
    before = len(line.addresses)
    added, removed = line.apply(lookup, clock.now())
    where = f"service '{line.service}'" + (f" shard '{line.shard}'" if line.shard else "")
    count = len(line.addresses)
    if lookup.failed and not was_failing:
        log.warning("%s: DNS lookup of %s failed (%s: %s); keeping %d address%s",
                    where, line.name, lookup.result, lookup.error, count,
                    "" if count == 1 else "es")
    elif was_failing and not lookup.failed:
        log.info("%s: DNS lookup of %s answers again (%d address%s)", where, line.name,
                 count, "" if count == 1 else "es")
    if added or removed or (first and not lookup.failed):
        if count == 0 and not lookup.failed:
            log.warning("%s: %s has no address (%s); its line is empty", where, line.name,
                        lookup.result)
        else:
            log.info("%s: %s resolves to %d address%s (was %d)%s%s", where, line.name, count,
                     "" if count == 1 else "es", before,
                     f", added {', '.join(added)}" if added else "",
                     f", removed {', '.join(removed)}" if removed else "")
    if observe is not None:
        try:
            observe(line, lookup)
        except Exception:  # noqa: BLE001 - metrics never break discovery
            log.debug("discovery observer failed", exc_info=True)
    if (added or removed) and line.on_change is not None:
        new_eps = [line.by_address[a] for a in added]
        done = line.on_change(new_eps)
        if done is not None:
            await done


async def run_line(line: ResolvedLine, resolver: DnsResolver, clock: Clock,
                   observe: LookupObserver | None = None) -> None:
    """Re-resolve the line every `every` (from its last lookup), until cancelled."""
    while True:
        delay = line.next_due - clock.now()
        if delay > 0:
            await clock.sleep(delay)
        try:
            await refresh(line, resolver, clock, observe)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here must not end discovery
            log.error("discovery of %s stopped on %r; retrying in %ss", line.name, exc,
                      line.every)
            line.looked_at = clock.now()


class Discovery:
    """The background lookups of one transport: one task per resolved line.

    `prime(lines)` runs the first lookup of the lines never looked up (all at once, each
    bounded by the resolver's lifetime), so a plan goes live with its addresses. `run`
    keeps exactly one task per line it is given: a task of a line that is still there
    and whose `every` and servers did not change carries on; the others are cancelled
    (a reload that changes `every` takes effect at once, from the last lookup)."""

    def __init__(self, clock: Clock, observe: LookupObserver | None = None) -> None:
        self.clock = clock
        self.observe = observe
        self._servers: tuple[str, ...] | None = None
        self._resolver: DnsResolver | None = None
        self._tasks: dict[int, tuple[ResolvedLine, float, DnsResolver, asyncio.Task[None]]] = {}

    def resolver(self, servers: Sequence[str]) -> DnsResolver:
        """The resolver for a plan's `resolver` servers (the same one while they stay)."""
        servers = tuple(servers)
        if self._resolver is None or servers != self._servers:
            self._resolver = DnsResolver(servers)
            self._servers = servers
        return self._resolver

    async def prime(self, lines: Sequence[ResolvedLine], servers: Sequence[str]) -> None:
        resolver = self.resolver(servers)
        fresh = [line for line in lines if line.lookups == 0]
        if fresh:
            await asyncio.gather(*(refresh(line, resolver, self.clock, self.observe)
                                   for line in fresh), return_exceptions=True)

    def run(self, lines: Sequence[ResolvedLine], servers: Sequence[str]) -> list[asyncio.Task[None]]:
        """One task per line of `lines`; the cancelled tasks of the others are returned."""
        resolver = self.resolver(servers)
        loop = asyncio.get_running_loop()
        old, keep = self._tasks, {}
        stopped: list[asyncio.Task[None]] = []
        for line in lines:
            entry = old.pop(id(line), None)
            if entry is not None:
                if entry[1] == line.every and entry[2] is resolver and not entry[3].done():
                    keep[id(line)] = entry
                    continue
                stopped.append(entry[3])
            task = loop.create_task(run_line(line, resolver, self.clock, self.observe),
                                    name=f"riprap-dns-{line.service}-{line.name}")
            keep[id(line)] = (line, line.every, resolver, task)
        stopped.extend(entry[3] for entry in old.values())
        for task in stopped:
            task.cancel()
        self._tasks = keep
        return stopped

    async def stop(self, tasks: Sequence[asyncio.Task[None]] | None = None) -> None:
        """Cancel `tasks` (default: every task) and wait for them to end."""
        if tasks is None:
            tasks = [entry[3] for entry in self._tasks.values()]
            self._tasks = {}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def lines(self) -> list[ResolvedLine]:
        return [entry[0] for entry in self._tasks.values()]


__all__ = [
    "ANSWERS", "DEFAULT_EVERY", "FAILURES", "RESULTS", "Discovery", "DnsResolver", "FamilyAnswer",
    "Lookup", "ResolvedLine", "address_url", "is_ip_literal", "needs_lookup",
    "parse_server", "refresh", "run_line",
]
