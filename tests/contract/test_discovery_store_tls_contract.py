"""Acceptance tests for this round's statements, black-box through the `riprap` CLI:
`resolver` and `store` (section 3), `limit ... shared` and `tls` (section 4), `resolve [every D]`
(section 5) and the exposure rules of section 9, as /work/shared/language.md states them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trustme

from contract_helpers import errors, plan_of, run_scenarios, warnings

EP = "    endpoint http://127.0.0.1:9001\n"


def _pems() -> dict[str, bytes]:
    ca = trustme.CA()
    client = ca.issue_cert("client.internal")
    return {
        "certs/ca.pem": ca.cert_pem.bytes(),
        "certs/client.pem": client.cert_chain_pems[0].bytes(),
        "certs/client-key.pem": client.private_key_pem.bytes(),
        "certs/junk.pem": b"not a certificate\n",
    }


PEMS = _pems()

SCENARIOS: dict = {
    "resolver_store": (
        {
            "p.riprap": "app shop\nresolver 127.0.0.1:5353, [::1]:53\nstore redis://:pw@127.0.0.1:6379/2\n"
            "service payments {\n    endpoint http://payments.internal:9001 resolve\n"
            "    endpoint http://payments2.internal:9001 weight 2 resolve every 30s\n"
            "    failover http://backup.internal:9101 tier 2 resolve every 2s\n"
            "    endpoint http://127.0.0.1:9003\n"
            "    health GET /healthz\n"
            "    limit 200/s burst 50 per header X-User shared\n    timeout 2s\n}\n"
        },
        ["compile", "p.riprap"],
    ),
    "bad_resolver": (
        {"p.riprap": "resolver 127.0.0.1:53, 127.0.0.1\nservice a {\n" + EP + "}\n"},
        ["check", "p.riprap"],
    ),
    "bad_resolver_port": (
        {"p.riprap": "resolver 127.0.0.1:0\nservice a {\n" + EP + "}\n"},
        ["check", "p.riprap"],
    ),
    "bad_store": (
        {"p.riprap": "store http://127.0.0.1:6379\nservice a {\n" + EP + "}\n"},
        ["check", "p.riprap"],
    ),
    "shared_without_store": (
        {"p.riprap": "service a {\n" + EP + "    timeout 1s\n    limit 20/s shared\n}\n"},
        ["check", "p.riprap"],
    ),
    "tls_ok": (
        {
            **PEMS,
            "p.riprap": "service api {\n    endpoint https://127.0.0.1:9443\n"
            '    tls ca "certs/ca.pem" cert "certs/client.pem" key "certs/client-key.pem" sni api.internal\n'
            "    timeout 1s\n}\n",
        },
        ["compile", "p.riprap"],
    ),
    "tls_missing": (
        {"p.riprap": "service api {\n    endpoint https://127.0.0.1:9443\n    timeout 1s\n    tls ca \"certs/nope.pem\"\n}\n"},
        ["check", "p.riprap"],
    ),
    "tls_junk": (
        {**PEMS, "p.riprap": "service api {\n    endpoint https://127.0.0.1:9443\n    tls cert \"certs/junk.pem\" key \"certs/client-key.pem\"\n}\n"},
        ["check", "p.riprap"],
    ),
    "tls_half": (
        {**PEMS, "p.riprap": "service api {\n    endpoint https://127.0.0.1:9443\n    tls cert \"certs/client.pem\"\n}\n"},
        ["check", "p.riprap"],
    ),
    "tls_verify_off": (
        {"p.riprap": "service api {\n    endpoint https://127.0.0.1:9443\n    timeout 1s\n    tls verify off\n}\n"},
        ["check", "p.riprap"],
    ),
    "resolve_warnings": (
        {
            "p.riprap": "service a {\n    endpoint http://127.0.0.1:9001 resolve\n"
            "    endpoint http://pool.internal:9002 resolve every 250ms\n    timeout 1s\n}\n"
        },
        ["check", "p.riprap"],
    ),
    "exposed": (
        {"p.riprap": "listen 0.0.0.0:7400\nadmin [::]:7401\nservice a {\n" + EP + "    timeout 1s\n}\n"},
        ["check", "p.riprap"],
    ),
    "passwd": (
        {"p.riprap": "service a {\n" + EP + '    fallback status 200 file "../../etc/passwd"\n}\n'},
        ["check", "p.riprap"],
    ),
    "engine_unknown": ({"p.riprap": "service a {\n" + EP + "}\n"}, ["check", "--engine", "nginx", "p.riprap"]),
    "engine_envoy": (
        {"p.riprap": "service a {\n" + EP + "    timeout 1s\n    hedge at p95\n}\n"},
        ["check", "--engine", "envoy", "p.riprap"],
    ),
    "explain_engine": (
        {"p.riprap": "service a {\n" + EP + "    timeout 1s\n    hedge at p95\n    fallback stale 1m\n}\n"},
        ["explain", "p.riprap", "--engine", "envoy"],
    ),
    "explain": (
        {
            **PEMS,
            "p.riprap": "app shop\nstore redis://127.0.0.1:6379\nservice a {\n"
            "    endpoint https://pool.internal:9001 resolve every 10s\n"
            '    tls ca "certs/ca.pem" sni pool.internal\n    limit 20/s shared\n    timeout 1s\n}\n',
        },
        ["explain", "p.riprap"],
    ),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("round")
    return base, run_scenarios(base, SCENARIOS)


def test_s3_resolver_and_store_and_s5_resolve_compile(results) -> None:
    _, res = results
    plan = plan_of(res["resolver_store"])
    assert plan["resolver"] == ["127.0.0.1:5353", "[::1]:53"]
    assert plan["store"] == "redis://:pw@127.0.0.1:6379/2"
    svc = plan["services"]["payments"]
    assert [(e["url"], e["weight"], e["tier"], e["resolve"]) for e in svc["endpoints"]] == [
        ("http://payments.internal:9001", 1, 0, 5.0),
        ("http://payments2.internal:9001", 2, 0, 30.0),
        ("http://backup.internal:9101", 1, 2, 2.0),
        ("http://127.0.0.1:9003", 1, 0, None),
    ]
    assert svc["limit"]["shared"] is True and svc["limit"]["per_header"] == "X-User"


@pytest.mark.parametrize(
    "name, code, line, col",
    [
        ("bad_resolver", "RP101", 1, 24),
        ("bad_resolver_port", "RP217", 1, 10),
        ("bad_store", "RP232", 1, 7),
        ("shared_without_store", "RP231", 4, 16),
        ("tls_missing", "RP229", 4, 5),
        ("tls_junk", "RP229", 3, 5),
        ("tls_half", "RP230", 3, 9),
        ("passwd", "RP228", 3, 30),
    ],
)
def test_located_errors(results, name: str, code: str, line: int, col: int) -> None:
    _, res = results
    r = res[name]
    assert r.rc == 1, r.text
    assert [(d.code, d.line, d.col) for d in errors(r)] == [(code, line, col)]


def test_s4_tls_errors_name_the_file(results) -> None:
    base, res = results
    (missing,) = errors(res["tls_missing"])
    assert str(base / "tls_missing" / "certs" / "nope.pem") in missing.msg
    (junk,) = errors(res["tls_junk"])
    assert "junk.pem" in junk.msg


def test_s4_tls_compiles_to_absolute_paths_that_are_watched(results) -> None:
    base, res = results
    plan = plan_of(res["tls_ok"])
    tls = plan["services"]["api"]["tls"]
    folder = base / "tls_ok" / "certs"
    assert tls == {
        "ca": str(folder / "ca.pem"),
        "cert": str(folder / "client.pem"),
        "key": str(folder / "client-key.pem"),
        "sni": "api.internal",
        "verify": True,
    }
    assert all(os.path.isabs(p) for p in plan["watch"])
    assert {str(folder / n) for n in ("ca.pem", "client.pem", "client-key.pem")} <= set(plan["watch"])


@pytest.mark.parametrize(
    "name, expected",
    [
        ("tls_verify_off", [("RP308", 4)]),
        ("resolve_warnings", [("RP309", 2), ("RP310", 3)]),
        ("exposed", [("RP311", 1), ("RP311", 2)]),
    ],
)
def test_warnings_keep_exit_0(results, name: str, expected: list[tuple[str, int]]) -> None:
    _, res = results
    r = res[name]
    assert r.rc == 0, r.text
    assert [(d.code, d.line) for d in warnings(r) if d.code in {c for c, _ in expected}] == expected


def test_s9_exposure_warning_says_what_is_exposed(results) -> None:
    _, res = results
    admin = [d for d in warnings(res["exposed"]) if d.line == 2]
    assert admin and "authentication" in admin[0].msg


def test_explain_says_resolved_fleet_wide_and_tls(results) -> None:
    base, res = results
    r = res["explain"]
    assert r.rc == 0, r.text
    assert "resolved in DNS every 10s" in r.out
    assert "fleet-wide" in r.out and "redis://127.0.0.1:6379" in r.out
    assert str(Path(base / "explain" / "certs" / "ca.pem")) in r.out and "SNI pool.internal" in r.out


def test_s8_an_unknown_engine_is_a_usage_error_listing_the_engines(results) -> None:
    _, res = results
    r = res["engine_unknown"]
    assert r.rc == 2
    assert "python" in r.err and "envoy" in r.err


def test_s11_check_engine_envoy_names_the_statement_and_what_differs(results) -> None:
    _, res = results
    r = res["engine_envoy"]
    assert r.rc == 0, r.text
    (d,) = [d for d in warnings(r) if "envoy" in d.msg]
    assert (d.line, d.col) == (4, 5) and "hedge at" in d.msg and "service 'a'" in d.msg


def test_s11_explain_engine_envoy_sorts_statements(results) -> None:
    _, res = results
    r = res["explain_engine"]
    assert r.rc == 0, r.text
    assert "natively:" in r.out and "through an extension point: fallback stale" in r.out
    assert "approximately: hedge at" in r.out
