"""The syntax tree of a policy file: a few uniform, frozen node types, each with its Span.

The language is a list of statements of one shape, `KEYWORD [FORM] ARG... OPTION...
[{ STATEMENT... }]`, so one `Stmt` node serves every statement. That keeps the checker,
the compiler and the formatter table-driven: each reads `kind`, `form`, `args`, `opts`
and `body` instead of walking a zoo of classes. `Lit` keeps both the text as written
(for the formatter and for messages) and its meaning in plan units (for the compiler).

Statement kinds and their shapes (`form` in brackets, then `args`, then option keys):

    app NAME [block]                 listen ADDRESS          admin ADDRESS
    defaults block                   policy NAME block       service NAME block
    shard NAME block                 run STRING              restart range(D[, D])
    timeout D                        use NAME                host NAME...
    retry N; on COND..., backoff D[, D], jitter NAME, per-try D, budget P[, R], methods NAME...
    hedge [after|at] D|PCTL; min D, max N
    breaker [failures|failure-rate] N|P; window N, min N, open D, probes N, slow D
    limit R; burst N, per-header NAME
    concurrency N; queue N, queue-timeout D
    fallback [json|text|file] STATUS VALUE | [service] NAME | [stale] D
    chaos [abort] P; status N          chaos [delay] P D
    endpoint URL; weight N, tier N     failover URL; weight N, tier N
    balance NAME                       outlier N; eject D, max P
    health [METHOD] PATH|URL; every D, timeout D, fall N, rise N, expect STATUS...
    shard-by [header|query|cookie|path-segment] NAME|N
    shard-default NAME                 recovered [block]  (a statement lost to a syntax error)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from dsl.diagnostics import Span

LitKind = Literal[
    "name",
    "int",
    "duration",
    "percent",
    "rate",
    "status-class",
    "percentile",
    "url",
    "address",
    "path",
    "string",
    "json",
]


@dataclass(frozen=True, slots=True)
class Lit:
    """A literal as written (`text`, e.g. `250ms`) and its meaning in plan units (`value`, 0.25).

    Durations are seconds, percentages and percentiles fractions, rates per second,
    strings decoded (None when an escape is invalid), JSON the Python value.
    """

    span: Span
    kind: LitKind
    text: str
    value: Any


@dataclass(frozen=True, slots=True)
class Opt:
    """One option of a statement: `backoff 100ms..1s` is key `backoff` with two args."""

    span: Span
    key: str
    args: tuple[Lit, ...]


@dataclass(frozen=True, slots=True)
class Stmt:
    """One statement; `body` is set for block statements, `end` locates the closing brace."""

    span: Span
    kind: str
    form: str | None
    args: tuple[Lit, ...]
    opts: tuple[Opt, ...] = ()
    body: tuple["Stmt", ...] | None = None
    end: Span | None = None

    def opt(self, key: str) -> Opt | None:
        """The last option named `key` (a later option replaces an earlier one)."""
        found = None
        for o in self.opts:
            if o.key == key:
                found = o
        return found

    @property
    def name(self) -> str | None:
        """The declared name of a named block (`service payments`), else None."""
        if self.kind in ("app", "policy", "service", "shard") and self.args:
            return str(self.args[0].value)
        return None


@dataclass(frozen=True, slots=True)
class Comment:
    """A `# ...` comment, kept so that `fmt` can put it back."""

    line: int
    col: int
    text: str


@dataclass(frozen=True, slots=True)
class File:
    """A parsed policy file. `recovered` is True when syntax errors were skipped over."""

    path: str
    stmts: tuple[Stmt, ...]
    comments: tuple[Comment, ...] = ()
    recovered: bool = False
