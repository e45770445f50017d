"""OpenTelemetry traces of real calls, exported over OTLP/HTTP to a real receiver on loopback.

The receiver decodes what arrives with `opentelemetry-proto`: the call span `riprap
SERVICE` is the child of the caller's traceparent, one attempt span per
`x-riprap-attempts`, and the traceparent each upstream received names its attempt span.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2",
                    reason="the otel extra (opentelemetry-proto) is not installed")

from riprap_testing.otlp import Receiver  # noqa: E402 - after the skip

pytestmark = pytest.mark.slow

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


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
