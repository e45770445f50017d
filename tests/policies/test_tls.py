"""TLS to upstreams (the `tls` statement, section 4): HTTPS upstreams on 127.0.0.1 made
with trustme: a private CA, mutual TLS, SNI and the name check, `verify off`, rotation
without restart, and handshake failures as `upstream-failed` with a log line saying why."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import socket
import ssl
import threading
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import trustme

from dsl.plan import EndpointSpec, Plan, ServicePlan, TlsSpec
from policies.aiohttp_transport import AiohttpTransport
from policies.tls import tls_context, tls_reason
from policies.transport import ResilientTransport
from wire_kit import WireConn, WireUpstream, ok


def server_ctx(ca: trustme.CA, *names: str, client_ca: trustme.CA | None = None,
               **cert: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("127.0.0.1",)), **cert).configure_cert(ctx)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        client_ca.configure_trust(ctx)
    return ctx


def write_ca(ca: trustme.CA, path: Path) -> str:
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def engine(url: str, tls: TlsSpec | None) -> ResilientTransport:
    spec = ServicePlan(name="api", endpoints=(EndpointSpec(url),), timeout=5.0, tls=tls)
    return ResilientTransport(Plan(services={"api": spec}), AiohttpTransport(connect_timeout=2.0))


async def get(rt: ResilientTransport, path: str = "/") -> httpx.Response:
    resp = await rt.handle_async_request(httpx.Request("GET", f"http://api{path}"))
    await resp.aread()
    return resp


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def test_a_private_ca_is_trusted_instead_of_the_system_store(ca: trustme.CA,
                                                                   tmp_path: Path) -> None:
    async with WireUpstream(tls=server_ctx(ca)) as up:
        rt = engine(up.url, TlsSpec(ca=write_ca(ca, tmp_path / "ca.pem")))
        try:
            r = await get(rt, "/secure")
        finally:
            await rt.aclose()
    assert (r.status_code, r.text) == (200, "ok")
    assert up.heads[0].startswith(b"GET /secure HTTP/1.1")


async def test_without_the_ca_the_handshake_fails_as_upstream_failed_saying_unknown_ca(
        ca: trustme.CA, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="riprap.upstream")
    async with WireUpstream(tls=server_ctx(ca)) as up:
        rt = engine(up.url, None)  # the system's trust store does not know this CA
        try:
            r = await get(rt)
        finally:
            await rt.aclose()
    assert r.status_code == 502 and r.headers["x-riprap-reason"] == "upstream-failed"
    assert up.heads == []
    assert any("TLS with https://127.0.0.1" in m and "unknown CA" in m for m in caplog.messages)


async def test_mutual_tls_presents_the_client_certificate(ca: trustme.CA,
                                                           tmp_path: Path) -> None:
    client_ca = trustme.CA()
    client = client_ca.issue_cert("checkout.client")
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    async with WireUpstream(tls=server_ctx(ca, client_ca=client_ca)) as up:
        rt = engine(up.url, TlsSpec(ca=write_ca(ca, tmp_path / "ca.pem"),
                                    cert=str(tmp_path / "client.pem"),
                                    key=str(tmp_path / "client.key")))
        try:
            r = await get(rt)
        finally:
            await rt.aclose()
    assert r.status_code == 200
    assert ("DNS", "checkout.client") in up.conns[0].peer_cert["subjectAltName"]


@contextlib.contextmanager
def refusing_tls_server(ctx: ssl.SSLContext) -> Iterator[int]:
    """A blocking TLS server (one connection) that, like nginx or Envoy, sends its alert
    when the handshake fails (asyncio's own server closes without it)."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        conn.settimeout(5)
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(inc, out, server_side=True)
        try:
            for step in (tls.do_handshake, lambda: tls.read(1)):  # TLS 1.3: checked on read
                while True:
                    try:
                        step()
                        break
                    except ssl.SSLWantReadError:
                        conn.sendall(out.read())
                        data = conn.recv(65536)
                        if not data:
                            return
                        inc.write(data)
        except ssl.SSLError:
            conn.sendall(out.read())  # the alert
            conn.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                while conn.recv(65536):
                    pass
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        thread.join(10)
        srv.close()


async def test_a_server_that_requires_a_client_certificate_refuses_a_call_without_one(
        ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="riprap.upstream")
    with refusing_tls_server(server_ctx(ca, client_ca=trustme.CA())) as port:
        rt = engine(f"https://127.0.0.1:{port}",
                    TlsSpec(ca=write_ca(ca, tmp_path / "ca.pem")))
        try:
            r = await get(rt)
        finally:
            await rt.aclose()
    assert r.status_code == 502 and r.headers["x-riprap-reason"] == "upstream-failed"
    assert any("TLS with" in m and "refused riprap's client certificate" in m
               and "certificate required" in m for m in caplog.messages)


async def test_sni_is_sent_and_the_certificate_checked_against_it(
        ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="riprap.upstream")
    seen: list[str | None] = []
    ctx = server_ctx(ca, "payments.internal")
    ctx.sni_callback = lambda sock, name, _ctx: seen.append(name)  # type: ignore[assignment]
    cafile = write_ca(ca, tmp_path / "ca.pem")
    async with WireUpstream(tls=ctx) as up:
        good = engine(up.url, TlsSpec(ca=cafile, sni="payments.internal"))
        bad = engine(up.url, TlsSpec(ca=cafile))  # default: the endpoint's host, 127.0.0.1
        try:
            r_good, r_bad = await get(good), await get(bad)
        finally:
            await good.aclose()
            await bad.aclose()
    assert r_good.status_code == 200 and "payments.internal" in seen
    assert r_bad.status_code == 502 and r_bad.headers["x-riprap-reason"] == "upstream-failed"
    assert any("name mismatch" in m for m in caplog.messages)


async def test_an_expired_certificate_is_refused_saying_so(
        ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="riprap.upstream")
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2)
    ctx = server_ctx(ca, not_before=past - datetime.timedelta(days=30), not_after=past)
    async with WireUpstream(tls=ctx) as up:
        rt = engine(up.url, TlsSpec(ca=write_ca(ca, tmp_path / "ca.pem")))
        try:
            r = await get(rt)
        finally:
            await rt.aclose()
    assert r.status_code == 502
    assert any("expired certificate" in m for m in caplog.messages)


