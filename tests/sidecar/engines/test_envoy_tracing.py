"""Tracing on the Envoy engine: `riprap run FILE --engine envoy` with the standard OTEL_*
variables set exports Envoy's own spans over OTLP/HTTP to a real receiver on loopback.

The receiver (`riprap_testing.otlp`) decodes what Envoy sends with `opentelemetry-proto`:
the call span `riprap SERVICE` is the child of the caller's traceparent, one attempt span
per `x-riprap-attempts`, the traceparent each upstream received names its attempt span,
and the resource names the service. Without the variables the configuration has no
tracing at all.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2",
                    reason="the otel extra (opentelemetry-proto) is not installed")

from dsl.plan import EndpointSpec, Plan, RetrySpec, ServicePlan  # noqa: E402
from riprap_testing.otlp import Receiver  # noqa: E402
from sidecar.engines.envoy import EnvoyPorts, build_config  # noqa: E402
from sidecar.engines.envoy.config import validation_bootstrap, to_yaml  # noqa: E402
from sidecar.engines.envoy.notes import NoteSink  # noqa: E402
from sidecar.engines.envoy.tracing import OTEL_CLUSTER, sampler_config, tracing_from_env  # noqa: E402

from envoy_harness import validate  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SPAN_KIND_CLIENT = 3


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def _clean_otel(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("OTEL_"):
            monkeypatch.delenv(var)


def _received_traceparents(*servers: Any) -> list[str]:
    return [h[1] for up in servers for req in up.recent for h in req["headers"]
            if h[0].lower() == "traceparent"]


def test_envoy_spans_link_the_caller_the_attempts_and_the_upstreams(
        receiver: Receiver, upstreams: Any, sidecar_proc: Any, module_tmp: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    bad, good = upstreams("et-bad"), upstreams("et-good")
    bad.set(error_rate=1.0, error_status=503)
    slow1, slow2 = upstreams("et-slow1"), upstreams("et-slow2")
    slow1.set(delay=0.3)
    slow2.set(delay=0.3)
    policy = module_tmp / "envoy-traced.riprap"
    # a real backoff: the upstream Lua filter's wait (a request to Envoy's own listener)
    # must make no span of its own
    policy.write_text(f"""\
