"""The fault server itself: each fault does what tests and the demo rely on."""

from __future__ import annotations

import time

import httpx
import pytest

from riprap_testing.faults import FaultProcess, FaultServer


@pytest.fixture()
def server() -> FaultServer:
    s = FaultServer(name="f").start()
    yield s
    s.stop()


def client() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=5)


def test_ok_answers_json_with_request_line_and_headers(server: FaultServer) -> None:
    with client() as c:
        doc = c.get(server.url + "/a/b?x=1", headers={"x-t": "1"}).json()
    assert doc["server"] == "f" and doc["target"] == "/a/b?x=1"
    assert ["x-t", "1"] in doc["headers"]
    assert server.hits == 1 and server.hits_for("/a/b") == 1


def test_fail_next_error_status_and_retry_after(server: FaultServer) -> None:
    server.set(fail_next=2, error_status=502, retry_after="3")
    with client() as c:
        got = [c.get(server.url) for _ in range(3)]
    assert [r.status_code for r in got] == [502, 502, 200]
    assert got[0].headers["retry-after"] == "3"


def test_error_rate_one_always_fails(server: FaultServer) -> None:
    server.set(error_rate=1.0)
    with client() as c:
        assert {c.get(server.url).status_code for _ in range(5)} == {503}


def test_refuse_then_recover_on_the_same_port(server: FaultServer) -> None:
    server.set(mode="refuse")
    with client() as c:
        with pytest.raises(httpx.ConnectError):
            c.get(server.url)
    server.recover()
    with client() as c:
        assert c.get(server.url).status_code == 200


@pytest.mark.parametrize("mode", ["reset", "close"])
def test_reset_and_close_break_the_answer(server: FaultServer, mode: str) -> None:
    server.set(mode=mode)
    with client() as c:
        with pytest.raises(httpx.RemoteProtocolError):
            c.get(server.url)


def test_hang_counts_the_client_that_went_away(server: FaultServer) -> None:
    server.set(mode="hang")
    with httpx.Client(trust_env=False, timeout=0.2) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.get(server.url)
    deadline = time.monotonic() + 2
    while server.disconnects < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.disconnects == 1


def test_slow_delays_the_answer(server: FaultServer) -> None:
    server.set(delay=0.2)
    with client() as c:
        t = time.monotonic()
        assert c.get(server.url).status_code == 200
    assert time.monotonic() - t >= 0.2


def test_sse_events_arrive_one_by_one(server: FaultServer) -> None:
    arrivals = []
    with client() as c, c.stream("GET", server.url + "/sse?n=3&interval=0.15") as r:
        assert r.headers["content-type"] == "text/event-stream"
        t = time.monotonic()
        for _chunk in r.iter_raw():
            arrivals.append(time.monotonic() - t)
    assert len(arrivals) == 3
    assert arrivals[2] - arrivals[0] >= 0.25


def test_echo_returns_the_body(server: FaultServer) -> None:
    with client() as c:
        assert c.post(server.url + "/echo", content=b"x" * 100_000).content == b"x" * 100_000


def test_bad_mode_is_refused(server: FaultServer) -> None:
    with pytest.raises(ValueError):
        server.set(mode="explode")


def test_subprocess_is_driven_over_its_control_port() -> None:
    with FaultProcess("p") as p, client() as c:
        assert c.get(p.url).json()["server"] == "p"
        p.set(mode="refuse")
        with pytest.raises(httpx.ConnectError), client() as fresh:  # pooled ones are reset
            fresh.get(p.url)
        assert p.recover()["listening"] is True
        assert c.get(p.url).status_code == 200
        assert p.stats()["hits"] == 2
