"""Acceptance: routing, headers and bodies.

A real `riprap run` on loopback with this file's own small policy, next to its tests
(written from /work/shared/language.md; each test cites its contract section). The
sidecar comes from the `run_sidecar` fixture (conftest.py), the upstreams from `ups`."""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import httpx
import pytest

from acc_kit import (
    RunSidecar,
    attempts,
    reason,
    sidecar_env,
    uid,
    wait_for,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
]

# the services of this file's policy (the admin listener names each one)
SERVICES = ['echo', 'pair', 'resetter', 'capdisc', 'usesvc', 'useover', 'ws', 'bigheads']


class WsUpstream:
    """A minimal WebSocket upstream: answers the handshake 101 (RFC 6455 accept key), then
    echoes every byte back until the client closes; records each handshake's head."""

    def __init__(self) -> None:
        import socket
        import threading

        self.heads: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Any) -> None:
        import base64
        import hashlib

        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            head, rest = head.split(b"\r\n\r\n", 1)
            self.heads.append(head)
            key = next((line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                        if line.lower().startswith(b"sec-websocket-key:")), b"")
            accept = base64.b64encode(hashlib.sha1(
                key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            if rest:
                conn.sendall(rest)
            while chunk := conn.recv(65536):
                conn.sendall(chunk)

    def close(self) -> None:
        self.sock.close()


WS = WsUpstream()


def policy(A: str, B: str, C: str, DEAD: str, listen: int, admin: int) -> str:
    return f"""\
app acc
listen 127.0.0.1:{listen}
admin 127.0.0.1:{admin}

service echo {{
    host echo.internal, alias.example
    endpoint {A}
}}

service pair {{
    retry 1 on 503 backoff 1ms
    balance round-robin
    endpoint {A}
    endpoint {B}
}}

service resetter {{
    endpoint {A}
}}

service capdisc {{
    concurrency 1
    endpoint {A}
}}

service usesvc {{
    use quick
    endpoint {A}
}}

service useover {{
    use quick
    timeout 2s
    endpoint {A}
}}

policy quick {{
    timeout 250ms
    retry 1 on 503 backoff 1ms
}}

service ws {{
    timeout 1s
    endpoint {WS.url}
}}

service bigheads {{
    retry 2 on reset, 502 backoff 1ms
    endpoint {A}
}}

"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, ups: dict[str, Any],
        run_sidecar: RunSidecar) -> Iterator[dict[str, Any]]:
    yield from sidecar_env(policy, tmp_path_factory, ups, run_sidecar)


def test_route_by_host_name_port_ignored(env: dict[str, Any]) -> None:
    sc, A = env["sc"], env["A"]
    for host in ("echo", "echo:8080", "ECHO", "echo.internal", "alias.example:1"):
        i = uid()
        r = sc.get(f"/host/{i}?q=1", host=host)
        assert r.status_code == 200, (host, r.text)
        assert r.json()["path"] == f"/host/{i}?q=1"  # no prefix removed with Host routing
        assert len(A.hits(i)) == 1
        assert attempts(r) == 1  # section 9: every proxied answer carries x-riprap-attempts


def test_absolute_form_request_through_http_proxy(env: dict[str, Any]) -> None:
    # contract §9 Routing: "absolute-form requests ... are routed the same way"
    proxy, A = env["proxy"], env["A"]
    for host in ("echo", "echo.internal:9999", "alias.example"):
        i = uid()
        r = proxy.get(f"http://{host}/abs/{i}?x=2")
        assert r.status_code == 200, r.text
        assert r.json()["path"] == f"/abs/{i}?x=2"
        assert len(A.hits(i)) == 1
        assert attempts(r) == 1


def test_path_prefix_routes_and_is_removed(env: dict[str, Any]) -> None:
    # contract §9 Routing: "a path /NAME/rest goes to service NAME with the prefix removed"
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/echo/a/{i}/b?k=v")  # Host is 127.0.0.1:PORT, not a service
    assert r.status_code == 200, r.text
    assert r.json()["path"] == f"/a/{i}/b?k=v"
    assert r.headers["x-upstream"] == "A"
    assert [h["path"] for h in A.hits(i)] == [f"/a/{i}/b?k=v"]


def _names_all_services(r: httpx.Response) -> None:
    doc = r.json()
    text = json.dumps(doc)
    for name in SERVICES:
        assert f'"{name}"' in text, f"{name} not named in {text}"


def test_unknown_host_forward_proxy_form_is_403(env: dict[str, Any]) -> None:
    # contract §9: "never forwards to a host that the plan does not name: 403 (forward proxy form)"
    proxy, A, B = env["proxy"], env["A"], env["B"]
    i = uid()
    r = proxy.get(f"http://evil.example/{i}")
    assert r.status_code == 403
    assert reason(r) == "unknown-service"
    _names_all_services(r)
    # never forwarded anywhere: also not to an upstream the plan names by address
    r = proxy.get(f"http://127.0.0.1:{A.port}/{i}")
    assert r.status_code == 403 and reason(r) == "unknown-service"
    # nor by a path that names a service: the target's host decides
    r = proxy.get(f"http://evil.example/echo/{i}", headers={"Host": "echo"})
    assert r.status_code == 403 and reason(r) == "unknown-service"
    _names_all_services(r)
    assert A.hits(i) == [] and B.hits(i) == []


def test_origin_form_is_never_taken_for_a_forward_proxy_call(env: dict[str, Any]) -> None:
    # contract §9: 403 only for the forward-proxy form; "/NAME/rest" still routes, whatever
    # headers the client adds, and HTTP/1.0 absolute-form is a forward-proxy call too
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/echo/{i}", headers={"x-riprap-forward-proxy": "1", "Host": "nope.example"})
    assert r.status_code == 200 and r.json()["path"] == f"/{i}"
    assert len(A.hits(i)) == 1
    out = _raw(sc.port, f"GET http://evil.example/echo/{i} HTTP/1.0\r\n\r\n".encode())
    assert out.split(b"\r\n", 1)[0].split(b" ")[1] == b"403", out[:200]
    out = _raw(sc.port, f"GET http://echo/h10abs/{i} HTTP/1.0\r\n\r\n".encode())
    assert out.split(b"\r\n", 1)[0].split(b" ")[1] == b"200", out[:200]
    assert [h["path"] for h in A.hits(f"h10abs/{i}")] == [f"/h10abs/{i}"]


def test_unknown_host_and_unknown_prefix_is_404(env: dict[str, Any]) -> None:
    # contract §9: "404 (anything else), x-riprap-reason: unknown-service, JSON body naming the known services"
    sc, A, B = env["sc"], env["A"], env["B"]
    i = uid()
    r = sc.get(f"/{i}", host="nope.example")
    assert r.status_code == 404 and reason(r) == "unknown-service"
    _names_all_services(r)
    r = sc.get(f"/nosuch/{i}")
    assert r.status_code == 404 and reason(r) == "unknown-service"
    assert "application/json" in r.headers.get("content-type", "")
    _names_all_services(r)
    assert A.hits(i) == [] and B.hits(i) == []


def test_hop_by_hop_headers_dropped_both_ways(env: dict[str, Any]) -> None:
    sc = env["sc"]
    i = uid()
    r = sc.get(f"/echo/hop/{i}", headers={
        "Connection": "keep-alive, X-Req-Hop", "X-Req-Hop": "1", "Keep-Alive": "timeout=5",
        "TE": "trailers", "Proxy-Authorization": "Basic eDp5", "X-Req-Kept": "yes"})
    assert r.status_code == 200
    seen = r.json()["headers"]
    assert seen.get("x-req-kept") == "yes"
    for h in ("x-req-hop", "keep-alive", "te", "proxy-authorization"):
        assert h not in seen, f"hop-by-hop {h} forwarded upstream: {seen}"
    assert seen.get("connection", "").lower() in ("", "keep-alive", "close")
    assert r.headers.get("x-resp-kept") == "yes"
    for h in ("x-resp-hop", "keep-alive", "proxy-authenticate"):
        assert h not in r.headers, f"hop-by-hop {h} passed to the app: {dict(r.headers)}"


def test_bodies_stream_both_ways(env: dict[str, Any]) -> None:
    # contract §9: "Bodies stream in both directions"
    sc = env["sc"]
    n = 3_000_001
    r = sc.get(f"/echo/big/{n}/{uid()}")
    assert r.status_code == 200 and len(r.content) == n
    assert r.content[:32] == b"0123456789abcdef" * 2

    def gen() -> Iterator[bytes]:
        for _ in range(30):
            yield b"x" * 100_000

    r = sc.get(f"/echo/size/{uid()}", method="POST", content=gen())
    assert r.status_code == 200 and r.json()["size"] == 3_000_000
    # a slow chunked answer reaches the app before it is complete
    t = time.monotonic()
    with sc.client.stream("GET", f"/echo/drip/4/0.25/{uid()}") as resp:
        it = resp.iter_raw()
        first = next(it)
        t_first = time.monotonic() - t
        rest = b"".join(it)
    assert (first + rest) == b"chunk0;chunk1;chunk2;chunk3;"
    assert t_first < 0.6 and time.monotonic() - t >= 0.9


def test_client_disconnect_cancels_upstream_call(env: dict[str, Any]) -> None:
    """Section 9: a client that disconnects cancels its upstream call (frees its slot)."""
    sc, A = env["sc"], env["A"]
    i = uid()
    with httpx.Client(base_url=sc.url, trust_env=False, timeout=0.3) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.get(f"/capdisc/sleep/3/{i}")
    assert A.hits(i)
    r = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(
        sc.get(f"/capdisc/x/{uid()}")), 1.0, step=0.1)
    assert r is not None, "the cancelled call still holds the concurrency slot"


def test_path_details_preserved(env: dict[str, Any]) -> None:
    # contract §9 Routing: "/NAME/rest ... with the prefix removed" (/NAME alone, encoding kept)
    sc = env["sc"]
    assert sc.get("/echo").json()["path"] == "/"
    assert sc.get("/echo?a=1").json()["path"] in ("/?a=1",)
    assert sc.get("/echo/a%2Fb/c%20d").json()["path"] == "/a%2Fb/c%20d"


def test_head_and_empty_answers(env: dict[str, Any]) -> None:
    # contract §9: "Every proxied answer carries x-riprap-attempts"
    sc = env["sc"]
    r = sc.get(f"/echo/x/{uid()}", method="HEAD")
    assert r.status_code == 200 and r.content == b"" and attempts(r) == 1
    r = sc.get(f"/echo/s/204/{uid()}")
    assert r.status_code == 204 and attempts(r) == 1


def test_connect_to_unknown_host_refused(env: dict[str, Any]) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", env["sc"].port), timeout=3) as s:
        s.sendall(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
        data = s.recv(4096)
    assert data.startswith(b"HTTP/1.1 403"), data[:100]
    assert b"unknown-service" in data.lower()


def _slow_upload(env: dict[str, Any], first: int) -> None:
    sc, A = env["sc"], env["A"]
    i = uid()
    sent: dict[str, float] = {}

    def gen() -> Iterator[bytes]:
        yield b"a" * first
        time.sleep(0.6)
        sent["last"] = time.monotonic()
        yield b"b" * 1000

    r = sc.get(f"/echo/size/{i}", method="POST", content=gen())
    assert r.status_code == 200 and r.json()["size"] == first + 1000
    assert A.hits(i)[0]["t0"] < sent["last"] - 0.3, "upstream call began only after the body"


def test_request_body_streams_upstream_without_retries(env: dict[str, Any]) -> None:
    """Section 9: bodies stream; buffering is for retries (echo has none)."""
    _slow_upload(env, 1000)


def test_request_body_above_bound_streams_upstream(env: dict[str, Any]) -> None:
    # contract §9: "Bodies stream"; above the bound "the call is not retried"
    _slow_upload(env, 1_200_000)


def test_host_routing_wins_over_path_prefix(env: dict[str, Any]) -> None:
    # contract §9 Routing: Host first, "Otherwise, a path /NAME/rest"
    r = env["sc"].get("/pair/x", host="echo")
    assert r.status_code == 200 and r.json()["path"] == "/pair/x"


def _raw(port: int, data: bytes) -> bytes:
    """Send raw bytes (the request asks the server to close) and read to the end."""
    import socket

    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_broken_upstream_answer_is_502(env: dict[str, Any]) -> None:
    # contract §9: "upstream-failed (502, no answer could be had: refused, reset, broken)"
    r = env["sc"].get(f"/resetter/garbage/{uid()}")
    assert r.status_code == 502 and reason(r) == "upstream-failed"


def test_http10_request_without_host_uses_path_prefix(env: dict[str, Any]) -> None:
    # contract §9 Routing: "Otherwise, a path /NAME/rest goes to service NAME"
    i = uid()
    out = _raw(env["sc"].port, f"GET /echo/h10/{i} HTTP/1.0\r\n\r\n".encode())
    assert out.split(b"\r\n", 1)[0].split(b" ")[1] == b"200", out[:200]
    assert env["A"].hits(i)[0]["path"] == f"/h10/{i}"


def test_absolute_form_wins_over_host_header(env: dict[str, Any]) -> None:
    """Section 9: never forwards to a host the plan does not name, whatever Host says."""
    i = uid()
    out = _raw(env["sc"].port, f"GET http://evil.example/{i} HTTP/1.1\r\nHost: echo\r\n"
                               "Connection: close\r\n\r\n".encode())
    assert out.split(b"\r\n", 1)[0].split(b" ")[1] == b"403", out[:200]
    assert b"unknown-service" in out
    assert env["A"].hits(i) == [] and env["B"].hits(i) == []


def test_encoded_answer_passed_untouched(env: dict[str, Any]) -> None:
    # contract §9: bodies stream, passed "as the upstream sent it"
    import gzip

    r = env["sc"].get(f"/echo/gzip/{uid()}")
    assert r.status_code == 200 and r.headers.get("content-encoding") == "gzip"
    assert r.content == b"hello gzip " * 50  # httpx decodes: it must be valid gzip
    with env["sc"].client.stream("GET", f"/echo/gzip/{uid()}") as resp:
        raw = b"".join(resp.iter_raw())
    assert gzip.decompress(raw) == b"hello gzip " * 50


def test_redirect_not_followed(env: dict[str, Any]) -> None:
    # contract §9: a proxy passes the upstream's answer (Envoy/nginx never follow redirects)
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/echo/redirect/{i}")
    assert r.status_code == 302 and r.headers["location"] == "/elsewhere"
    assert len(A.hits(i)) == 1 and A.hits("/elsewhere") == []


def test_repeated_headers_preserved(env: dict[str, Any]) -> None:
    # contract §9: only hop-by-hop headers are dropped
    r = env["sc"].get(f"/echo/cookies/{uid()}")
    assert sorted(r.headers.get_list("set-cookie")) == ["a=1; Path=/", "b=2; Path=/"]
    assert ",".join(r.headers.get_list("x-multi")).replace(" ", "") == "one,two"


def test_use_policy_and_service_override(env: dict[str, Any]) -> None:
    """Section 4 precedence: a used policy applies; the service's own lines replace it."""
    sc, A = env["sc"], env["A"]
    t = time.monotonic()
    r = sc.get(f"/usesvc/sleep/1/{uid()}")
    assert r.status_code == 504 and time.monotonic() - t < 0.7
    i = uid()
    assert attempts(sc.get(f"/usesvc/s/503/{i}")) == 2 and len(A.hits(i)) == 2
    r = sc.get(f"/useover/sleep/0.5/{uid()}")
    assert r.status_code == 200
    i = uid()
    assert attempts(sc.get(f"/useover/s/503/{i}")) == 2  # retry still from the policy


def test_repeated_request_headers_preserved(env: dict[str, Any]) -> None:
    # contract §9: only hop-by-hop headers are dropped (both directions)
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/echo/dup/{i}", headers=[("X-Two", "1"), ("X-Two", "2"), ("Accept", "a/b")],
               method="PATCH", content=b"patch-body")
    assert r.status_code == 200
    hit = A.hits(i)[0]
    assert [v for k, v in hit["raw_headers"] if k == "x-two"] == ["1", "2"]
    assert hit["method"] == "PATCH" and hit["body"] == "patch-body"


def _status(out: bytes) -> int:
    return int(out.split(b"\r\n", 1)[0].split(b" ")[1])


def test_dot_segments_forwarded_as_sent_but_never_above_the_service(env: dict[str, Any]) -> None:
    # contract §9 Faithful forwarding: "no dot-segment removal"; "a path whose .. segments
    # would climb above that prefix gets 400 with x-riprap-reason: bad-request"
    sc, A = env["sc"], env["A"]
    i = uid()
    out = _raw(sc.port, f"GET /echo/a/../{i}/./b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
               .encode())
    assert _status(out) == 200, out[:300]
    assert [h["path"] for h in A.hits(i)] == [f"/a/../{i}/./b"]
    for path in (f"/echo/../{i}", f"/echo/a/../../{i}"):
        out = _raw(sc.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert _status(out) == 400, out[:300]
        assert b"x-riprap-reason: bad-request" in out.lower()
    out = _raw(sc.port, f"GET /../{i} HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n".encode())
    assert _status(out) == 400 and b"x-riprap-reason: bad-request" in out.lower()
    assert A.hits(i) == [A.hits(i)[0]]  # only the first call reached the upstream


def _ws_handshake(port: int, host: str, path: str) -> Any:
    import socket

    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n"
              "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
    return s


def _read_head(s: Any) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


def test_websocket_upgrade_is_relayed_both_ways(env: dict[str, Any]) -> None:
    # contract §9 Upgrades: "forwarded with its upgrade headers; once the upstream answers
    # 101, the connection is relayed both ways until either side closes"; "timeout covers
    # the handshake, not the tunnel" (ws has timeout 1s)
    sc = env["sc"]
    for host, path in (("ws", "/chat"), ("127.0.0.1", "/ws/chat")):
        n = len(WS.heads)
        with _ws_handshake(sc.port, host, path) as s:
            head = _read_head(s)
            assert head.startswith(b"HTTP/1.1 101"), head[:200]
            assert b"s3pplmbitxaq9kygzzhzrbk+xoo=" in head.lower()  # RFC 6455's example key
            sent = WS.heads[n].lower()
            assert sent.startswith(b"get /chat ") and b"upgrade: websocket" in sent
            for k in range(3):
                msg = f"frame-{k}".encode()
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    got += s.recv(100)
                assert got == msg
                time.sleep(0.6 if k == 0 else 0)  # past the 1 s timeout in all: not cut
            time.sleep(0.6)
            s.sendall(b"late")
            assert s.recv(100) == b"late"


def test_connect_and_other_upgrades_refused_with_reason(env: dict[str, Any]) -> None:
    # contract §9 Upgrades: "CONNECT and other upgrades get a clear refusal with x-riprap-reason"
    import socket

    with socket.create_connection(("127.0.0.1", env["sc"].port), timeout=5) as s:
        s.sendall(b"CONNECT echo:443 HTTP/1.1\r\nHost: echo:443\r\n\r\n")
        data = s.recv(4096)
    assert 400 <= _status(data) < 500 and b"x-riprap-reason:" in data.lower(), data[:300]
    i = uid()
    out = _raw(env["sc"].port, f"GET /echo/{i} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
               "Upgrade: foo/1\r\n\r\n".encode())
    assert _status(out) == 501 and b"x-riprap-reason: upgrade-unsupported" in out.lower(), out[:300]
    assert env["A"].hits(i) == []


def test_request_head_over_bounds_is_431(env: dict[str, Any]) -> None:
    # contract §9 Limits: "a request head (line and headers) over 64 KiB, or over 256 headers, gets 431"
    sc = env["sc"]
    i = uid()
    big = "x" * (70 * 1024)
    out = _raw(sc.port, f"GET /echo/{i} HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n"
               "Connection: close\r\n\r\n".encode())
    assert _status(out) == 431, out[:200]
    many = "".join(f"X-H{k}: v\r\n" for k in range(300))
    out = _raw(sc.port, f"GET /echo/{i} HTTP/1.1\r\nHost: x\r\n{many}Connection: close\r\n\r\n"
               .encode())
    assert _status(out) == 431, out[:200]
    assert b"x-riprap-reason: headers-too-large" in out.lower(), out[:300]  # riprap made it
    assert env["A"].hits(i) == []
    # within the bounds: forwarded
    r = sc.get(f"/echo/{i}", headers={f"X-H{k}": "v" for k in range(200)})
    assert r.status_code == 200 and len(env["A"].hits(i)) == 1


def test_upstream_head_over_bounds_is_502_not_retried(env: dict[str, Any]) -> None:
    # contract §9 Limits: "An upstream answer with a head over the same bounds is a 502
    # upstream-failed that is not retried"
    sc, A = env["sc"], env["A"]
    for path in (f"/bighead/{70 * 1024}/{uid()}", f"/manyheaders/300/{uid()}"):
        r = sc.get(f"/bigheads{path}")
        assert r.status_code == 502 and reason(r) == "upstream-failed", (path, r.status_code)
        assert len(A.hits(path)) == 1, path
    r = sc.get(f"/bigheads/bighead/{30 * 1024}/{uid()}")
    assert r.status_code == 200 and len(r.headers["x-big"]) == 30 * 1024


def test_idle_keep_alive_connection_closed_after_5s(env: dict[str, Any]) -> None:
    # contract §9 Limits: a client "that stays idle on a keep-alive connection for longer than
    # the keep-alive timeout (5 s), is disconnected"
    import socket

    req = b"GET /echo/idle HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", env["sc"].port), timeout=15) as s:
        s.sendall(req)
        assert _read_head(s).startswith(b"HTTP/1.1 200")
        s.settimeout(0.2)
        time.sleep(3)
        try:  # drain the body; the connection is still open after 3 s
            while s.recv(65536):
                pass
        except TimeoutError:
            pass
        s.sendall(req)
        assert _read_head(s).startswith(b"HTTP/1.1 200"), "closed before 5 s idle"
        t = time.monotonic()
        s.settimeout(15)
        closed_at = None
        while closed_at is None:
            try:
                if not s.recv(65536):
                    closed_at = time.monotonic() - t
            except ConnectionResetError:
                closed_at = time.monotonic() - t
    assert 4.0 <= closed_at <= 9.0, closed_at


