"""Faithful request targets and riprap's own 400s (contract section 9, "Faithful forwarding";
issue 10 items 3, 6 and 13), with exact bytes on real sockets at both ends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from front_kit import RawUpstream, raw_exchange

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, sidecar_proc: Any) -> Iterator[dict[str, Any]]:
    up = RawUpstream()
    plain = RawUpstream()
    folder = tmp_path_factory.mktemp("faithful")
    policy = folder / "faithful.riprap"
    policy.write_text(
        "app faithful\n"
        f"service svc {{\n    endpoint {up.url}/tenant-a/api\n}}\n"
        f"service plain {{\n    endpoint {plain.url}\n}}\n")
    sc = sidecar_proc(policy, "--access-log").start()
    yield {"sc": sc, "up": up, "plain": plain}
    sc.stop()
    up.stop()
    plain.stop()


def _get(env: dict[str, Any], line: bytes, host: bytes = b"127.0.0.1") -> tuple[Any, bytes]:
    """Send one request line; return the answer and the request line the upstream got."""
    up: RawUpstream = env["up"]
    before = len(up.requests)
    answer = raw_exchange(env["sc"].port, line + b"\r\nHost: " + host + b"\r\n\r\n")
    assert answer.status == 200, answer.raw
    got = up.wait_requests(before + 1)[before]
    return answer, got.line


@pytest.mark.parametrize("sent, forwarded", [
    (b"/svc/p/./y", b"/tenant-a/api/p/./y"),
    (b"/svc/plain/p/../x", b"/tenant-a/api/plain/p/../x"),
    (b"/svc/a?", b"/tenant-a/api/a?"),
    (b"/svc/a%2Fb%20c/%7e?x=%41&y=a+b", b"/tenant-a/api/a%2Fb%20c/%7e?x=%41&y=a+b"),
    (b"/svc/caf\xc3\xa9/\xe2\x82\xac?q=\xc3\xa9", b"/tenant-a/api/caf\xc3\xa9/\xe2\x82\xac?q=\xc3\xa9"),
    (b"/svc/caf\xe9?latin=\xff", b"/tenant-a/api/caf\xe9?latin=\xff"),  # not UTF-8 either
    (b"/svc//double//slash", b"/tenant-a/api//double//slash"),
    (b"/svc", b"/tenant-a/api/"),
])
def test_the_target_reaches_the_upstream_byte_for_byte(env: dict[str, Any], sent: bytes,
                                                       forwarded: bytes) -> None:
    _, line = _get(env, b"GET " + sent + b" HTTP/1.1")
    assert line == b"GET " + forwarded + b" HTTP/1.1"


def test_host_routed_and_absolute_form_targets_are_exact(env: dict[str, Any]) -> None:
    _, line = _get(env, b"GET /x/./y?a=%20 HTTP/1.1", host=b"svc")
    assert line == b"GET /tenant-a/api/x/./y?a=%20 HTTP/1.1"
    # absolute form with an empty path means `/` (nginx accepts it; uvicorn answered 400)
    _, line = _get(env, b"GET http://svc HTTP/1.1", host=b"svc")
    assert line == b"GET /tenant-a/api/ HTTP/1.1"
    _, line = _get(env, b"GET http://svc:80?q=1 HTTP/1.1", host=b"svc")
    assert line == b"GET /tenant-a/api/?q=1 HTTP/1.1"
    _, line = _get(env, b"GET http://svc/caf\xc3\xa9/. HTTP/1.1", host=b"svc")
    assert line == b"GET /tenant-a/api/caf\xc3\xa9/. HTTP/1.1"


def test_options_asterisk_is_forwarded_as_asterisk(env: dict[str, Any]) -> None:
    plain: RawUpstream = env["plain"]
    before = len(plain.requests)
    answer = raw_exchange(env["sc"].port, b"OPTIONS * HTTP/1.1\r\nHost: plain\r\n\r\n")
    assert answer.status == 200, answer.raw
    assert plain.wait_requests(before + 1)[before].line == b"OPTIONS * HTTP/1.1"


@pytest.mark.parametrize("target", [
    b"/svc/../../admin/secret", b"/svc/..", b"/svc/a/../../b", b"/svc/%2e%2e/x",
    b"/svc/a/%2E%2e%2F..%2fadmin", b"/plain/../x", b"/svc/.%2e/x?ok=1",
])
def test_a_path_that_climbs_above_the_prefix_gets_400(env: dict[str, Any], target: bytes) -> None:
    up, plain = env["up"], env["plain"]
    seen = len(up.requests), len(plain.requests)
    answer = raw_exchange(env["sc"].port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.status == 400, answer.raw
    assert answer.header(b"x-riprap-reason") == b"bad-request"
    assert json.loads(answer.body)["reason"] == "bad-request"
    assert (len(up.requests), len(plain.requests)) == seen


@pytest.mark.parametrize("request_bytes, status, reason", [
    (b"GET /a b c HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"bad-request"),
    (b"GET /svc/x HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, b"bad-request"),
    (b"GET /svc/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, b"bad-request"),
    (b"GET /svc/x HTTP/1.1\r\n\r\n", 400, b"bad-request"),
    (b"GET svc HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"bad-request"),
    (b"GET /svc/ HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
     501, b"upgrade-unsupported"),
])
def test_every_answer_riprap_makes_carries_a_reason_and_is_logged(
        env: dict[str, Any], request_bytes: bytes, status: int, reason: bytes) -> None:
    sc = env["sc"]
    answer = raw_exchange(sc.port, request_bytes)
    assert answer.status == status, answer.raw
    assert answer.header(b"x-riprap-reason") == reason
    assert answer.header(b"x-riprap-attempts") == b"0"
    want = reason.decode()

    def logged() -> bool:
        lines = [json.loads(x) for x in Path(sc.out_path).read_text().splitlines() if x]
        return any(x["status"] == status and x["outcome"] == want for x in lines)

    sc.wait_for(logged, what=f"an access-log line for {status} {want}")


def test_a_client_sent_upgrade_marker_is_not_forwarded(env: dict[str, Any]) -> None:
    up: RawUpstream = env["up"]
    before = len(up.requests)
    answer = raw_exchange(env["sc"].port, b"GET /svc/m HTTP/1.1\r\nHost: x\r\n"
                                          b"X-Riprap-Upgrade: websocket\r\nX-Keep: 1\r\n\r\n")
    assert answer.status == 200
    got = up.wait_requests(before + 1)[before]
    names = [k.lower() for k, _ in got.headers]
    assert b"x-riprap-upgrade" not in names and b"x-keep" in names


def test_a_request_line_split_across_packets_keeps_its_bytes(env: dict[str, Any]) -> None:
    import time as _time

    from front_kit import connect, read_answer

    up: RawUpstream = env["up"]
    before = len(up.requests)
    parts = [b"GET /svc/a%41", b"/caf\xc3", b"\xa9/%2e/x?q=%", b"25 HTTP/1.1\r\nHo", b"st: x\r\n\r\n"]
    with connect(env["sc"].port) as sock:
        for part in parts:
            sock.sendall(part)
            _time.sleep(0.05)
        assert read_answer(sock).status == 200
    got = up.wait_requests(before + 1)[before]
    assert got.line == b"GET /tenant-a/api/a%41/caf\xc3\xa9/%2e/x?q=%25 HTTP/1.1"


def test_pipelined_requests_are_each_forwarded_exactly(env: dict[str, Any]) -> None:
    from front_kit import connect

    up: RawUpstream = env["up"]
    before = len(up.requests)
    with connect(env["sc"].port) as sock:
        sock.sendall(b"GET /svc/one/./a HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"POST /svc/two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                     b"GET /svc/three? HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = b""
        sock.settimeout(10)
        while buf.count(b"HTTP/1.1 200 OK") < 3 or not buf.endswith(b"ok"):
            data = sock.recv(65536)
            assert data, buf
            buf += data
    assert buf.count(b"HTTP/1.1 200 OK") == 3
    got = up.wait_requests(before + 3)[before:]
    assert [r.line for r in got] == [b"GET /tenant-a/api/one/./a HTTP/1.1",
                                     b"POST /tenant-a/api/two HTTP/1.1",
                                     b"GET /tenant-a/api/three? HTTP/1.1"]
    assert got[1].raw.endswith(b"\r\n\r\nabc")


def test_header_names_reach_the_upstream_with_their_case(env: dict[str, Any]) -> None:
    up: RawUpstream = env["up"]
    before = len(up.requests)
    answer = raw_exchange(env["sc"].port, b"GET /svc/case HTTP/1.1\r\nHost: x\r\n"
                                          b"X-Mixed-Case: 1\r\nx-lower: 2\r\nACCEPT: */*\r\n"
                                          b"CONNECTION: keep-alive, X-Drop\r\nX-DROP: 3\r\n\r\n")
    assert answer.status == 200
    names = [k for k, _ in up.wait_requests(before + 1)[before].headers]
    assert [n for n in names if n.lower() in (b"x-mixed-case", b"x-lower", b"accept")] == [
        b"X-Mixed-Case", b"x-lower", b"ACCEPT"]
    assert not any(n.lower() in (b"x-drop", b"connection") for n in names)
