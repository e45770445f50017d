"""OpenTelemetry traces of real calls, exported over OTLP/HTTP to a real receiver on loopback.

The receiver decodes what arrives with `opentelemetry-proto`: the call span `riprap
SERVICE` is the child of the caller's traceparent, one attempt span per
`x-riprap-attempts`, and the traceparent each upstream received names its attempt span.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

trace_pb2 = pytest.importorskip(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
    reason="the otel extra (opentelemetry-proto) is not installed")

pytestmark = pytest.mark.slow

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP trace receiver: every exported span, decoded."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.resources: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                request = trace_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                with receiver.lock:
                    for rs in request.resource_spans:
                        res = {a.key: a.value.string_value for a in rs.resource.attributes}
                        receiver.resources.append(res)
                        for ss in rs.scope_spans:
                            for sp in ss.spans:
                                receiver.spans.append(_span(sp, res))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            time.sleep(0.05)
        raise AssertionError(f"the expected spans never arrived; got {spans}")


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _span(sp: Any, resource: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": sp.name, "trace_id": sp.trace_id.hex(), "span_id": sp.span_id.hex(),
        "parent": sp.parent_span_id.hex(), "kind": sp.kind,
        "attrs": {a.key: _value(a.value) for a in sp.attributes},
        "events": [e.name for e in sp.events], "service": resource.get("service.name"),
    }


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def test_call_and_attempt_spans_link_to_the_caller_and_the_upstream(
        receiver: Receiver, upstreams: Any, sidecar_proc: Any, module_tmp: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    bad, good = upstreams("t-bad"), upstreams("t-good")
    bad.set(error_rate=1.0, error_status=503)
    slow1, slow2 = upstreams("t-slow1"), upstreams("t-slow2")
    slow1.set(delay=0.3)
    slow2.set(delay=0.3)
    policy = module_tmp / "traced.riprap"
    policy.write_text(f"""\
app tracedshop
service pay {{
    retry 2 on 503 backoff 1ms
    balance round-robin
    endpoint {bad.url}
    endpoint {good.url}
}}
service recs {{
    hedge after 50ms
    endpoint {slow1.url}
    endpoint {slow2.url}
}}
""")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    side = sidecar_proc(policy).start()
    try:
        traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
        attempts_seen = []
        for _ in range(4):  # round-robin: some calls hit the 503 first and are retried
            r = side.client.get("/pay/charge", headers={"traceparent": traceparent})
            assert r.status_code == 200
            attempts_seen.append(int(r.headers["x-riprap-attempts"]))
        assert max(attempts_seen) >= 2, attempts_seen
        hedged = side.client.get("/recs/top")
        assert hedged.status_code == 200 and hedged.headers["x-riprap-attempts"] == "2"
    finally:
        assert side.stop() == 0  # a clean stop flushes the batch processor

    expected = sum(attempts_seen) + 2
    spans = receiver.wait_for(
        lambda ss: sum(s["name"].endswith(" attempt") for s in ss) >= expected
        and sum(s["name"] in ("riprap pay", "riprap recs") for s in ss) >= 5)
    calls = [s for s in spans if s["name"] == "riprap pay"]
    assert len(calls) == 4
    assert {s["service"] for s in spans} == {"tracedshop"}  # OTEL_SERVICE_NAME defaults to the app
    by_parent: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        by_parent.setdefault(s["parent"], []).append(s)
    received = {(h[1]) for up in (bad, good) for req in up.recent for h in req["headers"]
                if h[0].lower() == "traceparent"}
    assert CALLER_SPAN not in {tp.split("-")[2] for tp in received}  # replaced, not forwarded
    for call in calls:
        assert call["kind"] == 3  # SPAN_KIND_CLIENT
        assert call["trace_id"] == CALLER_TRACE and call["parent"] == CALLER_SPAN
        children = by_parent.get(call["span_id"], [])
        assert children and all(c["name"] == "riprap pay attempt" for c in children)
        assert len(children) == call["attrs"]["riprap.attempts"]
        numbers = sorted(c["attrs"]["riprap.attempt"] for c in children)
        assert numbers == list(range(1, len(children) + 1))
        for child in children:
            kind = child["attrs"]["riprap.attempt.kind"]
            assert kind == ("first" if child["attrs"]["riprap.attempt"] == 1 else "retry")
            assert child["attrs"]["riprap.endpoint"] in (bad.url, good.url)
            # the upstream got this attempt's own traceparent
            assert f"00-{CALLER_TRACE}-{child['span_id']}-01" in received
    assert sorted(c["attrs"]["riprap.attempts"] for c in calls) == sorted(attempts_seen)

    recs = [s for s in spans if s["name"] == "riprap recs"]
    assert len(recs) == 1 and recs[0]["parent"] == ""  # no caller trace: a root span
    kinds = sorted(c["attrs"]["riprap.attempt.kind"] for c in by_parent[recs[0]["span_id"]])
    assert kinds == ["first", "hedge"]
    outcomes = {c["attrs"]["riprap.outcome"] for c in by_parent[recs[0]["span_id"]]}
    assert "cancelled" in outcomes  # the losing hedge


def test_no_tracing_code_without_the_variables(tmp_path: Path) -> None:
    """Without OTEL_EXPORTER_OTLP_*ENDPOINT a call runs with no tracer and no SDK loaded."""
    code = """
import asyncio, os, sys, httpx
for var in list(os.environ):
    if var.startswith("OTEL_"):
        del os.environ[var]
from dsl.plan import EndpointSpec, Plan, ServicePlan
from sidecar.app import create_app
plan = Plan(services={"svc": ServicePlan(name="svc", endpoints=(EndpointSpec(url="http://up"),))})
inner = httpx.MockTransport(lambda request: httpx.Response(200, text="ok"))
sidecar = create_app(plan, inner=inner, watch=False)
async def main():
    async with httpx.AsyncClient(transport=sidecar.transport) as client:
        r = await client.get("http://svc/x")
    assert r.status_code == 200, r
asyncio.run(main())
print(sidecar.tracer is None, any(m.startswith("opentelemetry") for m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=str(Path(__file__).resolve().parents[2]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]
