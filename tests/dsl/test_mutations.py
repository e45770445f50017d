"""Mutated policy files only ever give located diagnostics: no exception, no hang.

Starting from the examples, hypothesis deletes, duplicates and swaps tokens, splices in
random characters, and truncates. Whatever comes out, `compile_source` and `fmt` must
return (within a bound) with every diagnostic located inside the file.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsl.compiler import compile_source
from dsl.fmt import format_source

ROOT = Path(__file__).resolve().parents[2]
# (path, text): compiled under their own path so that fallback files resolve
SOURCES = [(str(p), p.read_text(encoding="utf-8")) for p in sorted((ROOT / "examples").rglob("*.riprap"))]
TOKEN = re.compile(r"\s+|[^\s]+")


def _tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, str]:
    path, text = draw(st.sampled_from(SOURCES))
    toks = _tokens(text)
    for _ in range(draw(st.integers(1, 4))):
        if not toks:
            break
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "truncate", "replace"]))
        i = draw(st.integers(0, len(toks) - 1))
        if op == "delete":
            del toks[i]
        elif op == "duplicate":
            toks.insert(i, toks[i])
        elif op == "swap" and i + 1 < len(toks):
            toks[i], toks[i + 1] = toks[i + 1], toks[i]
        elif op == "insert":
            toks.insert(i, draw(st.text(min_size=1, max_size=6)))
        elif op == "replace":
            toks[i] = draw(st.sampled_from(["{", "}", '"', "[", "json", "0", "-1", "1e999", "\u00e9", "\r", "\x0b", "..", "%", "/s"]))
        elif op == "truncate":
            toks = toks[:i]
    return path, "".join(toks)


def _assert_located(text: str, path: str = "m.riprap") -> None:
    start = time.monotonic()
    unit = compile_source(text, path)
    assert time.monotonic() - start < 10
    n_lines = text.count("\n") + 2
    for d in unit.diagnostics:
        assert d.span is not None, d
        assert d.span.file == path
        assert 1 <= d.span.line <= n_lines, (d, n_lines)
        assert d.span.col >= 1
        assert d.code.startswith("RP") and d.message
    if unit.plan is None:
        assert any(d.is_error for d in unit.diagnostics)
    result = format_source(text, path)
    assert (result.formatted is None) == bool(result.diagnostics)


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations_give_located_diagnostics(case: tuple[str, str]) -> None:
    path, text = case
    _assert_located(text, path)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.text(max_size=200))
def test_random_text(text: str) -> None:
    _assert_located(text)


def test_every_prefix_of_the_contract() -> None:
    text = (ROOT / "examples/contract/checkout.riprap").read_text(encoding="utf-8")
    for end in range(0, len(text), 7):
        _assert_located(text[:end])