def test_slow_request_head_disconnected_after_10s(env: dict[str, Any]) -> None:
    # contract §9 Limits: "a client that has not sent a whole request head within 10 s ... is disconnected"
    import socket

    with socket.create_connection(("127.0.0.1", env["sc"].port), timeout=20) as s:
        s.sendall(b"GET /echo/slowhead HTTP/1.1\r\nHost: x\r\n")
        t = time.monotonic()
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        took = time.monotonic() - t
    assert 9.0 <= took <= 14.0, took
    assert not data or _status(data) in (408, 400), data[:200]


def test_header_names_and_values_forwarded_as_bytes(env: dict[str, Any]) -> None:
    # contract §9 Faithful forwarding: "Header names and values are forwarded as bytes, never re-encoded"
    sc, A = env["sc"], env["A"]
    i = uid()
    out = _raw(sc.port, b"GET /echo/" + i.encode() + b" HTTP/1.1\r\nHost: x\r\n"
               b"X-MiXeD-Case: keep\r\nX-Utf8: caf\xc3\xa9\r\nX-Latin: \xe9t\xe9\r\n"
               b"Connection: close\r\n\r\n")
    assert _status(out) == 200, out[:200]
    hit = A.hits(i)[0]
    assert "X-MiXeD-Case" in hit["names"], hit["names"]
    values = {k: v.encode("latin-1") for k, v in hit["raw_headers"]}
    assert values["x-utf8"] == b"caf\xc3\xa9" and values["x-latin"] == b"\xe9t\xe9"


def test_malformed_request_is_400_bad_request(env: dict[str, Any]) -> None:
    # contract §9: "Every answer that riprap made itself carries x-riprap-reason"
    i = uid()
    for raw in (f"GET /echo/{i} HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                f"GET /echo/{i} HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n"):
        out = _raw(env["sc"].port, raw.encode())
        assert _status(out) == 400, out[:200]
        assert b"x-riprap-reason: bad-request" in out.lower(), out[:300]
    assert env["A"].hits(i) == []


def test_unasked_bytes_from_a_pooled_upstream_connection_are_never_an_answer(env: dict[str, Any]) -> None:
    # contract §9: "A pooled upstream connection that sends bytes nobody asked for is closed,
    # never read as the next caller's answer"
    sc, A = env["sc"], env["A"]
    for _ in range(3):
        i = uid()
        r = sc.get(f"/resetter/extra/{i}")
        assert r.status_code == 200 and r.text == "A real"
        time.sleep(0.05)  # the unasked-for answer has arrived on the pooled connection
        j = uid()
        r = sc.get(f"/resetter/x/{j}")
        assert r.status_code == 200 and r.headers.get("x-upstream") == "A", r.text
        assert r.json()["path"] == f"/x/{j}" and len(A.hits(j)) == 1
