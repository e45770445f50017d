"""An OTLP/HTTP trace receiver on loopback, for tests: every exported span, decoded.

Both engines' tracing tests export to it (riprap's SDK exporter and Envoy's own
OpenTelemetry tracer speak the same protocol: `POST /v1/traces`, a protobuf
`ExportTraceServiceRequest`). Decoding uses `opentelemetry-proto` (the `otel` extra),
imported when a receiver is made so that importing this module costs nothing.
"""

from __future__ import annotations

import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def decode_span(sp: Any, resource: dict[str, Any]) -> dict[str, Any]:
    """One protobuf span as a plain dict (ids in hex, attributes by key)."""
    return {
        "name": sp.name, "trace_id": sp.trace_id.hex(), "span_id": sp.span_id.hex(),
        "parent": sp.parent_span_id.hex(), "kind": sp.kind,
        "attrs": {a.key: _value(a.value) for a in sp.attributes},
        "events": [e.name for e in sp.events], "service": resource.get("service.name"),
        "status": sp.status.code,
    }


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: `spans`, `resources`, `requests` (path and
    headers of every export), filled as exports arrive. `start()`, then `stop()`. With `tls`
    (a server-side SSL context) it speaks HTTPS."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.spans: list[dict[str, Any]] = []
        self.resources: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self._body()
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                with receiver.lock:
                    receiver.requests.append({"path": self.path,
                                              "headers": {k.lower(): v for k, v in self.headers.items()}})
                    for rs in request.resource_spans:
                        res = {a.key: _value(a.value) for a in rs.resource.attributes}
                        receiver.resources.append(res)
                        for ss in rs.scope_spans:
                            for sp in ss.spans:
                                receiver.spans.append(decode_span(sp, res))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def _body(self) -> bytes:
                """The request body, sized or chunked (Envoy's exporter sends it chunked)."""
                if "chunked" not in self.headers.get("transfer-encoding", "").lower():
                    return self.rfile.read(int(self.headers.get("content-length", "0")))
                chunks: list[bytes] = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.scheme = "http"
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "Receiver":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def clear(self) -> None:
        with self.lock:
            self.spans.clear()
            self.resources.clear()
            self.requests.clear()

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool],
                 timeout: float = 10.0) -> list[dict[str, Any]]:
        """The spans received so far, once `predicate(spans)` holds (else AssertionError)."""
        deadline = time.monotonic() + timeout
        spans: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            with self.lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            time.sleep(0.05)
        raise AssertionError(f"the expected spans never arrived; got {spans}")


__all__ = ["Receiver", "decode_span"]
