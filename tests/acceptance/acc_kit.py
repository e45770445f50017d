"""Black-box kit for the sidecar acceptance tests: tiny real upstreams and a `riprap run`
subprocess on free loopback ports. Depends on nothing in the project but its CLI.

Upstream behaviour is chosen by the request path (after any service prefix), so that many
tests can share one upstream and one sidecar:

    /s/CODE/...            answer CODE with body "NAME says CODE"
    /sleep/SECS/...        wait, then echo
    /reset/...             reset the connection (RST) without answering
    /reseton/A,B/...       reset on upstreams named A or B, echo elsewhere
    /sleepcode/SECS/CODE/  wait, then answer CODE
    /garbage/...           a non-HTTP answer, then close
    /gzip/ /redirect/ /cookies/   a gzip body, a 302, two Set-Cookie headers
    /hstate/KEY            503 while KEY is in `unhealthy`, else echo
    /goodbad/SECS/...      on A: wait, then echo; elsewhere: 503 at once
    /flip/...              first call to this exact path: echo; later calls: 503
    /failon/A,B/...        503 on upstreams named A or B, echo elsewhere
    /slowon/A,B/SECS/...   sleep on upstreams named A or B, echo elsewhere
    /hop/...               echo, with hop-by-hop headers in the answer
    /flipset/H/...         as /flip/, the good answer with the headers H: `Name=Value` pairs
                           joined by `;`, percent-encoded (`flipset_path` builds it)
    /raflip/SECS/...       first call to this exact path: 503 + Retry-After SECS; then echo
    /big/N/...             N bytes
    /drip/COUNT/SECS/...   a chunked answer of COUNT chunks, one every SECS
    /size/...              echo without the body (its size only)
    /bighead/N/...         200 with an answer head of about N bytes (one long header)
    /extra/...             echo, then an unasked-for second answer on the same connection
    /manyheaders/N/...     200 with N extra headers
    anything else          200 echo: JSON {upstream, method, path, headers, body}
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx


# Python's http.server refuses a request with over 100 headers (431): the test upstreams
# take what riprap forwards (up to its own bound of 256)
http.client._MAXHEADERS = 1024  # type: ignore[attr-defined]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:  # quiet
        pass


class Upstream:
    """A real HTTP/1.1 server on 127.0.0.1 in a thread, recording what it receives."""

    def __init__(self, name: str, host: str = "127.0.0.1") -> None:
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.flipped: set[str] = set()
        self.unhealthy: set[str] = set()
        up = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                t0 = time.monotonic()
                if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            break
                        body += self.rfile.read(size)
                        self.rfile.readline()
                else:
                    n = int(self.headers.get("content-length") or 0)
                    body = self.rfile.read(n) if n else b""
                rec = {"method": self.command, "path": self.path,
                       "headers": {k.lower(): v for k, v in self.headers.items()},
                       "raw_headers": [(k.lower(), v) for k, v in self.headers.items()],
                       "names": list(self.headers.keys()),  # as sent (case kept)
                       "body": body.decode("latin-1"), "t": time.monotonic(), "t0": t0}
                with up.lock:
                    up.requests.append(rec)
                parts = self.path.split("?")[0].split("/")
                kind = parts[1] if len(parts) > 1 else ""
                if kind == "s":
                    code = int(parts[2])
                    self._send(code, f"{up.name} says {code}".encode(), "text/plain")
                    return
                if kind == "sleep":
                    time.sleep(float(parts[2]))
                elif kind == "gzip":  # a gzip-encoded answer
                    import gzip
                    raw = gzip.compress(b"hello gzip " * 50)
                    self._send(200, raw, "text/plain", [("Content-Encoding", "gzip")])
                    return
                elif kind == "redirect":
                    self._send(302, b"moved", "text/plain", [("Location", "/elsewhere")])
                    return
                elif kind == "cookies":
                    self._send(200, b"c", "text/plain", [("Set-Cookie", "a=1; Path=/"),
                                                         ("Set-Cookie", "b=2; Path=/"),
                                                         ("X-Multi", "one"), ("X-Multi", "two")])
                    return
                elif kind == "hstate":  # 200 unless up.unhealthy holds parts[2]
                    if parts[2] in up.unhealthy:
                        self._send(503, b"down", "text/plain")
                        return
                elif kind == "garbage":  # not HTTP at all, then close
                    self.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
                    self.wfile.flush()
                    self.close_connection = True
                    return
                elif kind == "sleepcode":  # /sleepcode/SECS/CODE/...
                    time.sleep(float(parts[2]))
                    code = int(parts[3])
                    self._send(code, f"{up.name} says {code}".encode(), "text/plain")
                    return
                elif kind == "reset" or (kind == "reseton" and up.name in parts[2].split(",")):
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                elif kind == "flip":
                    with up.lock:
                        seen = self.path in up.flipped
                        up.flipped.add(self.path)
                    if seen:
                        self._send(503, b"flipped", "text/plain")
                        return
                elif kind == "flipset":
                    with up.lock:
                        seen = self.path in up.flipped
                        up.flipped.add(self.path)
                    if seen:
                        self._send(503, b"flipped", "text/plain")
                        return
                    from urllib.parse import unquote
                    extra = [tuple(unquote(kv).split("=", 1)) for kv in parts[2].split(";") if kv]
                    doc = {"upstream": up.name, "path": rec["path"], "headers": rec["headers"]}
                    self._send(200, json.dumps(doc).encode(), "application/json",
                               [(k, v) for k, v in extra])
                    return
                elif kind == "extra":  # an answer, then bytes nobody asked for
                    self._send(200, f"{up.name} real".encode(), "text/plain")
                    bogus = b"bogus answer"
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                     b"X-Upstream: BOGUS\r\nContent-Length: %d\r\n\r\n%s"
                                     % (len(bogus), bogus))
                    self.wfile.flush()
                    return
                elif kind in ("bighead", "manyheaders"):
                    n = int(parts[2])
                    many = [(f"X-H{k}", "v") for k in range(n)]
                    self._send(200, b"head", "text/plain",
                               [("X-Big", "a" * n)] if kind == "bighead" else many)
                    return
                elif kind == "failon":
                    if up.name in parts[2].split(","):
                        self._send(503, f"{up.name} fails".encode(), "text/plain")
                        return
                elif kind == "raflip":  # first call: 503 + Retry-After SECS; then echo
                    with up.lock:
                        seen = self.path in up.flipped
                        up.flipped.add(self.path)
                    if not seen:
                        ra = parts[2]
                        if ra.startswith("date"):  # an HTTP-date that many seconds ahead
                            from email.utils import formatdate
                            ra = formatdate(time.time() + float(ra[4:]), usegmt=True)
                        self._send(503, b"busy", "text/plain", [("Retry-After", ra)])
                        return
                elif kind == "big":  # N bytes of a repeating pattern
                    n = int(parts[2])
                    self._send(200, (b"0123456789abcdef" * (n // 16 + 1))[:n],
                               "application/octet-stream")
                    return
                elif kind == "drip":  # chunked: COUNT chunks, one every SECS
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("X-Upstream", up.name)
                    self.end_headers()
                    for k in range(int(parts[2])):
                        chunk = f"chunk{k};".encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                        time.sleep(float(parts[3]))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                elif kind == "goodbad":  # A: slow then echo; others: 503 at once
                    if up.name != "A":
                        self._send(503, f"{up.name} says 503".encode(), "text/plain")
                        return
                    time.sleep(float(parts[2]))
                elif kind == "slowon":
                    if up.name in parts[2].split(","):
                        time.sleep(float(parts[3]))
                extra = []
                if kind == "hop":
                    extra = [("Connection", "X-Resp-Hop"), ("X-Resp-Hop", "1"),
                             ("Keep-Alive", "timeout=99"), ("Proxy-Authenticate", "Basic"),
                             ("X-Resp-Kept", "yes")]
                doc = {"upstream": up.name, "method": rec["method"], "path": rec["path"],
                       "headers": rec["headers"], "body": rec["body"], "size": len(body)}
                if kind == "size":  # do not echo big bodies back
                    doc["body"] = ""
                self._send(200, json.dumps(doc).encode(), "application/json", extra)

            def _send(self, code: int, body: bytes, ctype: str,
                      extra: list[tuple[str, str]] | None = None) -> None:
                bodiless = code in (204, 304) or code < 200  # RFC 9110: no body, no length
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                if not bodiless:
                    self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Upstream", up.name)
                for k, v in extra or ():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD" and not bodiless:
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _any

        server_cls = _Server
        if ":" in host:
            server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        self.server = server_cls((host, 0), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def hits(self, needle: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if needle in r["path"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def riprap_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "riprap"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("riprap")
    assert found, "the riprap command is not installed"
    return [found]


def clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                "all_proxy", "NO_PROXY", "no_proxy"):
        env.pop(var, None)
    return env


class Sidecar:
    """`riprap run FILE [args]` as a subprocess; `port`/`admin_port` are where it serves."""

    def __init__(self, policy: Path, port: int, admin_port: int, *args: str,
                 admin_host: str = "127.0.0.1", cwd: Path | None = None) -> None:
        self.cwd = cwd or policy.parent
        self.policy = policy
        self.port = port
        self.admin_port = admin_port
        self.args = list(args)
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://{admin_host}:{admin_port}"
        self.client = httpx.Client(base_url=self.url, trust_env=False, timeout=10)
        self.admin = httpx.Client(base_url=self.admin_url, trust_env=False, timeout=5)
        self.log_path = policy.parent / f"sidecar-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.engine = "python"  # which engine runs the plan (the run_sidecar fixture sets it)

    def start(self, timeout: float = 15.0) -> "Sidecar":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([*riprap_cmd(), "run", str(self.policy), *self.args],
                                     cwd=str(self.cwd), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=clean_env())
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"riprap run exited {self.proc.returncode}:\n{self.logs()}")
            try:
                if self.admin.get("/readyz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.03)
        self.stop()
        raise AssertionError(f"sidecar not ready in {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        rc = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait(5)
        self.client.close()
        self.admin.close()
        if getattr(self, "_log", None) is not None:
            self._log.close()
        return rc

    def get(self, path: str, host: str | None = None, **kw: Any) -> httpx.Response:
        headers: Any = kw.pop("headers", None) or {}
        if host is not None:
            headers = [*(headers.items() if isinstance(headers, dict) else headers),
                       ("Host", host)]
        return self.client.request(kw.pop("method", "GET"), path, headers=headers, **kw)


# `run_sidecar(policy, *args, port=..., admin=...)`, the fixture of conftest.py that starts
# every sidecar of these tests
RunSidecar = Callable[..., Sidecar]


def wait_for(pred: Callable[[], Any], timeout: float, step: float = 0.02) -> Any:
    """Poll `pred` until truthy; its value, or None at the timeout."""
    end = time.monotonic() + timeout
    while True:
        try:
            v = pred()
        except (httpx.TransportError, OSError, ValueError, KeyError):
            v = None
        if v:
            return v
        if time.monotonic() >= end:
            return None
        time.sleep(step)


def uid() -> str:
    """A fresh id for a call's path: `Upstream.hits(id)` finds exactly that call."""
    return uuid.uuid4().hex[:12]


