"""Lark tree -> AST (dsl/ast.py): statements, options and literals, each with its Span.

Literals are converted to plan units here, once (`250ms` -> 0.25, `20%` -> 0.2,
`5/m` -> 1/12), with exact decimal arithmetic so that `100ms` is exactly 0.1.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from lark import Token, Transformer, Tree

from dsl.ast import Lit, Opt, Stmt
from dsl.diagnostics import Span
from dsl.statements import OPTION_RULES, RULES

DURATION_UNITS = {
    "us": Decimal("0.000001"),
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
RATE_UNITS = {"s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}
MAX_INT_DIGITS = 30  # longer integer literals become inf (past int()'s digit limit too)


def duration_seconds(text: str) -> float:
    """`250ms` -> 0.25 (seconds)."""
    for unit in ("us", "ms", "s", "m", "h"):
        if text.endswith(unit):
            number = text[: -len(unit)]
            try:
                return float(Decimal(number) * DURATION_UNITS[unit])
            except InvalidOperation:
                continue
    raise ValueError(f"not a duration: {text!r}")


def rate_per_second(text: str) -> float:
    """`300/m` -> 5.0 (per second)."""
    number, unit = text.split("/")
    return float(Decimal(number) / RATE_UNITS[unit])


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _decode_string(text: str) -> str | None:
    """A double-quoted string with JSON escapes, decoded; None when it is not valid.

    JSON's decoder lets a lone surrogate escape (`"\\ud800"`) through; that is not a
    character and cannot be written as UTF-8 (the plan, a response body), so it is invalid
    here. A surrogate pair (`"\\ud83d\\ude00"`) decodes to one character and is fine.
    """
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, str) or _SURROGATE.search(value):
        return None
    return value


def string_problem(text: str) -> str:
    """Why `_decode_string(text)` is None, in words."""
    if _SURROGATE_ESCAPE.search(text):
        try:
            if _SURROGATE.search(json.loads(text)):
                return "lone surrogate escape in string: it is not a character and cannot be UTF-8"
        except ValueError:
            pass
    return "invalid escape in string"


def _int(text: str) -> float | int:
    """An integer literal; inf past any sane size (the checker reports it at its place)."""
    return int(text) if len(text) <= MAX_INT_DIGITS else math.inf


class RawString(str):
    """A JSON string that did not decode, kept as written (quotes included), so that
    `riprap fmt` writes it back unchanged; the checker reports it (RP109)."""


def dump_json(value: Any, item_sep: str = ",", key_sep: str = ":") -> str:
    """`json.dumps` that writes RawString as written (for a value holding an invalid string)."""
    if isinstance(value, RawString):
        return str(value)
    if isinstance(value, dict):
        items = (f"{dump_json(k, item_sep, key_sep)}{key_sep}{dump_json(v, item_sep, key_sep)}" for k, v in value.items())
        return "{" + item_sep.join(items) + "}"
    if isinstance(value, list):
        return "[" + item_sep.join(dump_json(v, item_sep, key_sep) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


class BadString:
    """A string in inline JSON that is not valid: where, and why."""

    __slots__ = ("span", "problem")

    def __init__(self, span: Span, problem: str) -> None:
        self.span = span
        self.problem = problem


class BadJson:
    """The value of an inline JSON holding invalid strings (`bad`), with those strings
    kept as written (`raw`, for the formatter)."""

    __slots__ = ("bad", "raw")

    def __init__(self, bad: tuple[BadString, ...], raw: Any) -> None:
        self.bad = bad
        self.raw = raw


_CONVERT: dict[str, tuple[str, Any]] = {
    "NAME": ("name", str),
    "INT": ("int", _int),
    "DURATION": ("duration", duration_seconds),
    "PERCENT": ("percent", lambda t: float(Decimal(t[:-1]) / 100)),
    "RATE": ("rate", rate_per_second),
    "STATUS_CLASS": ("status-class", str),
    "PERCENTILE": ("percentile", lambda t: float(Decimal(t[1:]) / 100)),
    "URL": ("url", str),
    "STORE_URL": ("url", str),
    "ADDRESS": ("address", str),
    "PATH": ("path", str),
    "STRING": ("string", _decode_string),
}

# grammar rule -> (statement kind, form), and option rule -> option key: from the table
_STMTS = RULES
_OPTS = OPTION_RULES


class _Block:
    """A `{ ... }` body and the place of its closing brace."""

    __slots__ = ("stmts", "end")

    def __init__(self, stmts: tuple[Stmt, ...], end: Span) -> None:
        self.stmts = stmts
        self.end = end


class _Json:
    __slots__ = ("value", "span", "bad")

    def __init__(self, value: Any, span: Span, bad: tuple[BadString, ...] = ()) -> None:
        self.value = value
        self.span = span
        self.bad = bad  # the invalid strings inside, in order


def _start_of(child: Any) -> tuple[int, int]:
    if isinstance(child, Token):
        return child.line or 1, child.column or 1
    if isinstance(child, tuple):
        return _start_of(child[0])
    span = child.span if not isinstance(child, _Block) else child.end
    return span.line, span.col


def _end_of(child: Any) -> tuple[int, int]:
    if isinstance(child, Token):
        return child.end_line or 1, child.end_column or 1
    if isinstance(child, tuple):
        return _end_of(child[-1])
    if isinstance(child, _Block):
        return child.end.line, child.end.col + 1
    span = child.span
    return span.end_line or span.line, span.end_col or span.col


class ToAst(Transformer[Token, Any]):
    """Builds AST nodes while the parser reduces (Lark's inline transformer mode).

    The parser keeps every token (`keep_all_tokens`), so a node's span runs from its
    first token to its last; `path` is set before each parse and goes into every Span.
    """

    def __init__(self, path: str = "<text>") -> None:
        super().__init__(visit_tokens=False)
        self.path = path
        self._values: dict[tuple[str, str], tuple[str, Any]] = {}  # (type, text) -> (kind, value)

    # ---- helpers -------------------------------------------------------------------
    def _span(self, children: list[Any]) -> Span:
        if not children:
            return Span(self.path, 1, 1)
        line, col = _start_of(children[0])
        end_line, end_col = _end_of(children[-1])
        return Span(self.path, line, col, end_line, end_col)

    def lit(self, tok: Token) -> Lit:
        text = str(tok)
        key = (tok.type, text)
        found = self._values.get(key)
        if found is None:
            kind, convert = _CONVERT[tok.type]
            found = self._values[key] = (kind, convert(text))
        span = Span(self.path, tok.line or 1, tok.column or 1, tok.end_line, tok.end_column)
        return Lit(span, found[0], text, found[1])  # type: ignore[arg-type]

    def lit_span(self, tok: Token) -> Span:
        return Span(self.path, tok.line or 1, tok.column or 1, tok.end_line, tok.end_column)

    def _split(self, children: list[Any]) -> tuple[tuple[Lit, ...], tuple[Opt, ...], _Block | None]:
        args: list[Lit] = []
        opts: list[Opt] = []
        block = None
        for child in children:
            if isinstance(child, Token):
                if child.type in _CONVERT:
                    args.append(self.lit(child))
            elif isinstance(child, Opt):
                opts.append(child)
            elif isinstance(child, _Block):
                block = child
            elif isinstance(child, Lit):
                args.append(child)
            elif isinstance(child, tuple):
                args.extend(child)
        return tuple(args), tuple(opts), block

    def _statement(self, kind: str, form: str | None, children: list[Any]) -> Stmt:
        args, opts, block = self._split(children)
        span = self._span(children)
        if block is None:
            return Stmt(span, kind, form, args, opts)
        return Stmt(span, kind, form, args, opts, block.stmts, block.end)

    def __default__(self, data: str, children: list[Any], meta: Any) -> Any:
        if data in _STMTS:
            kind, form = _STMTS[data]
            return self._statement(kind, form, children)
        if data in _OPTS:
            args, _, _ = self._split(children)
            return Opt(self._span(children), _OPTS[data], args)
        return Tree(data, children)

    # ---- structure -----------------------------------------------------------------
    def start(self, children: list[Any]) -> tuple[Stmt, ...]:
        return tuple(c for c in children if isinstance(c, Stmt))

    def block(self, children: list[Any]) -> _Block:
        close = children[-1]
        end = Span(self.path, close.line or 1, close.column or 1)
        return _Block(tuple(c for c in children if isinstance(c, Stmt)), end)

    def app(self, children: list[Any]) -> Stmt:
        return self._statement("app", None, children)

    def defaults(self, children: list[Any]) -> Stmt:
        return self._statement("defaults", None, children)

    def policy(self, children: list[Any]) -> Stmt:
        return self._statement("policy", None, children)

    def service(self, children: list[Any]) -> Stmt:
        return self._statement("service", None, children)

    def shard(self, children: list[Any]) -> Stmt:
        return self._statement("shard", None, children)

    def recovered(self, children: list[Any]) -> Stmt:
        block = next((c for c in children if isinstance(c, _Block)), None)
        span = self._span(children)
        if block is None:
            return Stmt(span, "recovered", None, ())
        return Stmt(span, "recovered", None, (), (), block.stmts, block.end)

    def restart(self, children: list[Any]) -> Stmt:
        return self._statement("restart", None, children)

    def range(self, children: list[Any]) -> tuple[Lit, ...]:
        return tuple(self.lit(t) for t in children if t.type == "DURATION")

    def cond(self, children: list[Any]) -> Lit:
        return self.lit(children[0])

    def status(self, children: list[Any]) -> Lit:
        return self.lit(children[0])

    def shard_key(self, children: list[Any]) -> Token:
        return children[0]  # type: ignore[no-any-return]

    def shard_by(self, children: list[Any]) -> Stmt:
        key, name = children[2], children[3]  # shard by KEY NAME
        return Stmt(self._span(children), "shard-by", str(key), (self.lit(name),))

    def health(self, children: list[Any]) -> Stmt:
        method: Opt | None = None
        rest: list[Any] = []
        for child in children:
            if isinstance(child, Token) and child.type == "NAME":
                lit = self.lit(child)
                method = Opt(lit.span, "method", (lit,))
            else:
                rest.append(child)
        stmt = self._statement("health", None, rest)
        if method is not None:
            return Stmt(stmt.span, stmt.kind, stmt.form, stmt.args, (method,) + stmt.opts)
        return stmt

    # ---- inline JSON ---------------------------------------------------------------
    def fallback_json(self, children: list[Any]) -> Stmt:
        status_tok = next(c for c in children if isinstance(c, Token) and c.type == "INT")
        value = children[-1]
        if value.bad:  # the checker reports them (RP109); `text` keeps them as written
            lit = Lit(value.span, "json", dump_json(value.value), BadJson(value.bad, value.value))
            return Stmt(self._span(children), "fallback", "json", (self.lit(status_tok), lit))
        text = json.dumps(value.value, separators=(",", ":"), ensure_ascii=False)
        lit = Lit(value.span, "json", text, value.value)
        return Stmt(self._span(children), "fallback", "json", (self.lit(status_tok), lit))

    def json_object(self, children: list[Any]) -> _Json:
        pairs = [c for c in children if isinstance(c, tuple)]
        bad = tuple(b for _, _, pair_bad in pairs for b in pair_bad)
        return _Json({k: v.value for k, v, _ in pairs}, self._span(children), bad)

    def json_pair(self, children: list[Any]) -> tuple[str, _Json, tuple[BadString, ...]]:
        tok = children[0]
        raw = str(tok)
        key = _decode_string(raw)
        value = children[-1]
        if key is None:
            key = RawString(raw)
            return (key, value, (BadString(self.lit_span(tok), string_problem(raw)),) + value.bad)
        return (key, value, value.bad)

    def json_array(self, children: list[Any]) -> _Json:
        items = [c for c in children if isinstance(c, _Json)]
        return _Json([c.value for c in items], self._span(children), tuple(b for i in items for b in i.bad))

    def json_string(self, children: list[Any]) -> _Json:
        raw = str(children[0])
        decoded = _decode_string(raw)
        span = self._span(children)
        if decoded is None:
            return _Json(RawString(raw), span, (BadString(span, string_problem(raw)),))
        return _Json(decoded, span)

    def json_number(self, children: list[Any]) -> _Json:
        value: Any = json.loads(str(children[0]))
        return _Json(value, self._span(children))

    def json_true(self, children: list[Any]) -> _Json:
        return _Json(True, self._span(children))

    def json_false(self, children: list[Any]) -> _Json:
        return _Json(False, self._span(children))

    def json_null(self, children: list[Any]) -> _Json:
        return _Json(None, self._span(children))


