"""The upstream side through a real `riprap run`: header bytes as the client sent them,
the fast paths at /state, and TLS to an upstream with its CA rotated while the sidecar runs
(from a plan JSON that names the CA file, and from a policy file's `tls` statement with
mutual TLS and SNI: the watcher rebuilds the TLS context)."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import trustme

from dsl.plan import EndpointSpec, Plan, ServicePlan, TlsSpec


class ThreadUpstream:
    """A blocking 127.0.0.1 upstream (one thread per connection) that records every request
    head and answers 200 `ok`, closing each connection after one answer (so every call
    is a new connection and, with TLS, a new handshake)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.heads: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.heads.append(data[:data.index(b"\r\n\r\n") + 4])
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture
def plain_upstream() -> Iterator[ThreadUpstream]:
    up = ThreadUpstream()
    yield up
    up.close()


def raw_call(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        out = b""
        while b"\r\n\r\n" not in out or not out.endswith(b"ok"):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def test_header_bytes_go_through_the_sidecar_as_sent_and_state_shows_the_fast_paths(
        tmp_path: Path, plain_upstream: ThreadUpstream, sidecar_proc: Any) -> None:
    policy = tmp_path / "up.riprap"
    policy.write_text(f"app e2e\nservice api {{\n    endpoint http://127.0.0.1:{plain_upstream.port}\n}}\n")
    sc = sidecar_proc(policy).start()
    try:
        answer = raw_call(sc.port, b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                   b"X-Name: caf\xe9\r\nX-Utf8: caf\xc3\xa9\r\nX-Case: Kept\r\n\r\n")
        state = sc.admin.get("/state").json()
    finally:
        sc.stop()
    assert answer.startswith(b"HTTP/1.1 200") and b"x-riprap-attempts: 1" in answer.lower()
    head = plain_upstream.heads[0]
    assert head.startswith(b"GET /x HTTP/1.1\r\n")
    assert b"\r\nx-name: caf\xe9\r\n" in head.lower()  # one byte 0xE9
    assert b"\r\nx-utf8: caf\xc3\xa9\r\n" in head.lower()  # not double-encoded
    assert state["fast_paths"] and all(state["fast_paths"].values()), state["fast_paths"]


def test_a_rotated_upstream_ca_is_picked_up_without_a_restart(tmp_path: Path,
                                                              sidecar_proc: Any) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    old_ca.issue_cert("127.0.0.1").configure_cert(ctx)
    up = ThreadUpstream(tls=ctx)
    cafile = tmp_path / "ca.pem"
    old_ca.cert_pem.write_to_path(str(cafile))
    plan = Plan(app="e2e", watch=(str(cafile),), services={"api": ServicePlan(
        name="api", endpoints=(EndpointSpec(f"https://127.0.0.1:{up.port}"),),
        tls=TlsSpec(ca=str(cafile)))})
    policy = tmp_path / "plan.json"
    policy.write_text(json.dumps(plan.to_dict()))
    sc = sidecar_proc(policy).start()
    try:
        assert sc.client.get("/api/before").status_code == 200
        # rotation: the upstream now presents a certificate of a new CA; the file follows
        new_ca.issue_cert("127.0.0.1").configure_cert(ctx)
        assert sc.client.get("/api/between").status_code == 502  # the old CA no longer fits
        new_ca.cert_pem.write_to_path(str(cafile))
        statuses = []
        for _ in range(100):  # the watcher reloads within about 50 ms; bounded to 10 s
            statuses.append(sc.client.get("/api/after").status_code)
            if statuses[-1] == 200:
                break
            threading.Event().wait(0.1)
        plan_doc = sc.plan()
        logs = sc.logs()
    finally:
        sc.stop()
        up.close()
    assert statuses[-1] == 200, (statuses, logs)
    assert plan_doc["last_error"] is None


def test_mutual_tls_from_a_policy_file_with_relative_paths_and_a_rotation(
        tmp_path: Path, sidecar_proc: Any) -> None:
    """The `tls` statement end to end: `ca`, `cert`/`key` and `sni` relative to the policy
    file; the upstream requires the client certificate; then its CA is rotated."""
    server_ca, client_ca, next_ca = trustme.CA(), trustme.CA(), trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ca.issue_cert("api.internal").configure_cert(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    client_ca.configure_trust(ctx)
    up = ThreadUpstream(tls=ctx)
    certs = tmp_path / "certs"
    certs.mkdir()
    server_ca.cert_pem.write_to_path(str(certs / "ca.pem"))
    client = client_ca.issue_cert("checkout.client")
    client.cert_chain_pems[0].write_to_path(str(certs / "client.pem"))
    client.private_key_pem.write_to_path(str(certs / "client.key"))
    policy = tmp_path / "mtls.riprap"
    policy.write_text(
        "app e2e\n\nservice api {\n"
        "    timeout 5s\n"
        f"    endpoint https://127.0.0.1:{up.port}\n"
        '    tls ca "certs/ca.pem" cert "certs/client.pem" key "certs/client.key" sni api.internal\n'
        "}\n")
    sc = sidecar_proc(policy).start()
    try:
        first = sc.client.get("/api/one")
        watched = sc.plan()["plan"]["watch"]
        next_ca.issue_cert("api.internal").configure_cert(ctx)  # the upstream rotates first
        next_ca.cert_pem.write_to_path(str(certs / "ca.pem"))   # then the CA file follows
        statuses = []
        for _ in range(100):  # bounded: 10 s
            statuses.append(sc.client.get("/api/two").status_code)
            if statuses[-1] == 200:
                break
            threading.Event().wait(0.1)
        logs = sc.logs()
    finally:
        sc.stop()
        up.close()
    assert first.status_code == 200, logs
    assert str(certs / "ca.pem") in watched and str(certs / "client.key") in watched
    assert statuses[-1] == 200, (statuses, logs)
