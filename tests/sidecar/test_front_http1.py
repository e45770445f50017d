"""HTTP/1.0 clients and a client that goes away (issue 10 item 13), on raw sockets."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from front_kit import RawUpstream, connect, is_closed, read_answer

pytestmark = pytest.mark.slow

CHUNKED = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/plain\r\n\r\n"
           b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
SIZED = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nsized"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, sidecar_proc: Any) -> Iterator[dict[str, Any]]:
    chunked, sized, hang = RawUpstream(CHUNKED), RawUpstream(SIZED), RawUpstream(hang=True)
    folder = tmp_path_factory.mktemp("http1")
    policy = folder / "http1.riprap"
    policy.write_text(
        "app http1\n"
        f"service chunked {{\n    endpoint {chunked.url}\n}}\n"
        f"service sized {{\n    endpoint {sized.url}\n}}\n"
        f"service hang {{\n    endpoint {hang.url}\n    timeout 30s\n}}\n")
    sc = sidecar_proc(policy, "--access-log").start()
    yield {"sc": sc, "chunked": chunked, "sized": sized, "hang": hang}
    sc.stop()
    for up in (chunked, sized, hang):
        up.stop()


def test_an_http10_client_gets_a_close_delimited_body_not_chunked(env: dict[str, Any]) -> None:
    with connect(env["sc"].port) as sock:
        sock.sendall(b"GET /chunked/x HTTP/1.0\r\n\r\n")
        answer = read_answer(sock)
    assert answer.status == 200
    assert answer.header(b"transfer-encoding") is None
    assert answer.header(b"content-length") is None
    assert answer.body == b"hello world"  # the body ends with the connection
    assert answer.closed


def test_an_http10_keep_alive_is_honoured(env: dict[str, Any]) -> None:
    with connect(env["sc"].port) as sock:
        for i in range(3):
            sock.sendall(b"GET /sized/%d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % i)
            answer = read_answer(sock)
            assert answer.status == 200 and answer.body == b"sized"
            assert answer.header(b"connection") == b"keep-alive"
        assert not is_closed(sock, 0.3)


def test_an_http10_keep_alive_with_an_unknown_length_still_closes(env: dict[str, Any]) -> None:
    with connect(env["sc"].port) as sock:
        sock.sendall(b"GET /chunked/x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        answer = read_answer(sock)
    assert answer.body == b"hello world" and answer.closed
    assert answer.header(b"transfer-encoding") is None
    assert answer.header(b"connection") == b"close"


def test_an_http10_request_without_keep_alive_is_closed_after_a_sized_answer(
        env: dict[str, Any]) -> None:
    with connect(env["sc"].port) as sock:
        sock.sendall(b"GET /sized/x HTTP/1.0\r\n\r\n")
        answer = read_answer(sock)
        assert answer.body == b"sized"
        assert is_closed(sock, 2.0)


def test_http11_chunked_answers_stay_chunked(env: dict[str, Any]) -> None:
    with connect(env["sc"].port) as sock:
        sock.sendall(b"GET /chunked/x HTTP/1.1\r\nHost: h\r\n\r\n")
        answer = read_answer(sock)
    assert answer.header(b"transfer-encoding") == b"chunked"


def test_a_client_that_goes_away_is_logged_with_the_real_attempts(env: dict[str, Any]) -> None:
    sc, hang = env["sc"], env["hang"]
    before = len(hang.requests)
    with connect(sc.port) as sock:
        sock.sendall(b"GET /hang/away HTTP/1.1\r\nHost: h\r\n\r\n")
        hang.wait_requests(before + 1)  # the upstream has it
        time.sleep(0.1)
    lines: list[dict[str, Any]] = []

    def logged() -> bool:
        lines[:] = [json.loads(x) for x in Path(sc.out_path).read_text().splitlines() if x]
        return any(x["path"] == "/away" for x in lines)

    sc.wait_for(logged, what="the access-log line of the cancelled call")
    line = next(x for x in lines if x["path"] == "/away")
    assert line["status"] == 499 and line["attempts"] == 1, line
