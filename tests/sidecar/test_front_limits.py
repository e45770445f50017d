"""Request-head limits and slow or idle clients (contract section 9, "Limits"; issue 10
item 9): abusive clients, bounded in count and time, on real sockets."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any, Iterator

import httpx
import pytest

from front_kit import RawUpstream, connect, is_closed, raw_exchange, read_answer

pytestmark = pytest.mark.slow

HEAD_TIMEOUT = 1.5  # RIPRAP_HEAD_TIMEOUT for this module (the default is 10 s)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, sidecar_proc: Any) -> Iterator[dict[str, Any]]:
    up = RawUpstream()
    folder = tmp_path_factory.mktemp("limits")
    policy = folder / "limits.riprap"
    policy.write_text(f"app limits\nservice svc {{\n    endpoint {up.url}\n}}\n")
    os.environ["RIPRAP_HEAD_TIMEOUT"] = str(HEAD_TIMEOUT)
    try:
        # started under a low soft open-file limit (as with `ulimit -n 1024`)
        command = ["sh", "-c", 'ulimit -Sn 1024 && exec "$0" -m sidecar.cli run "$@"',
                   sys.executable]
        sc = sidecar_proc(policy, "--access-log", command=command).start()
    finally:
        del os.environ["RIPRAP_HEAD_TIMEOUT"]
    yield {"sc": sc, "up": up}
    sc.stop()
    up.stop()


def _served(env: dict[str, Any], timeout: float = 2.0) -> float:
    """One ordinary call and one /healthz; the slower of the two, in seconds."""
    sc = env["sc"]
    t0 = time.monotonic()
    answer = raw_exchange(sc.port, b"GET /svc/ok HTTP/1.1\r\nHost: x\r\n\r\n", timeout=timeout)
    assert answer.status == 200
    t1 = time.monotonic()
    assert httpx.get(f"{sc.admin_url}/healthz", timeout=timeout).status_code == 200
    return max(t1 - t0, time.monotonic() - t1)


def test_a_head_of_up_to_64_kib_and_256_headers_is_forwarded(env: dict[str, Any]) -> None:
    up: RawUpstream = env["up"]
    before = len(up.requests)
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 200) for i in range(254))
    request = b"GET /svc/big HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    assert len(request) < 64 * 1024
    answer = raw_exchange(env["sc"].port, request)
    assert answer.status == 200, answer.raw
    got = up.wait_requests(before + 1)[before]
    assert sum(1 for k, _ in got.headers if k.startswith(b"X-H")) == 254  # names as sent


@pytest.mark.parametrize("what, request_bytes", [
    ("257 headers", b"GET /svc/x HTTP/1.1\r\nHost: x\r\n"
                    + b"".join(b"X-H%d: 1\r\n" % i for i in range(256)) + b"\r\n"),
    ("a 65 KiB header", b"GET /svc/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65 * 1024
                        + b"\r\n\r\n"),
    ("a 65 KiB target", b"GET /svc/" + b"a" * 65 * 1024 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("10,000 headers", b"GET /svc/x HTTP/1.1\r\nHost: x\r\n"
                       + b"X-Many: 1\r\n" * 10_000 + b"\r\n"),
])
def test_an_oversized_head_gets_431_with_a_reason(env: dict[str, Any], what: str,
                                                  request_bytes: bytes) -> None:
    up: RawUpstream = env["up"]
    before = len(up.requests)
    with connect(env["sc"].port) as sock:
        try:
            sock.sendall(request_bytes)
        except OSError:
            pass  # the sidecar may close before it has read everything
        answer = read_answer(sock)
    assert answer.status == 431, (what, answer.raw[:300])
    assert answer.header(b"x-riprap-reason") == b"headers-too-large"
    assert answer.closed or answer.header(b"connection") == b"close"
    assert len(up.requests) == before  # nothing was forwarded


def test_an_endless_header_is_cut_off_and_starves_no_one(env: dict[str, Any]) -> None:
    """A client streams one header for as long as it may (32 MiB here, bounded); it gets
    431 after 64 KiB, while ordinary calls and /healthz stay fast."""
    result: dict[str, Any] = {}

    def stream() -> None:
        with connect(env["sc"].port) as sock:
            sock.sendall(b"GET /svc/x HTTP/1.1\r\nHost: x\r\nX-Endless: ")
            sent = 0
            try:
                while sent < 32 * 1024 * 1024:
                    sock.sendall(b"z" * 16384)
                    sent += 16384
            except OSError:
                pass
            result["sent"] = sent
            try:
                result["answer"] = read_answer(sock, timeout=5)
            except (AssertionError, OSError) as exc:
                result["answer"] = exc

    t = threading.Thread(target=stream)
    t.start()
    slowest = max(_served(env) for _ in range(5))
    t.join(20)
    assert not t.is_alive()
    assert slowest < 1.0, slowest
    answer = result["answer"]
    # the 431 was written once 64 KiB arrived; later writes may reset the connection first
    if not isinstance(answer, Exception):
        assert answer.status == 431
    assert result["sent"] < 32 * 1024 * 1024  # the sidecar stopped reading and closed


def test_a_64_mib_header_does_not_block_others(env: dict[str, Any]) -> None:
    big = b"GET /svc/x HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"h" * (64 * 1024 * 1024)
    done = threading.Event()

    def send() -> None:
        with connect(env["sc"].port) as sock:
            try:
                sock.sendall(big)
            except OSError:
                pass
        done.set()

    t = threading.Thread(target=send)
    t.start()
    slowest = max(_served(env) for _ in range(5))
    assert done.wait(20)
    t.join()
    assert slowest < 1.0, slowest


def test_slowloris_connections_are_closed_after_the_head_timeout(env: dict[str, Any]) -> None:
    """500 connections that each send half a head: others are served meanwhile, and all
    500 are closed once the head timeout passes."""
    socks: list[socket.socket] = []
    try:
        for _ in range(500):
            s = connect(env["sc"].port)
            s.sendall(b"GET /svc/slow HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(s)
        opened = time.monotonic()
        assert _served(env) < 1.0
        deadline = opened + HEAD_TIMEOUT + 5.0
        open_ones = list(socks)
        while open_ones and time.monotonic() < deadline:
            open_ones = [s for s in open_ones if not is_closed(s, 0.01)]
        assert not open_ones, f"{len(open_ones)} slow connections still open"
        assert time.monotonic() - opened >= HEAD_TIMEOUT - 0.3  # not closed before the timeout
        assert _served(env) < 1.0
    finally:
        for s in socks:
            s.close()


def test_a_slow_but_steady_head_within_the_timeout_is_served(env: dict[str, Any]) -> None:
    request = b"GET /svc/steady HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(env["sc"].port) as sock:
        for i in range(0, len(request), 8):
            sock.sendall(request[i:i + 8])
            time.sleep(HEAD_TIMEOUT / 10)
        assert read_answer(sock).status == 200


def test_an_idle_keep_alive_connection_is_closed_after_5_seconds(env: dict[str, Any]) -> None:
    with connect(env["sc"].port) as sock:
        sock.sendall(b"GET /svc/ka HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(sock).status == 200
        t0 = time.monotonic()
        assert not is_closed(sock, 4.0)  # still open well inside the 5 s
        assert is_closed(sock, 3.0)
        assert 4.5 <= time.monotonic() - t0 <= 7.0


def test_the_open_file_limit_is_raised_to_the_hard_limit(env: dict[str, Any]) -> None:
    sc = env["sc"]
    with open(f"/proc/{sc.proc.pid}/limits") as f:
        limits = f.read()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard, line


def test_the_fast_paths_are_logged_once_and_shown_at_state(env: dict[str, Any]) -> None:
    sc = env["sc"]
    state = httpx.get(f"{sc.admin_url}/state", timeout=5).json()
    assert state["fast_paths"]["uvicorn.protocol"] is True
    assert all(isinstance(v, bool) for v in state["fast_paths"].values())
    assert sc.logs().count("client-side fast paths: uvicorn.protocol on") == 1
