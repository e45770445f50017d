"""`resolver`, `store`, `limit ... shared`, `tls`, `resolve [every D]` and the exposure rules:
what they compile to, where their problems are reported, how fmt and explain say them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trustme

from dsl.compiler import compile_file
from dsl.diagnostics import Diagnostic
from dsl.explain import explain_plan
from dsl.fmt import format_source
from dsl.plan import Plan

EP = "    endpoint http://127.0.0.1:9001\n"


def _compile(tmp_path: Path, text: str) -> tuple[Plan | None, list[Diagnostic]]:
    path = tmp_path / "t.riprap"
    path.write_text(text, encoding="utf-8")
    unit = compile_file(str(path))
    return unit.plan, list(unit.diagnostics)


def _codes(diags: list[Diagnostic]) -> list[tuple[str, int]]:
    return [(d.code, d.span.line if d.span else 0) for d in diags]


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """A CA, a client certificate and its key, in tmp_path/certs."""
    ca = trustme.CA()
    folder = tmp_path / "certs"
    folder.mkdir()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    client = ca.issue_cert("client.internal")
    client.cert_chain_pems[0].write_to_path(str(folder / "client.pem"))
    client.private_key_pem.write_to_path(str(folder / "client-key.pem"))
    other = trustme.CA().issue_cert("other.internal")
    other.private_key_pem.write_to_path(str(folder / "other-key.pem"))
    return folder


# ---- resolver and store ------------------------------------------------------------------


def test_resolver_and_store_reach_the_plan(tmp_path: Path) -> None:
    plan, diags = _compile(
        tmp_path,
        "resolver 127.0.0.1:5353, [::1]:53, dns.internal:53\nstore rediss://:pw@127.0.0.1:6380/3\n"
        "service a {\n" + EP + "    timeout 1s\n}\n",
    )
    assert plan is not None, diags
    assert plan.resolver == ("127.0.0.1:5353", "[::1]:53", "dns.internal:53")
    assert plan.store == "rediss://:pw@127.0.0.1:6380/3"


def test_without_resolver_and_store_the_plan_says_so(tmp_path: Path) -> None:
    plan, _ = _compile(tmp_path, "service a {\n" + EP + "}\n")
    assert plan is not None and plan.resolver == () and plan.store is None


@pytest.mark.parametrize(
    "line, code, col",
    [
        ("resolver 127.0.0.1", "RP101", 10),
        ("resolver 127.0.0.1:53, 127.0.0.1:70000", "RP217", 24),
        ("resolver 300.1.1.1:53", "RP217", 10),
        ("store http://127.0.0.1:6379", "RP232", 7),
        ("store memcached://127.0.0.1:11211", "RP232", 7),
        ("store redis://127.0.0.1:99999", "RP232", 7),
        ("store redis://127.0.0.1:6379/zero", "RP232", 7),
        ("store redis:///0", "RP232", 7),
        ("store 127.0.0.1:6379", "RP101", 7),
    ],
)
def test_bad_resolver_and_store_are_located_errors(tmp_path: Path, line: str, code: str, col: int) -> None:
    plan, diags = _compile(tmp_path, line + "\nservice a {\n" + EP + "}\n")
    assert plan is None
    assert [(d.code, d.span.line, d.span.col) for d in diags if d.is_error and d.span] == [(code, 1, col)]


def test_a_store_password_is_never_shown(tmp_path: Path) -> None:
    _, diags = _compile(tmp_path, "store redis://:hunter2@127.0.0.1:6379/x\nservice a {\n" + EP + "}\n")
    (diag,) = [d for d in diags if d.code == "RP232"]
    assert "hunter2" not in diag.message and "***" in diag.message


def test_resolver_and_store_only_once_and_only_at_the_top(tmp_path: Path) -> None:
    _, diags = _compile(
        tmp_path,
        "store redis://127.0.0.1:6379\nstore redis://127.0.0.1:6380\n"
        "service a {\n" + EP + "    resolver 127.0.0.1:53\n}\n",
    )
    assert ("RP221", 2) in _codes(diags) and ("RP219", 5) in _codes(diags)


# ---- shared limits ------------------------------------------------------------------------


def test_shared_limit_compiles_with_a_store(tmp_path: Path) -> None:
    plan, diags = _compile(
        tmp_path,
        "store redis://127.0.0.1:6379\nservice a {\n" + EP + "    limit 20/s per header X-User shared\n}\n"
        "service b {\n" + EP + "    limit 5/s\n}\n",
    )
    assert plan is not None, diags
    a, b = plan.services["a"].limit, plan.services["b"].limit
    assert a is not None and a.shared and a.per_header == "X-User" and a.rate == 20
    assert b is not None and not b.shared


def test_shared_without_store_is_an_error_at_the_shared_word(tmp_path: Path) -> None:
    plan, diags = _compile(
        tmp_path,
        "defaults {\n    limit 20/s shared\n}\nservice a {\n" + EP + "}\n",
    )
    assert plan is None
    assert [(d.code, d.span.line, d.span.col) for d in diags if d.is_error and d.span] == [("RP231", 2, 16)]


# ---- resolve ------------------------------------------------------------------------------


def test_resolve_defaults_to_every_5s_and_is_none_without(tmp_path: Path) -> None:
    plan, diags = _compile(
        tmp_path,
        "service a {\n"
        "    endpoint http://pool.internal:9001 weight 2 resolve\n"
        "    endpoint http://pool2.internal:9001 resolve every 30s\n"
        "    endpoint http://fixed.internal:9001\n"
        "    failover http://backup.internal:9001 tier 2 resolve every 1.5s\n"
        "    health GET /healthz\n"
        "}\n",
    )
    assert plan is not None, diags
    eps = plan.services["a"].endpoints
    assert [(e.url, e.weight, e.tier, e.resolve) for e in eps] == [
        ("http://pool.internal:9001", 2, 0, 5.0),
        ("http://pool2.internal:9001", 1, 0, 30.0),
        ("http://fixed.internal:9001", 1, 0, None),
        ("http://backup.internal:9001", 1, 2, 1.5),
    ]
    assert not [d for d in diags if d.code in ("RP309", "RP310")]


def test_resolve_in_shards(tmp_path: Path) -> None:
    plan, diags = _compile(
        tmp_path,
        "service a {\n    shard by header X\n    shard s {\n        endpoint http://s.internal:1 resolve every 2s\n    }\n}\n",
    )
    assert plan is not None, diags
    assert plan.services["a"].shards[0].endpoints[0].resolve == 2.0


def test_resolve_warnings(tmp_path: Path) -> None:
    plan, diags = _compile(
        tmp_path,
        "service a {\n"
        "    endpoint http://127.0.0.1:9001 resolve\n"
        "    endpoint http://[::1]:9002 resolve every 10s\n"
        "    endpoint http://pool.internal:9003 resolve every 100ms\n"
        "}\n",
    )
    assert plan is not None  # warnings only
    assert [(d.code, d.severity, d.span.line) for d in diags if d.code in ("RP309", "RP310") and d.span] == [
        ("RP309", "warning", 2),
        ("RP309", "warning", 3),
        ("RP310", "warning", 4),
    ]


def test_resolve_every_must_be_positive(tmp_path: Path) -> None:
    _, diags = _compile(tmp_path, "service a {\n    endpoint http://p.internal:1 resolve every 0s\n}\n")
    assert ("RP222", 2) in _codes(diags)


# ---- tls ------------------------------------------------------------------------------------


def test_tls_paths_become_absolute_and_are_watched(tmp_path: Path, certs: Path) -> None:
    plan, diags = _compile(
        tmp_path,
        'defaults {\n    tls ca "certs/ca.pem"\n}\n'
        "service a {\n    endpoint https://127.0.0.1:9001\n"
        '    tls ca "certs/ca.pem" cert "certs/client.pem" key "certs/client-key.pem" sni api.internal\n'
        "    timeout 1s\n}\n"
        "service b {\n    endpoint https://127.0.0.1:9002\n    timeout 1s\n}\n"
        "service c {\n    endpoint http://127.0.0.1:9003\n    tls verify off\n    timeout 1s\n}\n",
    )
    assert plan is not None, diags
    a, b, c = (plan.services[n].tls for n in "abc")
    assert a is not None and b is not None and c is not None
    assert a.ca == str(certs / "ca.pem") and os.path.isabs(a.ca)
    assert (a.cert, a.key, a.sni, a.verify) == (str(certs / "client.pem"), str(certs / "client-key.pem"), "api.internal", True)
    assert (b.ca, b.cert, b.key, b.sni, b.verify) == (str(certs / "ca.pem"), None, None, None, True)  # from defaults
    assert (c.ca, c.verify) == (None, False)  # a later tls replaces the whole earlier one
    for name in ("ca.pem", "client.pem", "client-key.pem"):
        assert plan.watch.count(str(certs / name)) == 1
    assert [d.code for d in diags if d.code == "RP308"] == ["RP308"]


def test_shard_tls_overrides_its_service(tmp_path: Path, certs: Path) -> None:
    plan, diags = _compile(
        tmp_path,
        'service a {\n    tls sni a.internal\n    shard by header X\n    shard s {\n'
        '        endpoint https://127.0.0.1:1\n        tls ca "certs/ca.pem"\n    }\n'
        "    shard t {\n        endpoint https://127.0.0.1:2\n    }\n}\n",
    )
    assert plan is not None, diags
    s, t = plan.services["a"].shards
    assert s.tls is not None and s.tls.ca == str(certs / "ca.pem") and s.tls.sni is None
    assert t.tls is not None and t.tls.sni == "a.internal"


def test_no_tls_line_is_none(tmp_path: Path) -> None:
    plan, _ = _compile(tmp_path, "service a {\n" + EP + "}\n")
    assert plan is not None and plan.services["a"].tls is None


@pytest.mark.parametrize(
    "options, names",
    [
        ('ca "certs/missing.pem"', ["missing.pem"]),
        ('ca "certs/client-key.pem"', ["client-key.pem"]),
        ('ca "certs"', ["certs"]),
        ('cert "certs/client.pem" key "certs/other-key.pem"', ["client.pem", "other-key.pem"]),
        ('cert "certs/client-key.pem" key "certs/client.pem"', ["client-key.pem"]),
        ('cert "certs/client.pem" key "certs/nope.pem"', ["nope.pem"]),
    ],
)
def test_unusable_tls_files_are_errors_at_the_statement_naming_the_file(
    tmp_path: Path, certs: Path, options: str, names: list[str]
) -> None:
    plan, diags = _compile(tmp_path, "service a {\n" + EP + f"    tls {options}\n}}\n")
    assert plan is None
    errors = [d for d in diags if d.is_error]
    assert errors and all(d.code == "RP229" and d.span and (d.span.line, d.span.col) == (3, 5) for d in errors)
    text = " ".join(d.message for d in errors)
    for name in names:
        assert name in text


def test_tls_cert_and_key_go_together(tmp_path: Path, certs: Path) -> None:
    _, diags = _compile(tmp_path, "service a {\n" + EP + '    tls key "certs/client-key.pem"\n}\n')
    assert [(d.code, d.span.col) for d in diags if d.is_error and d.span] == [("RP230", 9)]


@pytest.mark.parametrize("path", ["../outside.pem", "/etc/ssl/certs/ca-certificates.crt", "certs/../../x.pem"])
def test_tls_paths_outside_the_folder_are_errors(tmp_path: Path, path: str) -> None:
    policy = tmp_path / "p"
    policy.mkdir()
    (tmp_path / "outside.pem").write_text("x")
    plan, diags = _compile(policy, "service a {\n" + EP + f'    tls ca "{path}"\n}}\n')
    assert plan is None
    assert [d.code for d in diags if d.is_error] == ["RP228"]


def test_tls_files_are_checked_even_when_the_file_has_other_errors(tmp_path: Path) -> None:
    _, diags = _compile(tmp_path, "service a {\n" + EP + '    tls ca "missing.pem"\n    timeout 0s\n}\n')
    assert {"RP229", "RP222"} <= {d.code for d in diags}


# ---- exposure ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, warned",
    [
        ("listen 0.0.0.0:7400", True),
        ("admin [::]:7401", True),
        ("admin 10.1.2.3:7401", True),
        ("listen sidecar.internal:7400", True),
        ("listen 127.0.0.2:7400", False),
        ("admin [::1]:7401", False),
        ("admin localhost:7401", False),
    ],
)
def test_listen_and_admin_beyond_loopback_warn(tmp_path: Path, line: str, warned: bool) -> None:
    plan, diags = _compile(tmp_path, line + "\nservice a {\n" + EP + "    timeout 1s\n}\n")
    assert plan is not None
    found = [(d.severity, d.span.line, d.span.col) for d in diags if d.code == "RP311" and d.span]
    assert found == ([("warning", 1, len(line.split()[0]) + 2)] if warned else [])


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "/proc/self/environ", "fallbacks/../../x.json"])
def test_fallback_files_outside_the_folder_are_errors(tmp_path: Path, path: str) -> None:
    policy = tmp_path / "a" / "b"
    policy.mkdir(parents=True)
    (tmp_path / "x.json").write_text("{}")
    plan, diags = _compile(policy, "service a {\n" + EP + f'    fallback status 200 file "{path}"\n}}\n')
    assert plan is None
    assert [(d.code, d.span.line, d.span.col) for d in diags if d.is_error and d.span] == [("RP228", 3, 30)]


def test_a_link_that_leads_out_of_the_folder_is_an_error(tmp_path: Path) -> None:
    policy = tmp_path / "p"
    policy.mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    (policy / "fallback.txt").symlink_to(tmp_path / "secret.txt")
    plan, diags = _compile(policy, "service a {\n" + EP + '    fallback status 200 file "fallback.txt"\n}\n')
    assert plan is None and [d.code for d in diags if d.is_error] == ["RP228"]


def test_fallback_files_inside_the_folder_still_work(tmp_path: Path) -> None:
    (tmp_path / "fallbacks").mkdir()
    (tmp_path / "fallbacks" / "x.json").write_text('{"ok": true}')
    plan, diags = _compile(tmp_path, "service a {\n" + EP + '    fallback status 200 file "./fallbacks/../fallbacks/x.json"\n}\n')
    assert plan is not None, diags
    assert plan.services["a"].fallbacks[0].body == '{"ok": true}'


# ---- fmt and explain ----------------------------------------------------------------------------


def test_fmt_prints_the_new_statements_canonically() -> None:
    text = (
        "resolver   127.0.0.1:53,[::1]:53\nstore  redis://127.0.0.1:6379\n"
        "service a {\n"
        "  endpoint http://x.internal:1 resolve   every 2s weight 3\n"
        "  failover http://y.internal:1 resolve tier 2\n"
        "  limit 1/s shared   per header X   burst 3\n"
        '  tls verify off   sni  x.internal key "k.pem" ca "ca.pem" cert "c.pem"\n'
        "  tls\n"
        "}\n"
    )
    result = format_source(text, "t.riprap")
    assert result.formatted == (
        "resolver 127.0.0.1:53, [::1]:53\nstore redis://127.0.0.1:6379\n"
        "service a {\n"
        "    endpoint http://x.internal:1 weight 3 resolve every 2s\n"
        "    failover http://y.internal:1 tier 2 resolve\n"
        "    limit 1/s burst 3 per header X shared\n"
        '    tls ca "ca.pem" cert "c.pem" key "k.pem" sni x.internal verify off\n'
        "    tls\n"
        "}\n"
    )


def test_explain_says_resolution_shared_limits_and_tls(tmp_path: Path, certs: Path) -> None:
    plan, diags = _compile(
        tmp_path,
        "app shop\nresolver 127.0.0.1:5353\nstore redis://:hunter2@127.0.0.1:6379/1\n"
        "service a {\n    endpoint https://pool.internal:9001 resolve every 10s\n"
        '    tls ca "certs/ca.pem" cert "certs/client.pem" key "certs/client-key.pem" sni api.internal\n'
        "    limit 20/s shared\n    timeout 1s\n}\n"
        "service b {\n    endpoint https://127.0.0.1:9002\n    tls verify off\n    timeout 1s\n}\n",
    )
    assert plan is not None, diags
    text = explain_plan(plan)
    assert "resolved in DNS every 10s" in text
    assert "127.0.0.1:5353" in text
    assert "fleet-wide" in text and "redis://:***@127.0.0.1:6379/1" in text and "hunter2" not in text
    assert f"trust the CA certificates in {certs / 'ca.pem'}" in text
    assert f"present the client certificate {certs / 'client.pem'}" in text and "SNI api.internal" in text
    assert "NOT verified (verify off)" in explain_plan(plan, "b")
