"""The compiler: precedence, defaults, units, shards, fallbacks, supervision, spans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsl.compiler import compile_file, compile_source
from dsl.diagnostics import Span
from dsl.plan import DEFAULT_ORDER, DEFAULT_RETRY_ON, IDEMPOTENT_METHODS, Plan, ServicePlan
from dsl.schema import validate_plan_dict

EP = "    endpoint http://127.0.0.1:9001\n"


def plan_of(text: str, path: str = "/tmp/x/shop.riprap") -> Plan:
    unit = compile_source(text, path)
    assert unit.plan is not None, [(d.code, d.span, d.message) for d in unit.diagnostics]
    return unit.plan


def svc(text: str, name: str = "a") -> ServicePlan:
    return plan_of(text).services[name]


def test_defaults_of_an_empty_service() -> None:
    plan = plan_of("service a {\n" + EP + "}\n")
    assert plan.app == "shop"  # the file's stem
    assert plan.listen == "127.0.0.1:7400" and plan.admin == "127.0.0.1:7401"
    a = plan.services["a"]
    assert a.timeout == 15.0 and a.retry is None and a.hedge is None and a.breaker is None
    assert a.limit is None and a.concurrency is None and a.fallbacks == () and a.chaos == ()
    assert a.balance == "least-request" and a.order == DEFAULT_ORDER
    assert a.endpoints[0].url == "http://127.0.0.1:9001" and a.endpoints[0].weight == 1


def test_units() -> None:
    a = svc(
        "service a {\n" + EP + "    timeout 1.5s\n    limit 300/m\n    chaos delay 0.5% 250us\n"
        "    retry 1 backoff 100ms budget 20% min 6/m\n    fallback stale 2h\n}\n"
    )
    assert a.timeout == 1.5
    assert a.limit is not None and a.limit.rate == 5.0 and a.limit.burst == 5.0
    assert a.chaos[0].probability == 0.005 and a.chaos[0].delay == 0.00025
    assert a.retry is not None and a.retry.backoff is not None
    assert a.retry.backoff.kind == "constant" and a.retry.backoff.base == a.retry.backoff.max == 0.1
    assert a.retry.budget is not None and a.retry.budget.ratio == 0.2 and a.retry.budget.min_per_second == 0.1
    assert a.fallbacks[0].max_age == 7200.0


def test_precedence_defaults_then_use_in_order_then_own_lines() -> None:
    text = (
        "defaults {\n    timeout 5s\n    retry 2\n    fallback stale 1m\n    chaos abort 1%\n}\n"
        "policy p1 {\n    timeout 3s\n    hedge after 50ms\n    fallback stale 2m\n}\n"
        "policy p2 {\n    timeout 2s\n    breaker failures 3\n}\n"
        "service a {\n    timeout 1s\n    use p1\n    use p2\n" + EP + "    fallback status 503 text \"x\"\n}\n"
        "service b {\n    use p2\n    use p1\n" + EP + "}\n"
    )
    plan = plan_of(text)
    a, b = plan.services["a"], plan.services["b"]
    assert a.timeout == 1.0  # own line wins wherever `use` stands
    assert b.timeout == 3.0  # the later policy wins
    assert a.retry is not None and a.retry.retries == 2 and a.retry.on == DEFAULT_RETRY_ON
    assert a.hedge is not None and a.breaker is not None and a.breaker.failures == 3
    assert [f.kind for f in a.fallbacks] == ["stale", "stale", "static"]
    assert [f.max_age for f in a.fallbacks[:2]] == [60.0, 120.0]
    assert [c.probability for c in a.chaos] == [0.01]


def test_retry_details() -> None:
    a = svc(
        "service a {\n" + EP + "    retry 3 on connect-failure, 503, 5xx, timeout backoff 100ms..1s "
        "jitter decorrelated per-try 600ms budget 20% methods POST, PATCH, GET\n}\n"
    )
    r = a.retry
    assert r is not None and r.retries == 3
    assert r.on == ("connect-failure", "503", "5xx", "timeout")
    assert r.backoff is not None and (r.backoff.kind, r.backoff.base, r.backoff.max, r.backoff.jitter) == (
        "exponential",
        0.1,
        1.0,
        "decorrelated",
    )
    assert r.per_try_timeout == 0.6
    assert r.budget is not None and r.budget.min_per_second == 10.0 and r.budget.window == 10.0
    assert r.methods == IDEMPOTENT_METHODS + ("POST", "PATCH")


def test_retry_zero_turns_retries_off() -> None:
    a = svc("defaults {\n    retry 3\n}\nservice a {\n" + EP + "    retry 0\n}\n")
    assert a.retry is None


def test_hedge_and_breaker_defaults() -> None:
    a = svc("service a {\n" + EP + "    hedge at p95\n    breaker failure-rate 50%\n}\n")
    assert a.hedge is not None and a.hedge.percentile == 0.95 and a.hedge.delay is None
    assert a.hedge.min_delay == 0.010 and a.hedge.max_extra == 1
    b = a.breaker
    assert b is not None and (b.kind, b.rate, b.window, b.min_calls, b.open, b.max_open, b.probes) == (
        "rate",
        0.5,
        20,
        10,
        30.0,
        300.0,
        1,
    )
    c = svc("service a {\n" + EP + "    breaker failures 5 open 10s probes 2\n    hedge after 80ms max 2\n}\n")
    assert c.breaker is not None and (c.breaker.kind, c.breaker.failures, c.breaker.max_open) == ("consecutive", 5, 100.0)
    assert c.hedge is not None and c.hedge.delay == 0.08 and c.hedge.max_extra == 2


def test_limit_concurrency_health_outlier_endpoints() -> None:
    a = svc(
        "service a {\n    endpoint http://127.0.0.1:1 weight 2\n    failover http://127.0.0.1:2\n"
        "    failover http://127.0.0.1:3 tier 2 weight 3\n    balance random\n"
        "    limit 10/s per header X-Tenant\n    concurrency 8\n    health HEAD /h expect 200, 3xx\n"
        "    outlier failures 4\n}\n"
    )
    assert [(e.url[-1], e.weight, e.tier) for e in a.endpoints] == [("1", 2, 0), ("2", 1, 1), ("3", 3, 2)]
    assert a.balance == "random"
    assert a.limit is not None and (a.limit.rate, a.limit.burst, a.limit.per_header) == (10.0, 10.0, "X-Tenant")
    assert a.concurrency is not None and (a.concurrency.max, a.concurrency.queue, a.concurrency.queue_timeout) == (8, 0, 1.0)
    h = a.health
    assert h is not None and (h.method, h.path, h.interval, h.timeout, h.fall, h.rise, h.expect) == (
        "HEAD",
        "/h",
        5.0,
        1.0,
        3,
        2,
        ("200", "3xx"),
    )
    assert a.outlier is not None and (a.outlier.eject, a.outlier.max_fraction) == (30.0, 0.5)


def test_shards_are_fully_resolved() -> None:
    text = (
        "defaults {\n    timeout 2s\n    fallback stale 1m\n}\n"
        "service inv {\n    shard by path-segment 2\n    shard default b\n    health GET /h\n"
        "    breaker failures 5\n    chaos abort 1%\n"
        "    shard a {\n        endpoint http://127.0.0.1:1\n        timeout 500ms\n        balance random\n"
        "        fallback status 503 text \"a down\"\n        chaos delay 2% 1s\n    }\n"
        "    shard b {\n        endpoint http://127.0.0.1:2\n        failover http://127.0.0.1:3\n    }\n}\n"
    )
    inv = svc(text, "inv")
    assert inv.endpoints == () and inv.sharding is not None
    assert (inv.sharding.by, inv.sharding.key, inv.sharding.default) == ("path-segment", "2", "b")
    a, b = inv.shards
    assert a.timeout == 0.5 and b.timeout == 2.0
    assert a.balance == "random" and b.balance == "least-request"
    assert a.health == inv.health and a.breaker == inv.breaker
    assert [f.kind for f in a.fallbacks] == ["stale", "static"] and [f.kind for f in b.fallbacks] == ["stale"]
    assert [c.kind for c in a.chaos] == ["abort", "delay"]
    assert [e.tier for e in b.endpoints] == [0, 1]


def test_fallback_bodies(tmp_path: Path) -> None:
    (tmp_path / "fb").mkdir()
    (tmp_path / "fb/page.html").write_text("<p>later</p>", encoding="utf-8")
    (tmp_path / "fb/data.json").write_text('{"x": 1}\n', encoding="utf-8")
    (tmp_path / "fb/note.txt").write_text("later", encoding="utf-8")
    policy = tmp_path / "p.riprap"
    policy.write_text(
        "service a {\n" + EP + '    fallback status 503 file "fb/page.html"\n    fallback status 503 file "fb/data.json"\n'
        '    fallback status 503 file "fb/note.txt"\n    fallback status 200 json {"a": [1, "é"]}\n'
        '    fallback status 503 text "sorry\\n"\n    fallback service b\n}\nservice b {\n    endpoint http://127.0.0.1:2\n}\n',
        encoding="utf-8",
    )
    unit = compile_file(str(policy))
    assert unit.plan is not None
    fbs = unit.plan.services["a"].fallbacks
    assert [(f.content_type, f.body) for f in fbs[:5]] == [
        ("text/html; charset=utf-8", "<p>later</p>"),
        ("application/json", '{"x": 1}\n'),
        ("text/plain; charset=utf-8", "later"),
        ("application/json", '{"a":[1,"é"]}'),
        ("text/plain; charset=utf-8", "sorry\n"),
    ]
    assert fbs[0].file == str(tmp_path / "fb/page.html")
    assert fbs[5].kind == "service" and fbs[5].service == "b"
    assert unit.plan.source == str(policy)
    assert unit.plan.watch == (str(policy), *(str(tmp_path / f"fb/{n}") for n in ("page.html", "data.json", "note.txt")))


def test_missing_fallback_file_is_located_and_all_errors_reported(tmp_path: Path) -> None:
    policy = tmp_path / "p.riprap"
    policy.write_text("service a {\n" + EP + '    fallback status 503 file "nope.json"\n    timeout 0s\n}\n', encoding="utf-8")
    unit = compile_file(str(policy))
    assert unit.plan is None
    assert [(d.code, d.span.line) for d in unit.diagnostics if d.span] == [("RP226", 3), ("RP222", 4)]


def test_supervise_block() -> None:
    plan = plan_of(
        'app shop {\n    run "python -m shop"\n    health GET http://127.0.0.1:8000/healthz every 5s timeout 1s fall 3\n'
        "    restart backoff 1s..30s\n}\nservice a {\n" + EP + "}\n"
    )
    sup = plan.supervise
    assert plan.app == "shop" and sup is not None and sup.run == "python -m shop"
    assert sup.health is not None and sup.health.url == "http://127.0.0.1:8000/healthz"
    assert (sup.health.interval, sup.health.timeout, sup.health.fall) == (5.0, 1.0, 3)
    assert (sup.restart_base, sup.restart_max) == (1.0, 30.0)


def test_hosts_names_may_be_used_before_declared() -> None:
    plan = plan_of(
        "service a {\n    host a.internal, a.example.com\n    fallback service b\n" + EP + "}\n"
        "service b {\n    endpoint http://127.0.0.1:2\n}\n"
    )
    assert plan.services["a"].hosts == ("a.internal", "a.example.com")
    assert list(plan.services) == ["a", "b"]


def test_spans_and_unit() -> None:
    unit = compile_source("# x\napp shop\nservice a {\n" + EP + "}\n\nservice b {\n" + EP + "}\n", "s.riprap")
    assert unit.ok
    assert unit.app_span is not None and (unit.app_span.line, unit.app_span.col) == (2, 1)
    assert {k: v.line for k, v in unit.service_spans.items()} == {"a": 3, "b": 7}
    default = compile_source("service a {\n" + EP + "}\n", "s.riprap")
    assert default.app_span == Span("s.riprap", 1, 1)


def test_plan_round_trips_and_validates() -> None:
    root = Path(__file__).resolve().parents[2]
    examples = sorted((root / "examples").rglob("*.riprap"))
    assert examples
    for example in examples:
        unit = compile_file(str(example))
        assert unit.plan is not None, example
        data = unit.plan.to_dict()
        assert validate_plan_dict(data) == []
        again = Plan.from_dict(json.loads(json.dumps(data)))
        assert again == unit.plan
        assert again.digest() == unit.plan.digest()


@pytest.mark.parametrize(
    "text",
    [
        "service a {\n" + EP + "    timeout 250ms\n}\n",
        "service a {\n" + EP + "    timeout 250ms\n}\n".replace("\n", "\r\n"),
        "\ufeffservice a {\n" + EP + "    timeout 250ms\n}",
    ],
)
def test_line_endings_and_bom(text: str, tmp_path: Path) -> None:
    path = tmp_path / "p.riprap"
    path.write_bytes(text.encode("utf-8"))
    unit = compile_file(str(path))
    assert unit.plan is not None and unit.plan.services["a"].timeout == 0.25


def test_app_name_from_any_file_name(tmp_path: Path) -> None:
    path = tmp_path / "01 my policy.riprap"
    path.write_text("service a {\n" + EP + "    timeout 1s\n}\n", encoding="utf-8")
    unit = compile_file(str(path))
    assert unit.plan is not None and unit.plan.app == "01 my policy"
