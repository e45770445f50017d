"""Acceptance tests for the language and the plan: contract sections 1-7 (/work/shared/language.md).

Black-box: each file is written to a temporary directory and compiled with `riprap compile`;
assertions are on the plan JSON. Contract-stable plan fields (section 7) are `version`, `app`,
`listen`, `admin`, `services.*.timeout` and `services.*.retry.retries`; the other field names
are the shipped plan schema's (docs/plan.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract_helpers import CHECKOUT, errors, group_checks, plan_of, riprap, run_scenarios, ungroup, write

APPROX = pytest.approx


def _strs(values) -> set[str]:
    return {str(v) for v in values}


# ---------------------------------------------------------------------------------------
# Section 1: the complete example file
# ---------------------------------------------------------------------------------------


# name -> ({file: text or bytes}, [riprap arguments]); every scenario of this module is run
# once, concurrently, by the `lang` fixture (tests below add to it at import time)
LANG: dict = {"checkout": ({}, ["compile", str(CHECKOUT)])}


# `check` scenarios that only look at their own file's diagnostics share one run (see the end
# of this module); each still gets a result of its own, narrowed to its files
CHECK_GROUP: dict[str, list[str]] = {}


@pytest.fixture(scope="module")
def lang(tmp_path_factory):
    return ungroup(run_scenarios(tmp_path_factory.mktemp("lang"), LANG), CHECK_GROUP, "checks")


@pytest.fixture(scope="module")
def checkout_plan(lang) -> dict:
    if not CHECKOUT.exists():
        pytest.skip(f"{CHECKOUT} is missing")
    return plan_of(lang["checkout"])


def test_s1_checkout_compiles_to_version_1_plan(checkout_plan):
    # §1 + §7: version 1; app, listen, admin as written; services keyed by name
    p = checkout_plan
    assert p["version"] == 1
    assert p["app"] == "checkout"
    assert p["listen"] == "127.0.0.1:7400"
    assert p["admin"] == "127.0.0.1:7401"
    assert set(p["services"]) == {"payments", "inventory", "recommendations"}


def test_s1_checkout_timeouts_and_retries(checkout_plan):
    # §4 precedence: defaults (timeout 5s, retry 2), then `use critical` (2s, retry 3), then own lines
    s = checkout_plan["services"]
    assert s["payments"]["timeout"] == APPROX(2.0)
    assert s["payments"]["retry"]["retries"] == 3
    assert s["inventory"]["timeout"] == APPROX(5.0)
    assert s["inventory"]["retry"]["retries"] == 2
    assert s["recommendations"]["timeout"] == APPROX(0.3)
    assert s["recommendations"]["retry"]["retries"] == 2
    for svc in s.values():  # §7: timeout is a number (seconds), retries an integer
        assert isinstance(svc["timeout"], (int, float)) and not isinstance(svc["timeout"], bool)
        assert isinstance(svc["retry"]["retries"], int) and not isinstance(svc["retry"]["retries"], bool)


def test_s1_checkout_payments_details(checkout_plan):
    # §1/§4/§5: the payments block resolved
    pay = checkout_plan["services"]["payments"]
    eps = {e["url"]: e for e in pay["endpoints"]}
    assert eps["http://127.0.0.1:9001"]["weight"] == 1 and eps["http://127.0.0.1:9001"]["tier"] == 0
    assert eps["http://127.0.0.1:9002"]["weight"] == 2 and eps["http://127.0.0.1:9002"]["tier"] == 0
    assert eps["http://127.0.0.1:9101"]["tier"] == 1  # failover: tier 1 by default
    assert pay["balance"] == "least-request"
    r = pay["retry"]
    assert _strs(r["on"]) == {"connect-failure", "reset", "5xx"}
    assert r["per_try_timeout"] == APPROX(0.6)
    assert r["budget"]["ratio"] == APPROX(0.2)
    assert r["backoff"]["jitter"] == "full"
    assert pay["breaker"]["failures"] == 5 and pay["breaker"]["probes"] == 2
    assert pay["breaker"]["open"] == APPROX(30.0)
    assert pay["limit"]["rate"] == APPROX(200.0) and pay["limit"]["burst"] == APPROX(50.0)
    assert pay["concurrency"]["max"] == 64 and pay["concurrency"]["queue"] == 32
    (fb,) = pay["fallbacks"]
    assert fb["status"] == 503
    assert json.loads(fb["body"]) == {"error": "payments unavailable", "retry": True}


def test_s1_checkout_inventory_and_recommendations(checkout_plan):
    inv = checkout_plan["services"]["inventory"]
    assert "inventory.internal" in inv["hosts"]
    assert inv["sharding"]["by"] == "header" and inv["sharding"]["key"] == "X-Sku"
    shards = {s["name"]: s for s in inv["shards"]}
    assert set(shards) == {"a", "b"}
    assert len(shards["a"]["endpoints"]) == 2 and len(shards["b"]["endpoints"]) == 1
    assert inv["breaker"]["rate"] == APPROX(0.5) and inv["breaker"]["window"] == 20
    assert inv["breaker"]["min_calls"] == 10 and inv["breaker"]["open"] == APPROX(10.0)
    assert [f["kind"] for f in inv["fallbacks"]] == ["stale"]
    assert inv["fallbacks"][0]["max_age"] == APPROX(300.0)
    rec = checkout_plan["services"]["recommendations"]
    assert rec["hedge"]["delay"] == APPROX(0.08)
    # §4: a fallback file path is relative to the policy file; its content is the answer
    (fb,) = rec["fallbacks"]
    assert fb["status"] == 200
    expected = (CHECKOUT.parent / "fallbacks" / "recommendations.json").read_text(encoding="utf-8")
    assert json.loads(fb["body"]) == json.loads(expected)
    (ch,) = rec["chaos"]
    assert ch["kind"] == "delay" and ch["probability"] == APPROX(0.1) and ch["delay"] == APPROX(0.4)


def test_s7_plans_validate_against_the_shipped_schema(checkout_plan):
    # §7: the plan has a JSON Schema shipped in the package
    import importlib.util

    import jsonschema

    spec = importlib.util.find_spec("dsl")
    assert spec and spec.submodule_search_locations
    pkg = Path(list(spec.submodule_search_locations)[0])
    schemas = sorted(pkg.glob("*schema*.json"))
    assert schemas, "no JSON Schema shipped in the dsl package"
    schema = json.loads(schemas[0].read_text(encoding="utf-8"))
    jsonschema.validate(checkout_plan, schema)


# ---------------------------------------------------------------------------------------
# Section 2: lexical rules, one file with many services, compiled once
# ---------------------------------------------------------------------------------------

LEXICAL = r'''
# a comment on its own line
app my-app_1.x   # a trailing comment
listen [::1]:7500
admin localhost:7501

service d250ms {
    timeout 250ms
    endpoint http://127.0.0.1:9001
}
service d1.5s {
    timeout 1.5s
    endpoint http://127.0.0.1:9001
}
service d5m {
    timeout 5m
    endpoint http://127.0.0.1:9001
}
service d1.5m {
    timeout 1.5m
    endpoint http://127.0.0.1:9001
}
service d2h {
    timeout 2h
    endpoint http://127.0.0.1:9001
}
service d0.25h {
    timeout 0.25h
    endpoint http://127.0.0.1:9001
}
service d500us {
    timeout 500us
    endpoint http://127.0.0.1:9001
}
service d0.5ms {
    timeout 0.5ms
    endpoint http://127.0.0.1:9001
}
service d3s {   # a comment after an opening brace
    # an indented comment line

    timeout 3s  # after a statement
    endpoint http://127.0.0.1:9001
    # before the closing brace
}   # after the closing brace
service api.v2-x_1 {
    timeout 1s
    endpoint https://api.example.com:8443/base/path
}
service rates {
    timeout 1s
    endpoint http://127.0.0.1:9001
    limit 60/m
    retry 1 on timeout, 429, 4xx, 100, 599, 1xx budget 0.5% min 5/s
    chaos abort 0.5%
    chaos abort 100% status 500
    chaos delay 0% 20ms
}
service hourly {
    timeout 1s
    endpoint http://[::1]:9000
    limit 3600/h burst 7
}
service texts {
    timeout 1s
    endpoint http://127.0.0.1:9001
    fallback status 200 text "a \"q\" \u00e9\t\/ # not a comment\n\\"
}
service jsons {
    timeout 1s
    endpoint http://127.0.0.1:9001
    fallback status 500 json {
        "a": [1, -2.5, true, false, null],
        "b": {"c": "d\u0041 # not a comment"},
        "e": []
    }
}
service jsonstr {
    timeout 1s
    endpoint http://127.0.0.1:9001
    fallback status 418 json "just a string"
}
'''


LANG["lexical"] = ({"lexical.riprap": LEXICAL}, ["compile", "lexical.riprap"])


@pytest.fixture(scope="module")
def lexical_plan(lang) -> dict:
    return plan_of(lang["lexical"])


@pytest.mark.parametrize(
    "service, seconds",
    [
        ("d250ms", 0.25),
        ("d1.5s", 1.5),
        ("d5m", 300.0),
        ("d1.5m", 90.0),
        ("d2h", 7200.0),
        ("d0.25h", 900.0),
        ("d500us", 0.0005),
        ("d0.5ms", 0.0005),
        ("d3s", 3.0),
    ],
)
def test_s2_durations_every_unit_and_decimals(lexical_plan, service, seconds):
    # §2 durations: integer or decimal with us/ms/s/m/h; §7 timeout in seconds
    assert lexical_plan["services"][service]["timeout"] == APPROX(seconds, rel=1e-9)


def test_s2_comments_names_and_addresses(lexical_plan):
    # §2: comments to end of line; names [A-Za-z][A-Za-z0-9_.-]*; HOST:PORT with [IPv6] or a name
    p = lexical_plan
    assert p["app"] == "my-app_1.x"
    assert p["listen"] == "[::1]:7500"
    assert p["admin"] == "localhost:7501"
    assert "api.v2-x_1" in p["services"]


def test_s2_urls(lexical_plan):
    # §2: bare http:// and https:// tokens, including [IPv6] hosts and paths
    urls = {e["url"] for e in lexical_plan["services"]["api.v2-x_1"]["endpoints"]}
    assert urls == {"https://api.example.com:8443/base/path"}
    urls = {e["url"] for e in lexical_plan["services"]["hourly"]["endpoints"]}
    assert urls == {"http://[::1]:9000"}


def test_s2_percentages_become_fractions(lexical_plan):
    # §2 percentages with decimals; §4 budget P%, chaos P%
    r = lexical_plan["services"]["rates"]
    assert r["retry"]["budget"]["ratio"] == APPROX(0.005)
    assert r["retry"]["budget"]["min_per_second"] == APPROX(5.0)
    assert [c["probability"] for c in r["chaos"]] == APPROX([0.005, 1.0, 0.0])


def test_s2_rates_per_second_minute_hour(lexical_plan):
    # §2 rates N/s N/m N/h; §4 limit burst default = one second of R
    rates = lexical_plan["services"]["rates"]["limit"]
    assert rates["rate"] == APPROX(1.0)
    assert rates["burst"] == APPROX(1.0)
    hourly = lexical_plan["services"]["hourly"]["limit"]
    assert hourly["rate"] == APPROX(1.0) and hourly["burst"] == APPROX(7.0)


def test_s2_status_codes_and_classes(lexical_plan):
    # §2 status 100..599 or 1xx..5xx; §4 COND: timeout, a status or a class
    on = _strs(lexical_plan["services"]["rates"]["retry"]["on"])
    assert {"timeout", "429", "4xx", "100", "599", "1xx"} <= on


def test_s2_strings_use_json_escapes(lexical_plan):
    # §2: double-quoted strings with JSON escapes; '#' inside a string is not a comment
    (fb,) = lexical_plan["services"]["texts"]["fallbacks"]
    assert fb["status"] == 200
    assert fb["body"] == 'a "q" \u00e9\t/ # not a comment\n\\'


def test_s2_inline_json_spanning_lines(lexical_plan):
    # §2: after `json`, one JSON value inline; it may span several lines
    (fb,) = lexical_plan["services"]["jsons"]["fallbacks"]
    assert fb["status"] == 500
    assert json.loads(fb["body"]) == {
        "a": [1, -2.5, True, False, None],
        "b": {"c": "dA # not a comment"},
        "e": [],
    }
    (fb,) = lexical_plan["services"]["jsonstr"]["fallbacks"]
    assert fb["status"] == 418 and json.loads(fb["body"]) == "just a string"


LANG["crlf"] = (
    {"crlf.riprap": b"service a {\r\n\ttimeout 2s\r\n\tendpoint http://127.0.0.1:9001\r\n}\r\n"},
    ["compile", "crlf.riprap"],
)


def test_s2_crlf_and_tabs_are_whitespace(lang):
    # §2: statements end at a newline (a CRLF file is still newline-terminated)
    assert plan_of(lang["crlf"])["services"]["a"]["timeout"] == APPROX(2.0)


LANG["nl"] = (
    {
        "nl.riprap": """
        service a {
            timeout 1s endpoint http://127.0.0.1:9001
            endpoint http://127.0.0.1:9001
            retry 2
                on 503
        }
        """
    },
    ["check", "nl.riprap"],
)


def test_s2_statements_end_at_a_newline(lang):
    # §2: statements end at a newline: two on one line, or one split over two, are errors
    res = lang["nl"]
    assert res.rc == 1
    assert {2, 5} <= {d.line for d in errors(res)}, res.text


LANG["kw"] = (
    {
        "kw.riprap": """
        app service
        policy retry {
            timeout 1s
        }
        service timeout {
            use retry
            endpoint http://127.0.0.1:9001
            fallback service health
        }
        service health {
            timeout 1s
            endpoint http://127.0.0.1:9002
            host limit, json
        }
        """
    },
    ["compile", "kw.riprap"],
)


def test_s2_keyword_like_names_are_names(lang):
    # §2: any [A-Za-z][A-Za-z0-9_.-]* is a name, including words the language uses
    p = plan_of(lang["kw"])
    assert p["app"] == "service"
    assert set(p["services"]) == {"timeout", "health"}
    assert p["services"]["timeout"]["timeout"] == APPROX(1.0)
    assert {"limit", "json"} <= set(p["services"]["health"]["hosts"])


BAD_LEXEMES = {
    "status 600": "    retry 1 on 600",
    "status 99": '    fallback status 99 text "x"',
    "class 6xx": "    retry 1 on 6xx",
    "percent over 100": "    chaos abort 100.5%",
    "rate unit": "    limit 10/d",
    "duration without unit": "    timeout 5",
    "duration bad unit": "    timeout 5d",
    "bad string escape": '    fallback status 200 text "bad \\q"',
    "unterminated string": '    fallback status 200 text "open',
    "bad json": '    fallback status 200 json {"a": }',
    "non-http url": "    endpoint ftp://127.0.0.1:9001",
}


# one file per bad lexeme, checked in one `riprap check` run
BAD_NAMES = {label: f"bad{i}.riprap" for i, label in enumerate(BAD_LEXEMES)}
LANG["badlex"] = (
    {
        BAD_NAMES[label]: f"service s{i} {{\n    timeout 1s\n    endpoint http://127.0.0.1:9001\n{line}\n}}\n"
        for i, (label, line) in enumerate(BAD_LEXEMES.items())
    },
    ["check", *sorted(BAD_NAMES.values())],
)


@pytest.fixture(scope="module")
def bad_lexemes_result(lang):
    return BAD_NAMES, lang["badlex"]


@pytest.mark.parametrize("label", list(BAD_LEXEMES))
def test_s2_malformed_lexemes_are_errors_at_their_line(bad_lexemes_result, label):
    # §2 rules; §8: an error is located (1-based line 4 here) and the exit code is 1
    names, res = bad_lexemes_result
    assert res.rc == 1
    mine = [d for d in errors(res) if d.path.endswith(names[label])]
    assert mine, f"no error reported for {label!r}:\n{res.text}"
    assert any(d.line == 4 for d in mine), [(d.line, d.col, d.msg) for d in mine]


LANG["latin1"] = (
    {"latin1.riprap": b"service a {\n    timeout 1s\n    endpoint http://127.0.0.1:9001 # caf\xc3\xa9 \xff\xfe\n}\n"},
    ["check", "latin1.riprap"],
)


def test_s2_non_utf8_is_an_error_at_the_first_bad_byte(lang):
    # preamble: a file that is not UTF-8 is an error located at the first bad byte
    res = lang["latin1"]
    assert res.rc == 1
    errs = errors(res)
    assert errs, res.text
    # line 3; column 43 counting characters, 44 counting bytes (the é is two bytes)
    assert (errs[0].line, errs[0].col) in {(3, 43), (3, 44)}, (errs[0].line, errs[0].col)


LANG["fwd"] = (
    {
        "fwd.riprap": """
        service front {
            use later
            timeout 1s
            endpoint http://127.0.0.1:9001
            fallback service back
        }
        service sharded {
            timeout 1s
            shard by header X-Key
            shard default z
            shard z {
                endpoint http://127.0.0.1:9003
            }
        }
        service back {
            timeout 1s
            endpoint http://127.0.0.1:9002
        }
        policy later {
            breaker failures 4
        }
        """
    },
    ["compile", "fwd.riprap"],
)


def test_names_may_be_used_before_their_declaration(lang):
    # preamble: names may be used before the statement that declares them
    p = plan_of(lang["fwd"])
    assert p["services"]["front"]["breaker"]["failures"] == 4
    assert p["services"]["front"]["fallbacks"][0]["service"] == "back"
    assert p["services"]["sharded"]["sharding"]["default"] == "z"


# ---------------------------------------------------------------------------------------
# Section 3: top-level defaults
# ---------------------------------------------------------------------------------------


LANG["stem"] = (
    {"my-stem.riprap": "service a {\n    timeout 1s\n    endpoint http://127.0.0.1:9001\n}\n"},
    ["compile", "my-stem.riprap"],
)


def test_s3_defaults_app_is_file_stem_listen_admin(lang):
    # §3: app defaults to the file's stem; listen 127.0.0.1:7400; admin 127.0.0.1:7401
    p = plan_of(lang["stem"])
    assert p["app"] == "my-stem"
    assert p["listen"] == "127.0.0.1:7400"
    assert p["admin"] == "127.0.0.1:7401"
    assert p["supervise"] is None  # §6: no app block, no supervision


LANG["sup"] = (
    {
        "sup.riprap": """
        app checkout {
            run "python -m shop.checkout"
            health GET http://127.0.0.1:8000/healthz every 5s timeout 1s fall 3
            restart backoff 1s..30s
        }
        service a {
            timeout 1s
            endpoint http://127.0.0.1:9001
        }
        """
    },
    ["compile", "sup.riprap"],
)


def test_s6_app_block_form_compiles(lang):
    # §3/§6: `app NAME { run ... health ... restart backoff ... }`
    p = plan_of(lang["sup"])
    assert p["app"] == "checkout"
    assert set(p["services"]) == {"a"}
    sup = p["supervise"]  # §6: the block form supervises the app
    assert sup["run"] == "python -m shop.checkout"
    assert sup["restart_base"] == APPROX(1.0) and sup["restart_max"] == APPROX(30.0)
    assert sup["health"]["url"] == "http://127.0.0.1:8000/healthz" and sup["health"]["fall"] == 3


# ---------------------------------------------------------------------------------------
# Section 4: policy statements and their defaults
# ---------------------------------------------------------------------------------------

POLICIES = """
service bare {
    endpoint http://127.0.0.1:9001
}
service retry_plain {
    timeout 2s
    endpoint http://127.0.0.1:9001
    retry 2
}
service retry_exp {
    timeout 2s
    endpoint http://127.0.0.1:9001
    retry 3 on connect-failure, 500 backoff 100ms..1s per-try 300ms budget 20%
}
service retry_const {
    timeout 2s
    endpoint http://127.0.0.1:9001
    retry 1 backoff 200ms jitter none budget 10% min 2/s
}
service retry_jitters {
    timeout 2s
    endpoint http://127.0.0.1:9001
    retry 1 backoff 10ms..20ms jitter decorrelated
}
service retry_equal {
    timeout 2s
    endpoint http://127.0.0.1:9001
    retry 1 backoff 10ms..20ms jitter equal methods POST
}
service hedge_after {
    timeout 2s
    endpoint http://127.0.0.1:9001
    endpoint http://127.0.0.1:9002
    hedge after 50ms
}
service hedge_at {
    timeout 2s
    endpoint http://127.0.0.1:9001
    hedge at p95
}
service hedge_at_full {
    timeout 2s
    endpoint http://127.0.0.1:9001
    hedge at p99 min 20ms max 3
}
service breaker_n {
    timeout 2s
    endpoint http://127.0.0.1:9001
    breaker failures 5
}
service breaker_rate {
    timeout 2s
    endpoint http://127.0.0.1:9001
    breaker failure-rate 50%
}
service breaker_full {
    timeout 2s
    endpoint http://127.0.0.1:9001
    breaker failure-rate 25.5% window 50 min 5 open 10s probes 3 slow 500ms
}
service breaker_n_full {
    timeout 2s
    endpoint http://127.0.0.1:9001
    breaker failures 7 open 1m probes 4
}
service limited {
    timeout 2s
    endpoint http://127.0.0.1:9001
    limit 200/s
}
service limited_hdr {
    timeout 2s
    endpoint http://127.0.0.1:9001
    limit 10/s burst 30 per header X-Tenant
}
service conc {
    timeout 2s
    endpoint http://127.0.0.1:9001
    concurrency 64
}
service conc_full {
    timeout 2s
    endpoint http://127.0.0.1:9001
    concurrency 8 queue 4 queue-timeout 250ms
}
service fb_chain {
    timeout 2s
    endpoint http://127.0.0.1:9001
    fallback stale 5m
    fallback service bare
    fallback status 503 text "down"
    fallback status 200 file "static/answer.json"
}
service chaos_abort {
    timeout 2s
    endpoint http://127.0.0.1:9001
    chaos abort 10%
    chaos abort 5% status 502
    chaos delay 1% 2s
}
"""


LANG["policies"] = (
    {"static/answer.json": '{"from": "file"}\n', "policies.riprap": POLICIES},
    ["compile", "policies.riprap"],
)


@pytest.fixture(scope="module")
def policies_plan(lang) -> dict:
    return plan_of(lang["policies"])["services"]


def test_s4_builtin_timeout_is_15s(policies_plan):
    # §4 timeout: built-in default 15s
    assert policies_plan["bare"]["timeout"] == APPROX(15.0)


def test_s5_what_is_not_written_is_off(policies_plan):
    # §5: no retry, budget, breaker, outlier, limit, concurrency, hedge or fallback unless asked
    bare = policies_plan["bare"]
    assert bare["retry"] is None
    for key in ("breaker", "outlier", "limit", "concurrency", "hedge"):
        assert bare[key] is None, key
    assert not bare["fallbacks"]
    assert not bare["chaos"]
    assert policies_plan["retry_plain"]["retry"]["budget"] is None


def test_s4_retry_defaults(policies_plan):
    # §4 retry: N retries; default COND connect-failure, reset, 502, 503, 504
    r = policies_plan["retry_plain"]["retry"]
    assert r["retries"] == 2
    assert _strs(r["on"]) == {"connect-failure", "reset", "502", "503", "504"}


def test_s4_retry_exponential_backoff_per_try_budget(policies_plan):
    # §4: backoff A..B exponential; default jitter full; per-try; budget P% with default min 10/s
    r = policies_plan["retry_exp"]["retry"]
    assert r["retries"] == 3
    assert _strs(r["on"]) == {"connect-failure", "500"}
    assert r["backoff"]["kind"] == "exponential"
    assert r["backoff"]["base"] == APPROX(0.1) and r["backoff"]["max"] == APPROX(1.0)
    assert r["backoff"]["jitter"] == "full"
    assert r["per_try_timeout"] == APPROX(0.3)
    assert r["budget"]["ratio"] == APPROX(0.2)
    assert r["budget"]["min_per_second"] == APPROX(10.0)
    assert r["budget"]["window"] == APPROX(10.0)  # "over a 10 s window"


def test_s4_retry_constant_backoff_and_jitter_kinds(policies_plan):
    # §4: `backoff D` is constant; jitter full|equal|decorrelated|none; budget min R
    r = policies_plan["retry_const"]["retry"]
    assert r["backoff"]["kind"] == "constant" and r["backoff"]["base"] == APPROX(0.2)
    assert r["backoff"]["jitter"] == "none"
    assert r["budget"]["ratio"] == APPROX(0.1) and r["budget"]["min_per_second"] == APPROX(2.0)
    assert policies_plan["retry_jitters"]["retry"]["backoff"]["jitter"] == "decorrelated"
    assert policies_plan["retry_equal"]["retry"]["backoff"]["jitter"] == "equal"


def test_s4_retry_methods(policies_plan):
    # §4: only idempotent methods are retried unless `methods` names others
    assert set(policies_plan["retry_plain"]["retry"]["methods"]) >= {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"}
    assert "POST" not in policies_plan["retry_plain"]["retry"]["methods"]
    assert "POST" in policies_plan["retry_equal"]["retry"]["methods"]


def test_s4_hedge_defaults(policies_plan):
    # §4 hedge: max N default 1; `at pNN` min default 10ms
    h = policies_plan["hedge_after"]["hedge"]
    assert h["delay"] == APPROX(0.05) and h["max_extra"] == 1
    h = policies_plan["hedge_at"]["hedge"]
    assert h["percentile"] in (APPROX(0.95), APPROX(95))
    assert h["min_delay"] == APPROX(0.01) and h["max_extra"] == 1
    # "100ms until 20 calls were seen"
    assert h["initial_delay"] == APPROX(0.1) and h["warmup_calls"] == 20
    h = policies_plan["hedge_at_full"]["hedge"]
    assert h["percentile"] in (APPROX(0.99), APPROX(99))
    assert h["min_delay"] == APPROX(0.02) and h["max_extra"] == 3


def test_s4_breaker_defaults(policies_plan):
    # §4 breaker: failure-rate window 20, min 10; open 30s; probes 1
    b = policies_plan["breaker_n"]["breaker"]
    assert b["failures"] == 5 and b["open"] == APPROX(30.0) and b["probes"] == 1
    b = policies_plan["breaker_rate"]["breaker"]
    assert b["rate"] == APPROX(0.5)
    assert b["window"] == 20 and b["min_calls"] == 10
    assert b["open"] == APPROX(30.0) and b["probes"] == 1
    assert b["slow"] is None
    # open D doubles on each reopen up to 10 times D
    assert b["max_open"] == APPROX(300.0)


def test_s4_breaker_all_options(policies_plan):
    b = policies_plan["breaker_full"]["breaker"]
    assert b["rate"] == APPROX(0.255) and b["window"] == 50 and b["min_calls"] == 5
    assert b["open"] == APPROX(10.0) and b["probes"] == 3 and b["slow"] == APPROX(0.5)
    assert b["max_open"] == APPROX(100.0)
    b = policies_plan["breaker_n_full"]["breaker"]
    assert b["failures"] == 7 and b["open"] == APPROX(60.0) and b["probes"] == 4


def test_s4_limit_defaults(policies_plan):
    # §4 limit: burst defaults to one second of R; per header NAME
    lim = policies_plan["limited"]["limit"]
    assert lim["rate"] == APPROX(200.0) and lim["burst"] == APPROX(200.0)
    assert lim["per_header"] is None
    lim = policies_plan["limited_hdr"]["limit"]
    assert lim["rate"] == APPROX(10.0) and lim["burst"] == APPROX(30.0)
    assert lim["per_header"].lower() == "x-tenant"


def test_s4_concurrency_defaults(policies_plan):
    # §4 concurrency: queue default 0, queue-timeout default 1s
    c = policies_plan["conc"]["concurrency"]
    assert c["max"] == 64 and c["queue"] == 0 and c["queue_timeout"] == APPROX(1.0)
    c = policies_plan["conc_full"]["concurrency"]
    assert c["max"] == 8 and c["queue"] == 4 and c["queue_timeout"] == APPROX(0.25)


def test_s4_fallback_chain_in_order(policies_plan):
    # §4: several fallback lines form a chain tried in order; file relative to the policy file
    fbs = policies_plan["fb_chain"]["fallbacks"]
    assert len(fbs) == 4
    assert fbs[0]["max_age"] == APPROX(300.0)
    assert fbs[1]["service"] == "bare"
    assert fbs[2]["status"] == 503 and fbs[2]["body"] == "down"
    assert fbs[3]["status"] == 200 and json.loads(fbs[3]["body"]) == {"from": "file"}


def test_s4_chaos_default_status_503(policies_plan):
    # §4 chaos: abort default status 503; delay P% D
    ch = policies_plan["chaos_abort"]["chaos"]
    assert len(ch) == 3
    assert ch[0]["probability"] == APPROX(0.1) and ch[0]["status"] == 503
    assert ch[1]["probability"] == APPROX(0.05) and ch[1]["status"] == 502
    assert ch[2]["probability"] == APPROX(0.01) and ch[2]["delay"] == APPROX(2.0)


PRECEDENCE = """
service s {
    chaos delay 5% 10ms
    use p1
    timeout 3s
    endpoint http://127.0.0.1:9001
    fallback status 503 text "own"
    use p2
    breaker failures 9
}
defaults {
    timeout 9s
    retry 1
    fallback stale 1m
    chaos abort 1%
    concurrency 7
}
policy p1 {
    timeout 8s
    retry 4 on 500 budget 10%
    limit 10/s
    fallback stale 2m
    breaker failures 5
}
policy p2 {
    retry 5 budget 30%
    chaos abort 2% status 500
    breaker failures 6
}
service t {
    endpoint http://127.0.0.1:9001
    retry 2
}
service u {
    use p1
    endpoint http://127.0.0.1:9001
}
"""


LANG["precedence"] = ({"prec.riprap": PRECEDENCE}, ["compile", "prec.riprap"])


@pytest.fixture(scope="module")
def precedence_plan(lang) -> dict:
    return plan_of(lang["precedence"])["services"]


def test_s4_precedence_service_lines_win_over_policies_and_defaults(precedence_plan):
    # §4: defaults, then each use'd policy in order, then the service's own lines
    s = precedence_plan["s"]
    assert s["timeout"] == APPROX(3.0)  # own line, although `use p1` follows a service line
    assert s["breaker"]["failures"] == 9  # own line, although `use p2` comes before it
    assert s["retry"]["retries"] == 5  # p2 after p1
    assert s["limit"]["rate"] == APPROX(10.0)  # from p1
    assert s["concurrency"]["max"] == 7  # from defaults


def test_s4_precedence_policy_over_defaults(precedence_plan):
    u = precedence_plan["u"]
    assert u["timeout"] == APPROX(8.0)
    assert u["retry"]["retries"] == 4
    assert precedence_plan["t"]["timeout"] == APPROX(9.0)


def test_s4_later_retry_replaces_the_whole_earlier_one(precedence_plan):
    # §4: a later statement of the same directive replaces an earlier one
    t = precedence_plan["t"]["retry"]
    assert t["retries"] == 2
    assert _strs(t["on"]) == {"connect-failure", "reset", "502", "503", "504"}
    s = precedence_plan["s"]["retry"]  # p2's `retry 5 budget 30%` replaces p1's `on 500`
    assert _strs(s["on"]) == {"connect-failure", "reset", "502", "503", "504"}
    assert s["budget"]["ratio"] == APPROX(0.3)


def test_s4_fallback_and_chaos_accumulate_in_precedence_order(precedence_plan):
    # §4: fallback and chaos accumulate: defaults, then policies in order, then own lines
    s = precedence_plan["s"]
    fbs = s["fallbacks"]
    assert [f["kind"] for f in fbs][:2] == ["stale", "stale"]
    assert fbs[0]["max_age"] == APPROX(60.0) and fbs[1]["max_age"] == APPROX(120.0)
    assert fbs[2]["status"] == 503 and fbs[2]["body"] == "own"
    assert len(fbs) == 3
    ch = s["chaos"]
    assert len(ch) == 3
    assert ch[0]["kind"] == "abort" and ch[0]["probability"] == APPROX(0.01)
    assert ch[1]["kind"] == "abort" and ch[1]["probability"] == APPROX(0.02) and ch[1]["status"] == 500
    assert ch[2]["kind"] == "delay" and ch[2]["probability"] == APPROX(0.05)
    t = precedence_plan["t"]
    assert len(t["fallbacks"]) == 1 and len(t["chaos"]) == 1


LANG["ep"] = (
    {
        "ep.riprap": """
        defaults {
            endpoint http://127.0.0.1:9001
        }
        policy p {
            failover http://127.0.0.1:9002
        }
        service a {
            use p
            timeout 1s
            endpoint http://127.0.0.1:9003
        }
        """
    },
    ["check", "ep.riprap"],
)


def test_s4_endpoint_and_failover_only_in_services_and_shards(lang):
    # §4: endpoint/failover only exist in services and shards
    res = lang["ep"]
    assert res.rc == 1
    assert {d.line for d in errors(res)} >= {2, 5}


# ---------------------------------------------------------------------------------------
# Section 5: service statements
# ---------------------------------------------------------------------------------------

SERVICES = """
service eps {
    timeout 2s
    host eps.internal, eps.example.com
    endpoint http://127.0.0.1:9001
    endpoint http://127.0.0.1:9002 weight 3
    failover http://127.0.0.1:9101
    failover http://127.0.0.1:9201 weight 2 tier 2
    health /healthz
    outlier failures 5
}
service tuned {
    timeout 2s
    endpoint http://127.0.0.1:9001
    balance round-robin
    health HEAD /ping every 3s timeout 2s fall 4 rise 5 expect 200, 3xx
    outlier failures 2 eject 10s max 25%
}
service rnd {
    timeout 2s
    endpoint http://127.0.0.1:9001
    balance random
}
service by_query {
    timeout 2s
    shard by query tenant
    shard one {
        endpoint http://127.0.0.1:9001
    }
}
service by_cookie {
    timeout 2s
    shard by cookie sid
    shard one {
        endpoint http://127.0.0.1:9001
    }
}
service by_segment {
    timeout 2s
    retry 1 budget 10%
    breaker failures 3
    shard by path-segment 2
    shard default two
    shard one {
        endpoint http://127.0.0.1:9001
        failover http://127.0.0.1:9002
    }
    shard two {
        timeout 500ms
        endpoint http://127.0.0.1:9011
        balance random
        breaker failures 8
    }
}
"""


LANG["services"] = ({"svc.riprap": SERVICES}, ["compile", "svc.riprap"])


@pytest.fixture(scope="module")
def services_plan(lang) -> dict:
    return plan_of(lang["services"])["services"]


def test_s5_endpoints_weights_and_failover_tiers(services_plan):
    # §5: endpoint tier 0 default weight 1; failover tier 1 by default
    eps = {e["url"]: e for e in services_plan["eps"]["endpoints"]}
    assert (eps["http://127.0.0.1:9001"]["weight"], eps["http://127.0.0.1:9001"]["tier"]) == (1, 0)
    assert (eps["http://127.0.0.1:9002"]["weight"], eps["http://127.0.0.1:9002"]["tier"]) == (3, 0)
    assert (eps["http://127.0.0.1:9101"]["weight"], eps["http://127.0.0.1:9101"]["tier"]) == (1, 1)
    assert (eps["http://127.0.0.1:9201"]["weight"], eps["http://127.0.0.1:9201"]["tier"]) == (2, 2)


def test_s5_hosts(services_plan):
    # §5 host NAME[, NAME...]
    assert {"eps.internal", "eps.example.com"} <= set(services_plan["eps"]["hosts"])


def test_s5_balance_default_and_choices(services_plan):
    # §5 balance: default least-request
    assert services_plan["eps"]["balance"] == "least-request"
    assert services_plan["tuned"]["balance"] == "round-robin"
    assert services_plan["rnd"]["balance"] == "random"


def test_s5_health_defaults(services_plan):
    # §5 health: defaults GET, 5s, 1s, 3, 2, 2xx
    h = services_plan["eps"]["health"]
    assert h["path"] == "/healthz" and h["method"] == "GET"
    assert h["interval"] == APPROX(5.0) and h["timeout"] == APPROX(1.0)
    assert h["fall"] == 3 and h["rise"] == 2
    assert _strs(h["expect"]) == {"2xx"}


def test_s5_health_explicit(services_plan):
    h = services_plan["tuned"]["health"]
    assert h["path"] == "/ping" and h["method"] == "HEAD"
    assert h["interval"] == APPROX(3.0) and h["timeout"] == APPROX(2.0)
    assert h["fall"] == 4 and h["rise"] == 5
    assert _strs(h["expect"]) == {"200", "3xx"}


def test_s5_outlier_defaults(services_plan):
    # §5 outlier: eject default 30s, max default 50%
    o = services_plan["eps"]["outlier"]
    assert o["failures"] == 5 and o["eject"] == APPROX(30.0) and o["max_fraction"] == APPROX(0.5)
    o = services_plan["tuned"]["outlier"]
    assert o["failures"] == 2 and o["eject"] == APPROX(10.0) and o["max_fraction"] == APPROX(0.25)


def test_s5_shard_keys(services_plan):
    # §5 shard by header|query|cookie|path-segment N
    assert services_plan["by_query"]["sharding"]["by"] == "query"
    assert services_plan["by_query"]["sharding"]["key"] == "tenant"
    assert services_plan["by_cookie"]["sharding"]["by"] == "cookie"
    assert services_plan["by_cookie"]["sharding"]["key"] == "sid"
    seg = services_plan["by_segment"]["sharding"]
    assert seg["by"] == "path-segment" and str(seg["key"]) == "2"


def test_s5_shard_default(services_plan):
    # §5: shard default NAME; without it there is none (requests without a key get 400)
    assert services_plan["by_segment"]["sharding"]["default"] == "two"
    assert services_plan["by_query"]["sharding"]["default"] is None


def test_s5_shard_overrides_and_inherits(services_plan):
    # §5: a shard's policy statements override the service's for that shard
    shards = {s["name"]: s for s in services_plan["by_segment"]["shards"]}
    one, two = shards["one"], shards["two"]
    assert one["timeout"] == APPROX(2.0) and two["timeout"] == APPROX(0.5)
    assert one["breaker"]["failures"] == 3 and two["breaker"]["failures"] == 8
    assert one["retry"]["retries"] == 1 and two["retry"]["retries"] == 1
    assert two["balance"] == "random"
    tiers = sorted((e["url"], e["tier"]) for e in one["endpoints"])
    assert tiers == [("http://127.0.0.1:9001", 0), ("http://127.0.0.1:9002", 1)]


LANG["neither"] = ({"neither.riprap": "service a {\n    timeout 1s\n}\n"}, ["check", "neither.riprap"])
LANG["both"] = (
    {
        "both.riprap": "service a {\n    timeout 1s\n    endpoint http://127.0.0.1:9001\n    shard by header K\n"
        "    shard a {\n        endpoint http://127.0.0.1:9002\n    }\n}\n"
    },
    ["check", "both.riprap"],
)


@pytest.mark.parametrize("case", ["neither", "both"])
def test_s5_endpoints_or_shards_never_both_at_least_one(lang, case):
    # §5: a service has endpoints or shards, never both, and at least one of them
    res = lang[case]
    assert res.rc == 1
    assert errors(res), res.text


# ---------------------------------------------------------------------------------------
# Robustness: any input ends in diagnostics and exit 0/1, never an internal error (§8 exit
# codes: 2 is for usage and I/O errors only; `compile` has the same exit codes as `check`)
# ---------------------------------------------------------------------------------------


def _one_service(line: str) -> dict[str, str]:
    return {"edge.riprap": f"service a {{\n    timeout 1s\n    endpoint http://127.0.0.1:9001\n    {line}\n}}\n"}


LANG["big_retry"] = (_one_service("retry 1100 backoff 10ms..1s budget 20%"), ["check", "edge.riprap"])
LANG["big_timeout"] = (
    {"big.riprap": f"service a {{\n    timeout {'9' * 400}h\n    endpoint http://127.0.0.1:9001\n}}\n"},
    ["check", "big.riprap"],
)
LANG["surrogate_check"] = (_one_service('fallback status 503 text "\\ud800 lone"'), ["check", "edge.riprap"])
LANG["surrogate_compile"] = (_one_service('fallback status 503 text "\\ud800 lone"'), ["compile", "edge.riprap"])


def test_large_retry_count_with_backoff_is_not_an_internal_error(lang):
    # also `retry 700 backoff 10ms..1s jitter decorrelated`
    checked = lang["big_retry"]
    assert "internal error" not in checked.text, checked.text
    assert checked.rc in (0, 1), checked.text


def test_huge_retry_count_is_checked_quickly(tmp_path):
    import subprocess

    write(tmp_path, "edge.riprap", _one_service("retry 1000000000000 budget 20%")["edge.riprap"])
    try:
        res = riprap("check", "edge.riprap", cwd=tmp_path, timeout=1.5)
    except subprocess.TimeoutExpired:
        pytest.fail("riprap check did not finish within 1.5 s")
    assert res.rc in (0, 1)


def test_overflowing_duration_is_an_error_at_its_line(lang):
    res = lang["big_timeout"]
    assert res.rc == 1
    errs = errors(res)
    assert errs and all(d.line == 2 for d in errs), res.text
    assert "internal error" not in res.text


def test_lone_surrogate_escape_check_and_compile_agree(lang):
    # §2 strings use JSON escapes; §8 compile has the exit codes of check
    # (the same happens with `fallback status 503 json {"k": "\\udfff"}`)
    checked = lang["surrogate_check"]
    compiled = lang["surrogate_compile"]
    assert "internal error" not in compiled.text, compiled.text
    assert compiled.rc == checked.rc
    if compiled.rc == 0:
        json.loads(compiled.out)


# the grouped `check` run (see CHECK_GROUP): these files share no names, so checking them
# together adds no mesh findings
CHECK_GROUP.update(group_checks(LANG, ["nl", "badlex", "latin1", "ep", "neither", "both"], "checks"))
