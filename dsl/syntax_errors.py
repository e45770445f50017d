"""Lark's parse errors, said in the language's own words.

Lark reports what it expected as terminal names (`DURATION`, `__ANON_3`, `_NL`); an
operator wants "expected a duration such as 250ms, got '5x'". The expected set of an
error is mapped to phrases here, the offending word is taken from the source text (not
from whatever token the fallback lexer made of it), and a word where a statement should
start becomes "unknown directive" with a did-you-mean hint.
"""

from __future__ import annotations

import re

from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from dsl.diagnostics import Diagnostic, Span, did_you_mean
from dsl.grammar import keyword
from dsl.statements import DIRECTIVES

__all__ = ["DIRECTIVES", "describe_error", "statement_word", "word_at"]

PHRASES = {
    "DURATION": "a duration such as 250ms",
    "INT": "a whole number such as 3",
    "PERCENT": "a percentage such as 20%",
    "RATE": "a rate such as 100/s",
    "STATUS_CLASS": "a status class such as 5xx",
    "PERCENTILE": "a percentile such as p95",
    "URL": "a URL such as http://127.0.0.1:9001",
    "STORE_URL": "a store URL such as redis://127.0.0.1:6379",
    "ADDRESS": "an address such as 127.0.0.1:7400",
    "PATH": "a path such as /healthz",
    "STRING": 'a double-quoted string such as "text"',
    "NAME": "a name",
    "JSON_NUMBER": "a number",
    "_NL": "the end of the line",
    "$END": "the end of the file",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LSQB": "'['",
    "RSQB": "']'",
    "COLON": "':'",
    "COMMA": "','",
    "RECOVERED": "",
}

# When one of these is expected, the others in the same group are implied by it.
_JSON_VALUE = {"LBRACE", "LSQB", "STRING", "JSON_NUMBER", "TRUE", "FALSE", "NULL"}

_WORD = re.compile(r'"(?:[^"\\\n]|\\.)*"?|[^\s#]+')


def word_at(text: str, pos: int) -> str:
    """The word of source text starting at `pos`, for messages (at most 40 characters)."""
    m = _WORD.match(text, pos)
    word = m.group(0) if m else text[pos : pos + 1]
    return word if len(word) <= 40 else word[:37] + "..."


def statement_word(text: str, stmt_start: int) -> str | None:
    """The directive that opens the statement containing the error, if it is a known one."""
    m = re.match(r"[A-Za-z][A-Za-z0-9_.\-]*", text[stmt_start:stmt_start + 40])
    if m and m.group(0) in DIRECTIVES:
        return m.group(0)
    return None


def _expected_phrases(expected: set[str]) -> tuple[list[str], list[str]]:
    """(phrases, keywords) for an expected-terminal set, phrases in a stable order."""
    phrases: list[str] = []
    keywords: list[str] = []
    names = set(expected)
    if {"LBRACE", "LSQB", "STRING", "JSON_NUMBER"} <= names:
        phrases.append("a JSON value")
        names -= _JSON_VALUE
    for name in sorted(names):
        kw = keyword(name)
        if kw is not None:
            keywords.append(kw)
        elif name in PHRASES:
            if PHRASES[name]:
                phrases.append(PHRASES[name])
        else:
            phrases.append(name.lower())
    keywords.sort()
    end = [p for p in phrases if p.startswith("the end")]
    rest = [p for p in phrases if not p.startswith("the end")]
    return rest + [f"'{k}'" for k in keywords] + end, keywords


def _true_expected(exc: UnexpectedToken) -> set[str]:
    """The terminals the parser state accepts (Lark's own set also holds always-accepted ones)."""
    expected = set(exc.expected)
    state = getattr(exc, "state", None)
    try:
        keys = state.parse_conf.states[state.position].keys()  # type: ignore[union-attr]
        expected = {k for k in keys if k.isupper()}
    except (AttributeError, KeyError, TypeError):
        pass
    if "_NL" in expected:
        # at the end of a statement: '}' and the end of the file say nothing more
        expected -= {"RBRACE", "$END"}
    return expected


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


def describe_error(exc: UnexpectedInput, text: str, path: str, stmt_start: int = 0) -> Diagnostic:
    """One Lark error as a located diagnostic in the language's words."""
    line = getattr(exc, "line", None) or 1
    col = getattr(exc, "column", None) or 1
    if isinstance(exc, UnexpectedCharacters):
        pos = exc.pos_in_stream if exc.pos_in_stream is not None else -1
        ch = text[pos] if 0 <= pos < len(text) else ""
        if ch == '"':
            return Diagnostic(
                "RP106",
                "error",
                Span(path, line, col),
                "unterminated string",
                'close the string with a " on the same line',
            )
        shown = ch if ch.isprintable() and ch not in " \t" else f"U+{ord(ch):04X}" if ch else "?"
        return Diagnostic("RP103", "error", Span(path, line, col), f"unexpected character '{shown}'")
    assert isinstance(exc, UnexpectedToken)
    tok = exc.token
    expected = _true_expected(exc)
    if tok.type == "$END":
        line = text.count("\n") + 1
        col = len(text) - (text.rfind("\n") + 1) + 1
        got = "the end of the file"
    elif tok.type == "_NL":
        got = "the end of the line"
    else:
        pos = tok.start_pos or 0
        got = f"'{word_at(text, pos)}'"
    width = len(got) - 2 if got.startswith("'") else 0
    span = Span(path, line, col, line if width else None, col + width if width else None)
    stmt_keywords = {k for k in (keyword(n) for n in expected) if k in DIRECTIVES}
    if len(stmt_keywords) >= 5:
        # where a statement should start
        if tok.type not in ("$END", "_NL") and re.match(r"[A-Za-z]", got[1:2]):
            word = got[1:-1]
            return Diagnostic(
                "RP102",
                "error",
                span,
                f"unknown directive {got}",
                did_you_mean(word, DIRECTIVES) or "see docs/language.md for the statements",
            )
        if tok.type == "RBRACE":
            return Diagnostic(
                "RP105", "error", span, "unmatched '}'", "remove it, or open its block with '{'"
            )
        return Diagnostic(
            "RP101", "error", span, f"expected a statement such as 'timeout 2s', got {got}"
        )
    phrases, keywords = _expected_phrases(expected)
    directive = statement_word(text, stmt_start)
    where = f" in '{directive}'" if directive else ""
    message = f"expected {_join(phrases)}{where}, got {got}"
    hint = None
    if tok.type == "NAME" and keywords:
        hint = did_you_mean(str(tok), keywords)
    if hint is None and "DURATION" in expected:
        hint = "a duration is a number with its unit: us, ms, s, m or h (250ms, 1.5s, 5m)"
    if hint is None and tok.type == "_NL" and directive:
        hint = f"see '{directive}' in docs/language.md"
    return Diagnostic("RP101", "error", span, message, hint)
