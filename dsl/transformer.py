"""Lark tree -> AST (dsl/ast.py): statements, options and literals, each with its Span.

Literals are converted to plan units here, once (`250ms` -> 0.25, `20%` -> 0.2,
`5/m` -> 1/12), with exact decimal arithmetic so that `100ms` is exactly 0.1.
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any

from lark import Token, Transformer, Tree, v_args
from lark.tree import Meta

from dsl.ast import Comment, File, Lit, Opt, Stmt
from dsl.diagnostics import Span

DURATION_UNITS = {
    "us": Decimal("0.000001"),
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
RATE_UNITS = {"s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}


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


def _decode_string(text: str) -> str | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


_CONVERT: dict[str, tuple[str, Any]] = {
    "NAME": ("name", str),
    "INT": ("int", int),
    "DURATION": ("duration", duration_seconds),
    "PERCENT": ("percent", lambda t: float(Decimal(t[:-1]) / 100)),
    "RATE": ("rate", rate_per_second),
    "STATUS_CLASS": ("status-class", str),
    "PERCENTILE": ("percentile", lambda t: float(Decimal(t[1:]) / 100)),
    "URL": ("url", str),
    "ADDRESS": ("address", str),
    "PATH": ("path", str),
    "STRING": ("string", _decode_string),
}

# rule name -> (statement kind, form)
_STMTS = {
    "listen": ("listen", None),
    "admin": ("admin", None),
    "run": ("run", None),
    "timeout": ("timeout", None),
    "retry": ("retry", None),
    "hedge_after": ("hedge", "after"),
    "hedge_at": ("hedge", "at"),
    "breaker_failures": ("breaker", "failures"),
    "breaker_rate": ("breaker", "failure-rate"),
    "limit": ("limit", None),
    "concurrency": ("concurrency", None),
    "fallback_json": ("fallback", "json"),
    "fallback_text": ("fallback", "text"),
    "fallback_file": ("fallback", "file"),
    "fallback_service": ("fallback", "service"),
    "fallback_stale": ("fallback", "stale"),
    "chaos_abort": ("chaos", "abort"),
    "chaos_delay": ("chaos", "delay"),
    "use": ("use", None),
    "host": ("host", None),
    "endpoint": ("endpoint", None),
    "failover": ("failover", None),
    "balance": ("balance", None),
    "outlier": ("outlier", None),
    "shard_by_segment": ("shard-by", "path-segment"),
    "shard_default": ("shard-default", None),
}

# option rule name -> option key as written
_OPTS = {
    "on": "on",
    "backoff": "backoff",
    "jitter": "jitter",
    "per_try": "per-try",
    "budget": "budget",
    "methods": "methods",
    "min": "min",
    "max": "max",
    "window": "window",
    "min_calls": "min",
    "open": "open",
    "probes": "probes",
    "slow": "slow",
    "burst": "burst",
    "per_header": "per-header",
    "queue": "queue",
    "queue_timeout": "queue-timeout",
    "chaos_status": "status",
    "weight": "weight",
    "tier": "tier",
    "every": "every",
    "health_timeout": "timeout",
    "fall": "fall",
    "rise": "rise",
    "expect": "expect",
    "eject": "eject",
    "max_pct": "max",
}


class _Block:
    """A `{ ... }` body and the place of its closing brace."""

    __slots__ = ("stmts", "end")

    def __init__(self, stmts: tuple[Stmt, ...], end: Span) -> None:
        self.stmts = stmts
        self.end = end


class _Json:
    __slots__ = ("value", "span")

    def __init__(self, value: Any, span: Span) -> None:
        self.value = value
        self.span = span


class ToAst(Transformer[Token, Any]):
    """Builds the AST of one file; `path` goes into every Span."""

    def __init__(self, path: str) -> None:
        super().__init__(visit_tokens=False)
        self.path = path

    # ---- helpers -------------------------------------------------------------------
    def _span(self, meta: Meta) -> Span:
        if getattr(meta, "empty", True):
            return Span(self.path, 1, 1)
        return Span(self.path, meta.line, meta.column, meta.end_line, meta.end_column)

    def lit(self, tok: Token) -> Lit:
        kind, convert = _CONVERT[tok.type]
        text = str(tok)
        span = Span(self.path, tok.line or 1, tok.column or 1, tok.end_line, tok.end_column)
        return Lit(span, kind, text, convert(text))  # type: ignore[arg-type]

    def _split(self, children: list[Any]) -> tuple[tuple[Lit, ...], tuple[Opt, ...], _Block | None]:
        args: list[Lit] = []
        opts: list[Opt] = []
        block = None
        for child in children:
            if isinstance(child, Token):
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

    def _stmt(self, kind: str, form: str | None, meta: Meta, children: list[Any]) -> Stmt:
        args, opts, block = self._split(children)
        if block is None:
            return Stmt(self._span(meta), kind, form, args, opts)
        return Stmt(self._span(meta), kind, form, args, opts, block.stmts, block.end)

    def __default__(self, data: str, children: list[Any], meta: Meta) -> Any:
        if data in _STMTS:
            kind, form = _STMTS[data]
            return self._stmt(kind, form, meta, children)
        if data in _OPTS:
            args, _, _ = self._split(children)
            return Opt(self._span(meta), _OPTS[data], args)
        return Tree(data, children, meta)

    # ---- structure -----------------------------------------------------------------
    @v_args(meta=True)
    def start(self, meta: Meta, children: list[Any]) -> tuple[Stmt, ...]:
        return tuple(c for c in children if isinstance(c, Stmt))

    @v_args(meta=True)
    def block(self, meta: Meta, children: list[Any]) -> _Block:
        end = Span(self.path, meta.end_line, max(1, meta.end_column - 1))
        return _Block(tuple(c for c in children if isinstance(c, Stmt)), end)

    @v_args(meta=True)
    def app(self, meta: Meta, children: list[Any]) -> Stmt:
        return self._stmt("app", None, meta, children)

    @v_args(meta=True)
    def defaults(self, meta: Meta, children: list[Any]) -> Stmt:
        return self._stmt("defaults", None, meta, children)

    @v_args(meta=True)
    def policy(self, meta: Meta, children: list[Any]) -> Stmt:
        return self._stmt("policy", None, meta, children)

    @v_args(meta=True)
    def service(self, meta: Meta, children: list[Any]) -> Stmt:
        return self._stmt("service", None, meta, children)

    @v_args(meta=True)
    def shard(self, meta: Meta, children: list[Any]) -> Stmt:
        return self._stmt("shard", None, meta, children)

    @v_args(meta=True)
    def recovered(self, meta: Meta, children: list[Any]) -> Stmt:
        _, _, block = self._split([c for c in children if not isinstance(c, Token)])
        span = self._span(meta)
        if block is None:
            return Stmt(span, "recovered", None, ())
        return Stmt(span, "recovered", None, (), (), block.stmts, block.end)

    @v_args(meta=True)
    def restart(self, meta: Meta, children: list[Any]) -> Stmt:
        return self._stmt("restart", None, meta, children)

    @v_args(meta=True)
    def range(self, meta: Meta, children: list[Any]) -> tuple[Lit, ...]:
        return tuple(self.lit(t) for t in children)

    @v_args(meta=True)
    def cond(self, meta: Meta, children: list[Any]) -> Lit:
        return self.lit(children[0])

    @v_args(meta=True)
    def status(self, meta: Meta, children: list[Any]) -> Lit:
        return self.lit(children[0])

    @v_args(meta=True)
    def shard_key(self, meta: Meta, children: list[Any]) -> Token:
        return children[0]  # type: ignore[no-any-return]

    @v_args(meta=True)
    def shard_by(self, meta: Meta, children: list[Any]) -> Stmt:
        key, name = children
        return Stmt(self._span(meta), "shard-by", str(key), (self.lit(name),))

    @v_args(meta=True)
    def health(self, meta: Meta, children: list[Any]) -> Stmt:
        method: Opt | None = None
        rest: list[Any] = []
        for child in children:
            if isinstance(child, Token) and child.type == "NAME":
                lit = self.lit(child)
                method = Opt(lit.span, "method", (lit,))
            else:
                rest.append(child)
        stmt = self._stmt("health", None, meta, rest)
        if method is not None:
            return Stmt(stmt.span, stmt.kind, stmt.form, stmt.args, (method,) + stmt.opts)
        return stmt

    # ---- inline JSON ---------------------------------------------------------------
    @v_args(meta=True)
    def fallback_json(self, meta: Meta, children: list[Any]) -> Stmt:
        status_tok, value = children
        text = json.dumps(value.value, separators=(",", ":"), ensure_ascii=False)
        lit = Lit(value.span, "json", text, value.value)
        return Stmt(self._span(meta), "fallback", "json", (self.lit(status_tok), lit))

    @v_args(meta=True)
    def json_object(self, meta: Meta, children: list[Any]) -> _Json:
        return _Json({k: v.value for k, v in children}, self._span(meta))

    @v_args(meta=True)
    def json_pair(self, meta: Meta, children: list[Any]) -> tuple[str, _Json]:
        key = _decode_string(str(children[0]))
        return (key if key is not None else str(children[0])[1:-1], children[1])

    @v_args(meta=True)
    def json_array(self, meta: Meta, children: list[Any]) -> _Json:
        return _Json([c.value for c in children], self._span(meta))

    @v_args(meta=True)
    def json_string(self, meta: Meta, children: list[Any]) -> _Json:
        decoded = _decode_string(str(children[0]))
        return _Json(decoded if decoded is not None else str(children[0])[1:-1], self._span(meta))

    @v_args(meta=True)
    def json_number(self, meta: Meta, children: list[Any]) -> _Json:
        text = str(children[0])
        value: Any = json.loads(text)
        return _Json(value, self._span(meta))

    @v_args(meta=True)
    def json_true(self, meta: Meta, children: list[Any]) -> _Json:
        return _Json(True, self._span(meta))

    @v_args(meta=True)
    def json_false(self, meta: Meta, children: list[Any]) -> _Json:
        return _Json(False, self._span(meta))

    @v_args(meta=True)
    def json_null(self, meta: Meta, children: list[Any]) -> _Json:
        return _Json(None, self._span(meta))


def to_ast(tree: Tree, path: str, comments: tuple[Comment, ...] = (), recovered: bool = False) -> File:
    """The AST of a parsed file."""
    stmts = ToAst(path).transform(tree)
    return File(path, stmts, comments, recovered)
