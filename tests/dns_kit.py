"""A small authoritative DNS server on loopback for the tests (dnslib), UDP and TCP.

    with FakeDns() as dns:                      # 127.0.0.1, one free port for UDP and TCP
        dns.set("pool.test", a=["127.0.0.2", "127.0.0.3"], aaaa=["::1"])
        dns.address                             # "127.0.0.1:PORT", for `resolver ...`
        dns.mode = "servfail"                   # also "refused", "drop" (no answer), "ok"
        dns.truncate.add("pool.test")           # UDP answers carry TC and no records
        dns.stop(); dns.start()                 # down, then up again on the same port

A name that was never `set` (or was `remove`d) answers NXDOMAIN; a name set with no
records answers NOERROR with none. `queries` records (protocol, name, type) of each
question, so a test can see a TCP retry.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, SOA, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, fake: "FakeDns") -> None:
        self.fake = fake

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        fake = self.fake
        reply = request.reply()
        qname = str(request.q.qname)
        qtype = QTYPE[request.q.qtype]
        name = _norm(qname)
        with fake.lock:
            fake.queries.append((handler.protocol, name, qtype))
            mode = fake.mode
            records = fake.records.get(name)
            truncate = name in fake.truncate
        if mode == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if mode == "refused":
            reply.header.rcode = RCODE.REFUSED
            return reply
        if records is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return _negative(reply, qname)
        if truncate and handler.protocol == "udp":
            reply.header.tc = 1
            return reply
        for address in records.get(qtype, ()):
            rdata = A(address) if qtype == "A" else AAAA(address)
            reply.add_answer(RR(qname, request.q.qtype, rdata=rdata, ttl=0))
        if not reply.rr:
            return _negative(reply, qname)
        if handler.protocol == "udp" and fake.udp_limit and len(reply.pack()) > fake.udp_limit:
            reply.rr = []  # too big for UDP: TC set, question kept (dnslib's truncate drops it)
            reply.header.tc = 1
        return reply


def _negative(reply: DNSRecord, qname: str) -> DNSRecord:
    """NXDOMAIN / no data, with the SOA an authoritative server sends (RFC 2308); its
    TTLs of 0 say "do not cache", so each lookup sees the records as they are now."""
    soa = SOA("ns.test.", "hostmaster.test.", (1, 60, 60, 60, 0))
    reply.add_auth(RR(qname, QTYPE.SOA, rdata=soa, ttl=0))
    return reply


class _Handler(DNSHandler):  # type: ignore[misc]
    def handle(self) -> None:
        fake = self.server.resolver.fake
        if fake.mode == "drop":
            return  # no answer: the client times out
        super().handle()


class FakeDns:
    """An authoritative server whose records the test changes while it serves."""

    def __init__(self, host: str = "127.0.0.1", udp_limit: int = 0) -> None:
        self.host = host
        self.udp_limit = udp_limit  # like a real server: UDP answers above it come truncated
        self.port = 0
        self.lock = threading.Lock()
        self.records: dict[str, dict[str, list[str]]] = {}
        self.truncate: set[str] = set()
        self.mode = "ok"
        self.queries: list[tuple[str, str, str]] = []
        self._servers: list[DNSServer] = []

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def set(self, name: str, a: list[str] | None = None, aaaa: list[str] | None = None) -> None:
        with self.lock:
            self.records[_norm(name)] = {"A": list(a or []), "AAAA": list(aaaa or [])}

    def remove(self, name: str) -> None:
        with self.lock:
            self.records.pop(_norm(name), None)

    def count(self, protocol: str, name: str | None = None) -> int:
        with self.lock:
            return sum(1 for p, n, _ in self.queries
                       if p == protocol and (name is None or n == _norm(name)))

    def start(self) -> "FakeDns":
        logger = DNSLogger(log="-request,-reply,-truncated,-recv,-send,-data", prefix=False)
        resolver = _Resolver(self)
        for _ in range(50):
            try:
                udp = DNSServer(resolver, address=self.host, port=self.port, logger=logger,
                                handler=_Handler)
                port = udp.server.server_address[1]
                try:
                    tcp = DNSServer(resolver, address=self.host, port=port, tcp=True,
                                    logger=logger, handler=_Handler)
                except OSError:
                    udp.server.server_close()
                    if self.port:
                        raise
                    continue
            except OSError:
                if self.port:  # restarting on our own port: it may take a moment
                    threading.Event().wait(0.05)
                    continue
                raise
            self.port = port
            self._servers = [udp, tcp]
            for server in self._servers:
                thread = threading.Thread(target=server.server.serve_forever,
                                          kwargs={"poll_interval": 0.02}, daemon=True)
                thread.start()
            return self
        raise OSError(f"could not bind UDP and TCP on {self.host}:{self.port}")

    def stop(self) -> None:
        """Down: both sockets closed (UDP queries then get ICMP port unreachable)."""
        for server in self._servers:
            server.server.shutdown()
            server.server.server_close()
        self._servers = []

    def __enter__(self) -> "FakeDns":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port_on(hosts: list[str]) -> int:
    """A TCP port free on every one of `hosts` (each upstream of a pool binds it)."""
    for _ in range(100):
        probe = socket.socket(socket.AF_INET6 if ":" in hosts[0] else socket.AF_INET)
        probe.bind((hosts[0], 0))
        port = int(probe.getsockname()[1])
        others: list[socket.socket] = []
        try:
            for host in hosts[1:]:
                s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
                others.append(s)
                s.bind((host, port))
        except OSError:
            continue
        finally:
            probe.close()
            for s in others:
                s.close()
        return port
    raise OSError(f"no port free on all of {hosts}")


__all__ = ["FakeDns", "free_port_on"]