async def test_verify_off_calls_an_upstream_whose_certificate_nobody_trusts(
        ca: trustme.CA) -> None:
    async with WireUpstream(tls=server_ctx(ca, "somewhere.else")) as up:
        rt = engine(up.url, TlsSpec(verify=False))
        try:
            r = await get(rt)
        finally:
            await rt.aclose()
    assert r.status_code == 200


async def test_a_rotated_ca_is_picked_up_on_reload_and_calls_in_flight_finish(
        tmp_path: Path) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    ctx = server_ctx(old_ca)
    release = asyncio.Event()

    async def run(conn: WireConn) -> None:
        while (head := await conn.request()) is not None:
            if head.startswith(b"GET /slow "):
                await release.wait()
            await conn.answer(ok())

    cafile = write_ca(old_ca, tmp_path / "ca.pem")
    spec = TlsSpec(ca=cafile)
    async with WireUpstream(run, tls=ctx) as up:
        rt = engine(up.url, spec)
        try:
            assert (await get(rt)).status_code == 200
            slow = asyncio.create_task(get(rt, "/slow"))  # in flight on the old certificate
            while not any(h.startswith(b"GET /slow ") for h in up.heads):
                await asyncio.sleep(0.005)
            # rotation: the upstream gets a certificate of the new CA, the CA file follows
            new_ca.issue_cert("127.0.0.1").configure_cert(ctx)
            write_ca(new_ca, tmp_path / "ca.pem")
            await rt.update(rt.plan)  # what the sidecar does when a watched file changes
            assert (await get(rt, "/after")).status_code == 200  # a new handshake, new CA
            release.set()
            assert (await slow).status_code == 200  # the call in flight was not failed
        finally:
            await rt.aclose()
    assert len(up.conns) == 2  # the rotation needed a second connection


