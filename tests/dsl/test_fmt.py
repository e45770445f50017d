"""`fmt`: canonical, idempotent, comment-keeping, and never changes the compiled plan."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsl.compiler import compile_source
from dsl.fmt import format_source

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").rglob("*.riprap"))


def fmt(text: str) -> str:
    result = format_source(text, "t.riprap")
    assert result.formatted is not None, result.diagnostics
    return result.formatted


def digest(text: str, path: str = "t.riprap") -> str:
    unit = compile_source(text, path)
    assert unit.plan is not None, [(d.code, d.span, d.message) for d in unit.diagnostics]
    return unit.plan.digest()


def test_examples_format_idempotently_and_keep_their_plans() -> None:
    assert EXAMPLES
    for example in EXAMPLES:
        text = example.read_text(encoding="utf-8")
        once = fmt(text)
        assert fmt(once) == once, example
        assert digest(once, str(example)) == digest(text, str(example)), example
        assert once.count("#") == text.count("#"), f"a comment was lost in {example}"


def test_canonical_layout() -> None:
    text = (
        "# head\n\n\n"
        "service   a{\n"
        "\n"
        "  # lead\n"
        "  retry 2   budget 10% backoff 10ms..1s on 503,5xx   # tail\n"
        "  fallback status 503 json {\n"
        '     "a": [1,\n'
        "        2],   # inner\n"
        '     "b": "c"}\n'
        "  endpoint http://127.0.0.1:1\n"
        "  # before close\n"
        "}  # after close\n"
        "# end\n"
    )
    assert fmt(text) == (
        "# head\n"
        "\n"
        "service a {\n"
        "    # lead\n"
        "    retry 2 on 503, 5xx backoff 10ms..1s budget 10%  # tail\n"
        "    # inner\n"
        '    fallback status 503 json {"a": [1, 2], "b": "c"}\n'
        "    endpoint http://127.0.0.1:1\n"
        "    # before close\n"
        "}  # after close\n"
        "# end\n"
    )


def test_one_line_blocks_are_opened_up() -> None:
    text = "service a {\n    shard by header X\n    shard s { endpoint http://127.0.0.1:1 }  # one\n}\n"
    assert fmt(text) == (
        "service a {\n    shard by header X\n    shard s {  # one\n        endpoint http://127.0.0.1:1\n    }\n}\n"
    )


# ---- generated policy files -----------------------------------------------------------

durations = st.sampled_from(["10ms", "50ms", "250ms", "1s", "1.5s", "2s", "30s", "5m"])
small = st.integers(min_value=1, max_value=9).map(str)
percents = st.sampled_from(["1%", "10%", "20%", "50%", "0.5%", "100%"])
rates = st.sampled_from(["5/s", "100/s", "300/m", "2/h"])
sep = st.sampled_from([" ", "  ", "\t"])
comment = st.sampled_from(["", "", "", "  # note", " #x", "\t# a, b {c}"])


@st.composite
def policy_line(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["timeout", "retry", "hedge", "breaker", "limit", "concurrency", "fallback", "chaos", "tls"]))
    s = draw(sep)
    if kind == "timeout":
        return f"timeout{s}{draw(durations)}"
    if kind == "retry":
        parts = [f"retry {draw(small)}"]
        if draw(st.booleans()):
            conds = draw(st.lists(st.sampled_from(["connect-failure", "reset", "timeout", "503", "5xx"]), min_size=1, max_size=3))
            parts.append("on " + ", ".join(conds))
        if draw(st.booleans()):
            parts.append(draw(st.sampled_from(["backoff 10ms..1s", "backoff 100ms", "backoff 50ms..50ms"])))
            if draw(st.booleans()):
                parts.append("jitter " + draw(st.sampled_from(["full", "equal", "decorrelated", "none"])))
        if draw(st.booleans()):
            parts.append(f"per-try {draw(durations)}")
        if draw(st.booleans()):
            parts.append(f"budget {draw(percents)}" + (f" min {draw(rates)}" if draw(st.booleans()) else ""))
        if draw(st.booleans()):
            parts.append("methods POST, PATCH")
        head, rest = parts[0], parts[1:]
        rest = draw(st.permutations(rest))
        return s.join([head] + list(rest))
    if kind == "hedge":
        if draw(st.booleans()):
            return f"hedge after {draw(durations)}" + (f" max {draw(small)}" if draw(st.booleans()) else "")
        return f"hedge at p{draw(st.integers(1, 99))} min {draw(durations)}"
    if kind == "breaker":
        if draw(st.booleans()):
            return f"breaker failures {draw(small)} open {draw(durations)} probes {draw(small)}"
        return f"breaker failure-rate {draw(percents)} window 20 min {draw(small)} slow {draw(durations)}"
    if kind == "limit":
        opts = [f"burst {draw(small)}"] if draw(st.booleans()) else []
        opts += ["per header X-Tenant"] if draw(st.booleans()) else []
        opts += ["shared"] if draw(st.booleans()) else []
        return s.join([f"limit {draw(rates)}"] + list(draw(st.permutations(opts))))
    if kind == "tls":
        opts = [f"sni {draw(st.sampled_from(['api.internal', 'x']))}"] if draw(st.booleans()) else []
        opts += [f"verify {draw(st.sampled_from(['on', 'off']))}"] if draw(st.booleans()) else []
        return s.join(["tls"] + list(draw(st.permutations(opts))))
    if kind == "concurrency":
        return f"concurrency {draw(small)} queue {draw(small)} queue-timeout {draw(durations)}"
    if kind == "fallback":
        return draw(
            st.sampled_from(
                [
                    "fallback stale 5m",
                    'fallback status 503 text "sorry \\"later\\""',
                    'fallback status 200 json {"a": [1, 2.5, true, null], "b": {"c": "d"}}',
                    'fallback status 503 json {\n  "multi": "line"\n}',
                    "fallback status 503 json []",
                ]
            )
        )
    return draw(st.sampled_from(["chaos abort 5%", "chaos abort 10% status 500", "chaos delay 1% 100ms"]))


@st.composite
def policy_file(draw: st.DrawFn) -> str:
    out: list[str] = []
    if draw(st.booleans()):
        out.append("app gen" + draw(comment))
    if draw(st.booleans()):
        out.append("listen 127.0.0.1:7400")
    if draw(st.integers(0, 3)):
        out.append("store redis://127.0.0.1:6379/0" + draw(comment))
    if draw(st.booleans()):
        out.append("resolver " + draw(st.sampled_from(["127.0.0.1:53", "127.0.0.1:5353,[::1]:53", "dns.internal:53 ,  [::1]:53"])))
    n_policies = draw(st.integers(0, 2))
    if draw(st.booleans()):
        lines = draw(st.lists(policy_line(), max_size=3))
        out.append("defaults {" + "".join(f"\n  {line}{draw(comment)}" for line in lines) + "\n}")
    for i in range(n_policies):
        lines = draw(st.lists(policy_line(), min_size=1, max_size=3))
        out.append(f"policy p{i} {{" + "".join(f"\n    {line}" for line in lines) + "\n}")
    for i in range(draw(st.integers(1, 3))):
        body: list[str] = []
        if n_policies and draw(st.booleans()):
            body.append(f"use p{draw(st.integers(0, n_policies - 1))}")
        if draw(st.booleans()):
            body += [
                "shard by header X-Key",
                "shard a {\n        endpoint http://127.0.0.1:9001\n    }",
                "shard b { endpoint http://127.0.0.1:9002 weight 2 }",
            ]
        else:
            body.append(
                draw(
                    st.sampled_from(
                        [
                            f"endpoint http://127.0.0.1:{9100 + i}",
                            f"endpoint http://pool{i}.internal:9100 resolve",
                            f"endpoint http://pool{i}.internal:9100 resolve every 2s weight 2",
                        ]
                    )
                )
            )
            if draw(st.booleans()):
                body.append(draw(st.sampled_from(["failover http://127.0.0.1:9200 tier 2 weight 3", "failover http://backup.internal:9200 resolve every 10s tier 2"])))
            if draw(st.booleans()):
                body.append("health GET /healthz every 2s expect 200, 2xx")
        body += draw(st.lists(policy_line(), max_size=3))
        body = list(draw(st.permutations(body)))
        blank = draw(st.sampled_from(["", "\n"]))
        out.append(f"service s{i} {{" + draw(comment) + "".join(f"\n{blank}    {b}{draw(comment)}" for b in body) + "\n}")
    joiner = draw(st.sampled_from(["\n", "\n\n", "\n\n\n"]))
    return joiner.join(out) + draw(st.sampled_from(["\n", "", "\n\n"]))


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(policy_file())
def test_fmt_is_idempotent_and_keeps_the_plan(text: str) -> None:
    before = compile_source(text, "t.riprap")
    once = fmt(text)
    assert fmt(once) == once
    after = compile_source(once, "t.riprap")
    assert [d.code for d in after.diagnostics] == [d.code for d in before.diagnostics]
    if before.plan is not None:
        assert after.plan is not None and after.plan.digest() == before.plan.digest()
    assert once.count("#") == text.count("#")