def flipset_path(prefix: str, headers: dict[str, str]) -> str:
    """`PREFIX/flipset/H/ID`: first call 200 with `headers` in the answer, later calls 503."""
    from urllib.parse import quote
    enc = ";".join(quote(f"{k}={v}", safe="") for k, v in headers.items())
    return f"{prefix}/flipset/{enc or ';'}/{uid()}"


def reason(r: httpx.Response) -> str | None:
    return r.headers.get("x-riprap-reason")


def attempts(r: httpx.Response) -> int:
    assert "x-riprap-attempts" in r.headers, f"no x-riprap-attempts: {dict(r.headers)}"
    return int(r.headers["x-riprap-attempts"])


def sidecar_env(policy: Callable[..., str], tmp_path_factory: Any, ups: dict[str, Any],
                run_sidecar: RunSidecar,
                files: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """The body of each test file's `env` fixture: its `policy(A, B, C, DEAD, listen, admin)`
    written to a file and run, with --listen/--admin overriding the file's addresses;
    `files` (name -> text) are written next to it first (files the policy names)."""
    d = tmp_path_factory.mktemp("acc")
    for name, text in (files or {}).items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text, encoding="utf-8")
    file_listen, file_admin = free_port(), free_port()
    path = d / "acc.riprap"
    path.write_text(policy(ups["A"].url, ups["B"].url, ups["C"].url,
                           f"http://127.0.0.1:{ups['DEAD']}", file_listen, file_admin),
                    encoding="utf-8")
    port, admin = free_port(), free_port()
    # section 8: --listen and --admin override the file
    sc = run_sidecar(path, "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                     port=port, admin=admin)
    proxy = httpx.Client(proxy=sc.url, trust_env=False, timeout=10)
    try:
        yield {"sc": sc, "A": ups["A"], "B": ups["B"], "proxy": proxy, "dir": d,
               "file_listen": file_listen, "file_admin": file_admin, "policy": path}
    finally:
        proxy.close()
        sc.stop()
