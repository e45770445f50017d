"""WebSocket forwarding (contract section 9, "Upgrades"; issue 10 item 4): a real
`websockets` echo upstream, a real `websockets` client, the sidecar in between."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Iterator

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from front_kit import RawUpstream, WsEcho, raw_exchange
from riprap_testing.faults import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, sidecar_proc: Any) -> Iterator[dict[str, Any]]:
    echo = WsEcho()
    plain = RawUpstream()
    dead = f"http://127.0.0.1:{free_port()}"
    folder = tmp_path_factory.mktemp("ws")
    policy = folder / "ws.riprap"
    policy.write_text(
        "app ws\n"
        f"service ws {{\n    endpoint {echo.url}\n    timeout 300ms\n}}\n"
        f"service capped {{\n    endpoint {echo.url}\n    concurrency 1\n}}\n"
        f"service flaky {{\n    endpoint {dead}\n    endpoint {echo.url}\n"
        "    retry 2 on connect-failure backoff 1ms\n}\n"
        f"service plain {{\n    endpoint {plain.url}\n}}\n")
    sc = sidecar_proc(policy, "--access-log").start()
    yield {"sc": sc, "echo": echo, "plain": plain}
    sc.stop()
    echo.stop()
    plain.stop()


def _url(env: dict[str, Any], path: str) -> str:
    return f"ws://127.0.0.1:{env['sc'].port}{path}"


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_text_binary_ping_and_a_10_mib_message_pass_both_ways(env: dict[str, Any]) -> None:
    async def go() -> None:
        async with ws_connect(_url(env, "/ws/echo?room=1"), max_size=None,
                              compression=None) as ws:
            assert ws.response.headers["x-riprap-attempts"] == "1"
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send(b"\x00\x01\xff")
            assert await ws.recv() == b"\x00\x01\xff"
            pong = await ws.ping(b"p")
            await asyncio.wait_for(pong, 5)
            big = bytes(range(256)) * (10 * 1024 * 1024 // 256)
            await ws.send(big)
            assert await ws.recv() == big
            await asyncio.sleep(0.5)  # longer than the service's 300 ms timeout
            await ws.send("still here")
            assert await ws.recv() == "still here"

    _run(go())
    shake = env["echo"].handshakes[-1]
    assert shake["path"] == "/echo?room=1"
    assert "sec-websocket-key" in shake and shake["upgrade"].lower() == "websocket"


def test_close_codes_propagate_both_ways(env: dict[str, Any]) -> None:
    echo: WsEcho = env["echo"]

    async def upstream_closes() -> None:
        async with ws_connect(_url(env, "/ws/c")) as ws:
            await ws.send("close:4001")
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            # a clean close handshake, with the upstream's code and reason
            assert info.value.rcvd is not None and info.value.rcvd.code == 4001
            assert info.value.rcvd.reason == "as asked"
            assert info.value.sent is not None and info.value.rcvd_then_sent

    async def client_closes() -> None:
        ws = await ws_connect(_url(env, "/ws/c"))
        await ws.send("x")
        assert await ws.recv() == "x"
        before = len(echo.close_codes)
        await ws.close(4002, "bye")
        deadline = time.monotonic() + 5
        while len(echo.close_codes) == before and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert echo.close_codes[-1] == 4002

    _run(upstream_closes())
    _run(client_closes())


def test_the_upstream_going_away_is_an_abnormal_close_for_the_client(env: dict[str, Any]) -> None:
    async def go() -> None:
        async with ws_connect(_url(env, "/ws/d")) as ws:
            await ws.send("drop")
            with pytest.raises(ConnectionClosedError) as info:
                await ws.recv()
            assert info.value.rcvd is None  # no close frame: not passed off as clean

    _run(go())


def test_a_tunnel_holds_its_concurrency_slot_until_it_closes(env: dict[str, Any]) -> None:
    async def go() -> None:
        first = await ws_connect(_url(env, "/capped/a"))
        await first.send("1")
        assert await first.recv() == "1"
        with pytest.raises(InvalidStatus) as info:
            await ws_connect(_url(env, "/capped/b"))
        assert info.value.response.status_code == 503
        assert info.value.response.headers["x-riprap-reason"] == "overloaded"
        await first.close()
        deadline = time.monotonic() + 5
        while True:
            try:
                again = await ws_connect(_url(env, "/capped/c"))
                break
            except InvalidStatus:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        await again.send("3")
        assert await again.recv() == "3"
        await again.close()

    _run(go())


def test_a_refused_endpoint_is_retried_for_the_handshake(env: dict[str, Any]) -> None:
    async def go() -> None:
        for _ in range(4):  # whichever endpoint is picked first
            async with ws_connect(_url(env, "/flaky/r")) as ws:
                assert ws.response.headers["x-riprap-attempts"] in ("1", "2")
                await ws.send("r")
                assert await ws.recv() == "r"

    _run(go())


def test_an_upstream_that_does_not_upgrade_answers_as_is(env: dict[str, Any]) -> None:
    async def go() -> None:
        with pytest.raises(InvalidStatus) as info:
            await ws_connect(_url(env, "/plain/no"))
        assert info.value.response.status_code == 200

    _run(go())


def test_connect_and_unknown_upgrades_are_refused_with_a_reason(env: dict[str, Any]) -> None:
    port = env["sc"].port
    answer = raw_exchange(port, b"CONNECT ws:443 HTTP/1.1\r\nHost: ws:443\r\n\r\n")
    assert answer.status == 405 and answer.header(b"x-riprap-reason") == b"connect-unsupported"
    answer = raw_exchange(port, b"GET /ws/x HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
                                b"Upgrade: h2c\r\n\r\n")
    assert answer.status == 501 and answer.header(b"x-riprap-reason") == b"upgrade-unsupported"
    answer = raw_exchange(port, b"POST /ws/x HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
                                b"Upgrade: websocket\r\nContent-Length: 0\r\n\r\n")
    assert answer.status == 501 and answer.header(b"x-riprap-reason") == b"upgrade-unsupported"


def test_frames_sent_before_the_101_reach_the_upstream_first(env: dict[str, Any]) -> None:
    import base64
    import os

    from front_kit import connect

    key = base64.b64encode(os.urandom(16))
    mask = b"\x01\x02\x03\x04"
    payload = b"early bird"
    frame = bytes([0x81, 0x80 | len(payload)]) + mask + bytes(
        b ^ mask[i % 4] for i, b in enumerate(payload))
    with connect(env["sc"].port) as sock:
        sock.sendall(b"GET /ws/early HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: " + key + b"\r\n\r\n" + frame)
        buf = b""
        sock.settimeout(10)
        while payload not in buf:
            data = sock.recv(65536)
            assert data, buf
            buf += data
    assert buf.startswith(b"HTTP/1.1 101 ")
    head, _, rest = buf.partition(b"\r\n\r\n")
    assert b"\r\nupgrade: websocket" in head.lower() and b"sec-websocket-accept" in head.lower()
    assert rest == bytes([0x81, len(payload)]) + payload  # the echo, unmasked, exact


def test_an_https_endpoint_is_called_with_the_services_tls(tmp_path: Any, sidecar_proc: Any) -> None:
    import json
    import ssl

    import trustme

    from dsl.plan import EndpointSpec, Plan, ServicePlan, TlsSpec

    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    echo = WsEcho(ssl_context=ctx)
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    plan = Plan(app="wss", watch=(str(cafile),), services={"secure": ServicePlan(
        name="secure", endpoints=(EndpointSpec(echo.url),), tls=TlsSpec(ca=str(cafile)))})
    policy = tmp_path / "plan.json"
    policy.write_text(json.dumps(plan.to_dict()))
    sc = sidecar_proc(policy).start()

    async def go() -> None:
        async with ws_connect(f"ws://127.0.0.1:{sc.port}/secure/tls") as ws:
            await ws.send("over tls")
            assert await ws.recv() == "over tls"

    try:
        _run(go())
    finally:
        sc.stop()
        echo.stop()
    assert echo.handshakes[-1]["path"] == "/tls"
