"""The statement table (dsl/statements.py) is the language's one vocabulary: the grammar,
the docs and the derived tables agree with it, and its defaults are the plan's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from lark import Lark

from dsl import statements as T
from dsl.plan import BreakerSpec, HealthSpec, HedgeSpec

ROOT = Path(__file__).resolve().parents[2]
# nonterminals inside a statement that are arguments, not options
ARGUMENT_RULES = {"block", "range", "json", "shard_key"}


def _grammar() -> dict[str, set[str]]:
    """form rule -> its option rules, read from dsl/grammar.lark itself."""
    lark = Lark.open(str(ROOT / "dsl" / "grammar.lark"), parser="lalr", lexer="contextual", maybe_placeholders=False)
    by_origin: dict[str, list[object]] = {}
    for rule in lark.rules:
        by_origin.setdefault(rule.origin.name, []).append(rule)

    def reach(name: str, seen: set[str]) -> set[str]:
        """Non-inline nonterminals reachable from `name` through inline (`_`) rules."""
        out: set[str] = set()
        for rule in by_origin.get(name, ()):
            for sym in rule.expansion:  # type: ignore[attr-defined]
                if sym.is_term:
                    continue
                if sym.name.startswith("_"):
                    if sym.name not in seen:
                        seen.add(sym.name)
                        out |= reach(sym.name, seen)
                else:
                    out.add(sym.name)
        return out

    statements = reach("_stmt", set()) - {"recovered"}
    forms: dict[str, set[str]] = {}
    for name in statements:
        for rule in by_origin[name]:
            form = rule.alias or name  # type: ignore[attr-defined]
            found: set[str] = set()
            for sym in rule.expansion:  # type: ignore[attr-defined]
                if sym.is_term:
                    continue
                if sym.name.startswith("_"):
                    found |= reach(sym.name, {sym.name})
                else:
                    found.add(sym.name)
            forms.setdefault(form, set()).update(found - ARGUMENT_RULES)
    return forms


def _table() -> dict[str, set[str]]:
    forms: dict[str, set[str]] = {}
    for st in T.STATEMENTS.values():
        for f in st.forms:
            forms.setdefault(f.rule, set()).update(o.rule for o in f.options if o.rule != "NAME")
    return forms


def test_grammar_and_table_have_the_same_statements() -> None:
    grammar, table = _grammar(), _table()
    assert set(grammar) - set(table) == set(), "statements in grammar.lark that the table lacks"
    assert set(table) - set(grammar) == set(), "statements in the table that grammar.lark lacks"


def test_grammar_and_table_have_the_same_options() -> None:
    """Per statement (the forms of one statement may share option rules in the grammar;
    which form takes which option is the table's, checked by dsl/checker.py, RP220)."""
    grammar, table = _grammar(), _table()
    kind_of = {f.rule: st.kind for st in T.STATEMENTS.values() for f in st.forms}
    for kind in T.STATEMENTS:
        rules = [r for r, k in kind_of.items() if k == kind]
        in_grammar = set().union(*(grammar.get(r, set()) for r in rules))
        in_table = set().union(*(table[r] for r in rules))
        assert in_grammar == in_table, kind


def test_a_grammar_statement_missing_from_the_table_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: drop one entry and it does."""
    shrunk = {k: v for k, v in T.STATEMENTS.items() if k != "store"}
    monkeypatch.setattr(T, "STATEMENTS", shrunk)
    assert set(_grammar()) - set(_table()) == {"store"}


def test_every_block_allows_what_the_table_says() -> None:
    assert T.ALLOWED["top"] == {"app", "listen", "admin", "defaults", "policy", "service", "resolver", "store"}
    assert T.ALLOWED["app"] == {"run", "restart", "health"}
    policy = {"timeout", "retry", "hedge", "breaker", "limit", "concurrency", "fallback", "chaos", "tls"}
    assert T.ALLOWED["defaults"] == T.ALLOWED["policy"] == policy
    endpoint = {"endpoint", "failover", "balance", "health", "outlier"}
    assert T.ALLOWED["shard"] == policy | endpoint
    assert T.ALLOWED["service"] == policy | endpoint | {"use", "host", "shard-by", "shard", "shard-default"}


def test_merge_rules_are_the_contracts() -> None:
    assert T.ACCUMULATING == {"fallback", "chaos"}
    assert {"timeout", "retry", "hedge", "breaker", "limit", "concurrency", "tls"} <= T.REPLACING


def test_defaults_come_from_the_plan() -> None:
    assert T.default("breaker", "open", "failures") == BreakerSpec.open
    assert T.default("breaker", "window", "failure-rate") == BreakerSpec.window
    assert T.default("hedge", "min", "at") == HedgeSpec.min_delay
    assert T.default("health", "every") == HealthSpec.interval
    assert T.default("endpoint", "resolve") == 5.0


def test_syntax_errors_and_fmt_use_the_table() -> None:
    from dsl import fmt, syntax_errors

    assert syntax_errors.DIRECTIVES == T.DIRECTIVES
    assert "tls" in T.DIRECTIVES and "shard" in T.DIRECTIVES
    assert fmt.OPTIONS is T.OPTIONS


def test_engines_are_one_tuple_and_python_is_always_native() -> None:
    assert T.ENGINES == ("python", "envoy")
    for st in T.STATEMENTS.values():
        for f in st.forms:
            assert T.realisation("python", st.kind, f.name).how == "native"
            envoy = T.realisation("envoy", st.kind, f.name)
            assert envoy.how in ("native", "extension", "approximate")
            if envoy.how == "approximate":
                assert envoy.differs, (st.kind, f.name)
            for o in f.options:
                how = T.realisation("envoy", st.kind, f.name, o.key)
                assert how.how != "approximate" or how.differs
    with pytest.raises(ValueError):
        T.realisation("nginx", "timeout")


# ---- the docs' statement reference -----------------------------------------------------------


def _sections(doc: str) -> dict[str, str]:
    parts = re.split(r"^(#{2,3} .*)$", doc, flags=re.M)
    return {parts[i].lstrip("# ").strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _option_words(syntax: str) -> str:
    """`per header NAME` -> `per header`; `budget P% [min R]` -> `budget`."""
    words = []
    for w in syntax.split():
        if not re.fullmatch(r"[a-z][a-z\-]*", w):
            break
        words.append(w)
    return " ".join(words)


def test_the_language_reference_documents_every_statement_form_and_option() -> None:
    sections = _sections((ROOT / "docs" / "language.md").read_text(encoding="utf-8"))
    for st in T.STATEMENTS.values():
        if st.blocks == {"app"}:
            text = sections["Supervising the app"]
        else:
            found = [body for head, body in sections.items() if re.search(rf"(^|[ ,`]){re.escape(st.words)}($|[ ,`])", head)]
            assert found, f"docs/language.md has no section for '{st.words}'"
            text = "\n".join(found)
        for f in st.forms:
            head = _option_words(f.syntax)
            assert head in text, (st.words, f.syntax)
            for o in f.options:
                word = _option_words(o.syntax)
                if word:
                    assert re.search(rf"\b{re.escape(word)}\b", text), (st.words, o.syntax)