def test_contexts_are_cached_by_spec_and_file_bytes(ca: trustme.CA, tmp_path: Path) -> None:
    spec = TlsSpec(ca=write_ca(ca, tmp_path / "ca.pem"))
    assert tls_context(spec) is tls_context(spec)
    first = tls_context(spec)
    write_ca(trustme.CA(), tmp_path / "ca.pem")
    assert tls_context(spec) is not first


@pytest.mark.parametrize("which", ["ca", "cert"])
def test_a_missing_or_unparsable_file_is_an_error_naming_it(tmp_path: Path, which: str) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    missing = str(tmp_path / "missing.pem")
    if which == "ca":
        cases = [TlsSpec(ca=missing), TlsSpec(ca=str(bad))]
    else:
        cases = [TlsSpec(cert=missing, key=missing), TlsSpec(cert=str(bad), key=str(bad))]
    for spec in cases:
        name = spec.ca or spec.cert
        with pytest.raises(ValueError, match=f"tls: .*{name}"):
            engine("https://127.0.0.1:1", spec)


def test_tls_reason_words() -> None:
    err = ssl.SSLCertVerificationError(1, "certificate verify failed")
    err.verify_code, err.verify_message = 10, "certificate has expired"
    assert tls_reason(err) == "expired certificate: certificate has expired"


async def test_a_resolved_endpoint_is_called_with_its_name_as_sni(ca: trustme.CA,
                                                                   tmp_path: Path) -> None:
    """`tls_client(..., server_name=NAME)`: an endpoint listed by address (DNS `resolve`)
    sends and checks the name it was resolved from."""
    from policies.tls import TLS_EXTENSION, tls_client

    cafile = write_ca(ca, tmp_path / "ca.pem")
    async with WireUpstream(tls=server_ctx(ca, "api.internal")) as up:
        t = AiohttpTransport()
        try:
            for spec, name, want in ((TlsSpec(ca=cafile), "api.internal", 200),
                                     (TlsSpec(ca=cafile, sni="other.name"), "api.internal", 0)):
                ext = {TLS_EXTENSION: tls_client(spec, up.url, server_name=name)}
                try:
                    r = await t.handle_async_request(httpx.Request("GET", up.url, extensions=ext))
                    got = r.status_code
                    await r.aclose()
                except httpx.ConnectError:
                    got = 0
                assert got == want
        finally:
            await t.aclose()
    assert tls_client(None, "http://x") is None and tls_client(None, "https://x") is None


async def test_active_health_checks_use_the_services_tls(ca: trustme.CA, tmp_path: Path) -> None:
    from dsl.plan import HealthSpec

    async with WireUpstream(tls=server_ctx(ca)) as up:
        spec = ServicePlan(name="api", endpoints=(EndpointSpec(up.url),),
                           health=HealthSpec(path="/healthz", interval=0.05, fall=1, rise=1),
                           tls=TlsSpec(ca=write_ca(ca, tmp_path / "ca.pem")))
        rt = ResilientTransport(Plan(services={"api": spec}), AiohttpTransport())
        try:
            await rt.start()
            for _ in range(200):
                if sum(h.startswith(b"GET /healthz ") for h in up.heads) >= 2:
                    break
                await asyncio.sleep(0.01)
            endpoint = rt.snapshot()["services"]["api"]["endpoints"][0]
        finally:
            await rt.aclose()
    assert sum(h.startswith(b"GET /healthz ") for h in up.heads) >= 2
    assert endpoint["healthy"] is True