app tracedshop
service pay {{
    timeout 5s
    retry 2 on 503 backoff 200ms jitter none
    balance round-robin
    endpoint {bad.url}
    endpoint {good.url}
}}
service recs {{
    timeout 5s
    hedge after 50ms
    breaker failures 5
    endpoint {slow1.url}
    endpoint {slow2.url}
}}
""")
    _clean_otel(monkeypatch)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-token=s3cret%20value")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # Envoy's flush interval
    side = sidecar_proc(policy, "--engine", "envoy").start(timeout=60)
    try:
        traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
        attempts_seen = []
        for _ in range(4):  # round-robin: calls that hit the 503 first are retried
            r = side.client.get("/pay/charge", headers={"traceparent": traceparent,
                                                       "tracestate": "vendor=abc"})
            assert r.status_code == 200
            attempts_seen.append(int(r.headers["x-riprap-attempts"]))
        assert max(attempts_seen) >= 2, attempts_seen
        hedged = side.client.get("/recs/top")
        assert hedged.status_code == 200 and hedged.headers["x-riprap-attempts"] == "2"
        assert side.client.get("/nosuch/x").status_code == 404  # riprap's own answer: no span
        # riprap's metrics poll reads the breakers from Envoy (Host _riprap) every second:
        # those reads are not traced either
        time.sleep(2.5)
        expected = sum(attempts_seen) + 2
        spans = receiver.wait_for(
            lambda ss: sum(s["name"].startswith("router ") for s in ss) >= expected
            and sum(s["name"] in ("riprap pay", "riprap recs") for s in ss) >= 5, timeout=30)
    finally:
        assert side.stop() == 0

    assert {s["service"] for s in spans} == {"tracedshop"}  # OTEL_SERVICE_NAME defaults to the app
    assert all(req["path"] == "/v1/traces" for req in receiver.requests)
    assert all(req["headers"].get("x-collector-token") == "s3cret value" for req in receiver.requests)
    names = {s["name"] for s in spans}
    assert names == {"riprap pay", "riprap recs", "router pay egress", "router recs egress"}, names

    calls = [s for s in spans if s["name"] == "riprap pay"]
    assert len(calls) == 4
    by_parent: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        by_parent.setdefault(s["parent"], []).append(s)
    received = _received_traceparents(bad, good)
    assert CALLER_SPAN not in {tp.split("-")[2] for tp in received}  # replaced, not forwarded
    states = {h[1] for up in (bad, good) for req in up.recent for h in req["headers"]
              if h[0].lower() == "tracestate"}
    assert states == {"vendor=abc"}  # the caller's tracestate goes on with every attempt
    for call in calls:
        assert call["kind"] == SPAN_KIND_CLIENT
        assert call["trace_id"] == CALLER_TRACE and call["parent"] == CALLER_SPAN
        assert call["attrs"]["riprap.service"] == "pay"
        children = by_parent.get(call["span_id"], [])
        assert children and all(c["name"] == "router pay egress" for c in children)
        assert len(children) == int(call["attrs"]["riprap.attempts"])
        retries = sorted(int(c["attrs"].get("retry.count", "0")) for c in children)
        assert retries == list(range(len(children)))  # attempt n carries retry.count n-1
        for child in children:
            assert child["kind"] == SPAN_KIND_CLIENT
            assert child["attrs"]["upstream_address"] in (bad.url[7:], good.url[7:])
            status = child["attrs"]["http.status_code"]
            assert (status == "503") == (child["attrs"]["upstream_address"] == bad.url[7:])
            assert (child["attrs"].get("error") == "true") == (status == "503")
            # the upstream got this attempt's own traceparent
            assert f"00-{CALLER_TRACE}-{child['span_id']}-01" in received
    assert sorted(int(c["attrs"]["riprap.attempts"]) for c in calls) == sorted(attempts_seen)

    recs = [s for s in spans if s["name"] == "riprap recs"]
    assert len(recs) == 1 and recs[0]["parent"] == ""  # no caller trace: a root span
    tries = by_parent[recs[0]["span_id"]]
    assert len(tries) == 2
    assert {c["attrs"].get("canceled") for c in tries} == {"true", None}  # the losing hedge
    hedge_tps = set(_received_traceparents(slow1, slow2))
    assert {f"00-{recs[0]['trace_id']}-{c['span_id']}-01" for c in tries} == hedge_tps


def test_envoy_sampler_service_name_and_signal_endpoint(
        receiver: Receiver, upstreams: Any, sidecar_proc: Any, module_tmp: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """parentbased_always_off: only calls whose caller sampled are traced; the caller's
    unsampled flag goes upstream unsampled; the signal endpoint is used as is; a static
    fallback's answer is tagged on the call span."""
    up, down = upstreams("et-sampled"), upstreams("et-down")
    down.set(error_rate=1.0, error_status=503)
    policy = module_tmp / "envoy-sampled.riprap"
    policy.write_text(f"""\
app sampledshop
service inv {{
    timeout 5s
    endpoint {up.url}
}}
service recs {{
    timeout 5s
    fallback status 200 json {{"items": []}}
    endpoint {down.url}
}}
service alt {{
    timeout 5s
    fallback service inv
    endpoint {down.url}
}}
service stock {{
    timeout 5s
    shard by header X-Sku
    shard a {{
        endpoint {up.url}
    }}
    shard b {{
        endpoint {up.url}
    }}
}}
""")
    _clean_otel(monkeypatch)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url + "/otlp/spans")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-envoy")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_off")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    side = sidecar_proc(policy, "--engine", "envoy").start(timeout=60)
    unsampled_trace = "5" * 32
    try:
        assert side.client.get("/inv/a").status_code == 200  # a root: always_off
        assert side.client.get("/inv/b", headers={
            "traceparent": f"00-{unsampled_trace}-{CALLER_SPAN}-00"}).status_code == 200
        assert side.client.get("/inv/c", headers={
            "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}).status_code == 200
        spans = receiver.wait_for(lambda ss: len(ss) >= 2, timeout=30)
        fell = side.client.get("/recs/top", headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
        assert fell.status_code == 200 and fell.headers["x-riprap-fallback"] == "static"
        receiver.wait_for(lambda ss: len(ss) >= 4, timeout=30)  # later exports still arrive
        other = side.client.get("/alt/x", headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
        assert other.status_code == 200 and other.headers["x-riprap-fallback"] == "service"
        sku = side.client.get("/stock/x", headers={
            "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "x-sku": "k1"})
        assert sku.status_code == 200
        receiver.wait_for(lambda ss: len(ss) >= 11, timeout=30)
    finally:
        assert side.stop() == 0
    with receiver.lock:
        spans = list(receiver.spans)
    assert {s["trace_id"] for s in spans} == {CALLER_TRACE}
    assert {s["service"] for s in spans} == {"edge-envoy"}
    assert sum(s["name"].startswith("router stock/") for s in spans) == 1
    assert sorted(s["name"] for s in spans if not s["name"].startswith("router stock/")) == [
        "async _riprap_self egress", "riprap alt", "riprap inv", "riprap inv", "riprap recs",
        "riprap stock", "router alt egress", "router inv egress", "router inv egress",
        "router recs egress"]
    # fallback service: the other service's call hangs under the Lua filter's call
    alt = next(s for s in spans if s["name"] == "riprap alt")
    assert alt["attrs"]["riprap.fallback"] == "service"
    hop = next(s for s in spans if s["name"] == "async _riprap_self egress")
    assert hop["parent"] == alt["span_id"]
    assert [s["name"] for s in spans if s["parent"] == hop["span_id"]] == ["riprap inv"]
    spans = [s for s in spans if s["name"] != "riprap alt" and s["parent"] not in (alt["span_id"], hop["span_id"])]
    # a shard: the call span is the service's, the attempt is its shard cluster's
    stock = next(s for s in spans if s["name"] == "riprap stock")
    assert [s["name"] for s in spans if s["parent"] == stock["span_id"]] in (
        ["router stock/a egress"], ["router stock/b egress"])
    spans = [s for s in spans if s is not stock and s["parent"] != stock["span_id"]]
    fallback = next(s for s in spans if s["name"] == "riprap recs")
    assert fallback["attrs"]["riprap.fallback"] == "static"
    assert fallback["attrs"]["riprap.reason"] == fell.headers["x-riprap-reason"]
    assert "riprap.fallback" not in next(s for s in spans if s["name"] == "riprap inv")["attrs"]
    assert {req["path"] for req in receiver.requests} == {"/otlp/spans"}
    unsampled = [tp for tp in _received_traceparents(up) if unsampled_trace in tp]
    assert len(unsampled) == 1 and unsampled[0].endswith("-00")


def test_envoy_exports_to_an_https_collector_it_verifies(
        upstreams: Any, sidecar_proc: Any, module_tmp: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """https:// endpoint: TLS to the collector, its certificate checked against
    OTEL_EXPORTER_OTLP_CERTIFICATE and the endpoint's address."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    ca_file = tmp_path / "collector-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    receiver = Receiver(tls=ctx).start()
    try:
        up = upstreams("et-tls")
        policy = module_tmp / "envoy-tls-collector.riprap"
        policy.write_text(f"app tlsshop\nservice inv {{\n    timeout 5s\n    endpoint {up.url}\n}}\n")
        _clean_otel(monkeypatch)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(ca_file))
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        side = sidecar_proc(policy, "--engine", "envoy").start(timeout=60)
        try:
            assert side.client.get("/inv/a").status_code == 200
            spans = receiver.wait_for(lambda ss: len(ss) >= 2, timeout=30)
        finally:
            assert side.stop() == 0
    finally:
        receiver.stop()
    assert receiver.url.startswith("https://")
    assert sorted(s["name"] for s in spans) == ["riprap inv", "router inv egress"]


def _plan() -> Plan:
    svc = ServicePlan(name="pay", endpoints=(EndpointSpec(url="http://127.0.0.1:9"),),
                      retry=RetrySpec(retries=1, on=("5xx",)))
    return Plan(app="shop", services={"pay": svc})


def _text(config: Any) -> str:
    return to_yaml(config.bootstrap) + "".join(to_yaml(doc) for doc in config.resources.values())


def _words(node: Any) -> set[str]:
    """Every key and every string value of a configuration (not the folder it lives in)."""
    if isinstance(node, dict):
        return set(node) | {w for v in node.values() for w in _words(v)}
    if isinstance(node, list):
        return {w for v in node for w in _words(v)}
    return {node} if isinstance(node, str) else set()


def test_no_tracing_configuration_without_the_variables(tmp_path: Path) -> None:
    ports = EnvoyPorts("127.0.0.1", 7400, 7401)
    unasked = {"PATH": "/usr/bin", "OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}
    for environ in (None, {}, unasked):
        config = build_config(_plan(), ports, dynamic_dir=tmp_path, chaos=False, environ=environ)
        words = _words(config.bootstrap) | _words(config.resources)
        for word in ("tracing", OTEL_CLUSTER, "decorator", "request_id_extension",
                     "start_child_span", "traffic_direction", "layered_runtime"):
            assert word not in words, (environ, word)
        assert not any("opentelemetry" in w for w in words)
    traced = build_config(_plan(), ports, dynamic_dir=tmp_path, chaos=False,
                          environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    text = _text(traced)
    assert OTEL_CLUSTER in text and "riprap pay" in text and "http://127.0.0.1:4318/v1/traces" in text
    # Envoy itself accepts every listener, route and cluster of the traced configuration
    path = tmp_path / "validate.yaml"
    path.write_text(to_yaml(validation_bootstrap(traced)))
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("name", "arg", "expected"), [
    ("", None, ("parent_based", "always_on", None)),
    ("parentbased_always_on", None, ("parent_based", "always_on", None)),
    ("always_on", None, ("always_on", None, None)),
    ("always_off", None, ("trace_id_ratio_based", None, 0)),
    ("traceidratio", "0.25", ("trace_id_ratio_based", None, 250_000)),
    ("parentbased_traceidratio", "0.1", ("parent_based", "trace_id_ratio_based", 100_000)),
    ("parentbased_always_off", None, ("parent_based", "trace_id_ratio_based", 0)),
    ("jaeger_remote", None, ("parent_based", "always_on", None)),
])
def test_sampler_mapping(name: str, arg: str | None, expected: tuple[str, str | None, int | None]) -> None:
    sink = NoteSink()
    cfg = sampler_config(name, arg, sink)
    outer, inner, parts = expected
    assert cfg["name"].endswith("." + outer)
    leaf = cfg["typed_config"]["wrapped_sampler"] if inner else cfg
    if inner:
        assert leaf["name"].endswith("." + inner)
    if parts is not None:
        assert leaf["typed_config"]["sampling_percentage"] == {"numerator": parts, "denominator": "MILLION"}
    assert bool(sink.notes()) == (name == "jaeger_remote")


def test_settings_follow_the_sdk_rules() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector.example:4443/base/",
           "OTEL_EXPORTER_OTLP_HEADERS": "a=1,b=two%2C2", "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "c=3",
           "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.name=ignored"}
    t = tracing_from_env("shop", env)
    assert t is not None
    assert t.url == "https://collector.example:4443/base/v1/traces"
    assert t.headers == (("c", "3"),)  # the signal's own variable wins
    assert t.service_name == "shop" and t.resource == (("deployment.environment", "prod"),)
    assert (t.flush_ms, t.batch) == (5000, 512)  # the SDK's batch processor defaults
    assert tracing_from_env("shop", {}) is None
    assert tracing_from_env("shop", {**env, "OTEL_SDK_DISABLED": "true"}) is None
    only = tracing_from_env("shop", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/x"})
    assert only is not None and (only.host, only.port, only.path) == ("127.0.0.1", 4318, "/x")


def test_compile_target_envoy_traces_when_compiled_with_the_variables(tmp_path: Path) -> None:
    policy = tmp_path / "shop.riprap"
    policy.write_text("app shop\nservice pay {\n    timeout 1s\n    endpoint http://127.0.0.1:9\n}\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    base["PYTHONPATH"] = str(ROOT)
    for traced in (False, True):
        env = dict(base, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318") if traced else base
        out = tmp_path / ("traced" if traced else "plain")
        done = subprocess.run([sys.executable, "-m", "dsl.cli", "compile", str(policy), "--target",
                               "envoy", "-o", str(out)], env=env, capture_output=True, text=True,
                              timeout=60, cwd=str(ROOT))
        assert done.returncode == 0, done.stderr
        head = (out / "envoy.yaml").read_text()
        lds = (out / "lds.yaml").read_text()
        assert ("# Tracing:" in head) is traced
        assert ("http://127.0.0.1:4318/v1/traces" in head) is traced
        assert ("envoy.tracers.opentelemetry" in lds) is traced
