"""The canonical printer: AST -> text, keeping every comment.

Canonical form: one statement per line, blocks opened on the header line and closed
on a line of their own, 4 spaces per level, options in the documented order, single
spaces between words, inline JSON on one line, at most one blank line in a row (kept
where the author put one, dropped at the start of a block), a trailing comment two
spaces after its statement. Literals keep the author's spelling (`300s` stays `300s`),
so formatting never changes the compiled plan; `tests/dsl` checks that, and that
formatting twice changes nothing.

Comments are placed by line: a comment on a statement's last line stays on it, a
comment on a block's header or closing line stays there, any other comment is printed
on its own line before the statement that follows it (a comment inside a multi-line
JSON value moves just before its `fallback` line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dsl.ast import Comment, File, Lit, Opt, Stmt
from dsl.diagnostics import Diagnostic
from dsl.parser import parse_text
from dsl.sources import check_text, read_source
from dsl.statements import OPTIONS
from dsl.transformer import BadJson, dump_json

INDENT = "    "

_LIST_OPTIONS = ("on", "methods", "expect")


def _lit(lit: Lit) -> str:
    if lit.kind == "json":
        if isinstance(lit.value, BadJson):  # an invalid string inside: keep it as written
            return dump_json(lit.value.raw, ", ", ": ")
        return json.dumps(lit.value, separators=(", ", ": "), ensure_ascii=False)
    return lit.text


def _range(lits: tuple[Lit, ...]) -> str:
    return "..".join(lit.text for lit in lits)


def _opt(opt: Opt) -> str:
    if opt.key in _LIST_OPTIONS:
        return f"{opt.key} " + ", ".join(_lit(a) for a in opt.args)
    if opt.key == "backoff":
        return f"backoff {_range(opt.args)}"
    if opt.key == "budget":
        text = f"budget {opt.args[0].text}"
        return text + (f" min {opt.args[1].text}" if len(opt.args) > 1 else "")
    if opt.key == "per-header":
        return f"per header {opt.args[0].text}"
    if opt.key == "resolve":
        return "resolve" + (f" every {opt.args[0].text}" if opt.args else "")
    if not opt.args:
        return opt.key
    return f"{opt.key} " + " ".join(_lit(a) for a in opt.args)


def statement_text(stmt: Stmt) -> str:
    """One statement's canonical line (without its block body)."""
    k = stmt.kind
    args = stmt.args
    if k == "shard-by":
        head = f"shard by {stmt.form} {args[0].text}"
    elif k == "shard-default":
        head = f"shard default {args[0].text}"
    elif k == "restart":
        head = f"restart backoff {_range(args)}"
    elif k == "fallback":
        if stmt.form in ("json", "text", "file"):
            head = f"fallback status {args[0].text} {stmt.form} {_lit(args[1])}"
        else:
            head = f"fallback {stmt.form} {args[0].text}"
    elif k in ("hedge", "breaker", "chaos"):
        head = f"{k} {stmt.form} " + " ".join(_lit(a) for a in args)
    elif k == "outlier":
        head = f"outlier failures {args[0].text}"
    elif k in ("host", "resolver"):
        head = f"{k} " + ", ".join(a.text for a in args)
    elif k == "health":
        method = stmt.opt("method")
        head = "health " + (f"{method.args[0].text} " if method else "") + args[0].text
    elif k == "defaults":
        head = "defaults"
    else:
        head = " ".join([k] + [_lit(a) for a in args])
    order = OPTIONS.get((k, stmt.form), ())
    opts = sorted(
        (o for o in stmt.opts if o.key != "method"),
        key=lambda o: order.index(o.key) if o.key in order else len(order),
    )
    parts = [head] + [_opt(o) for o in opts]
    if stmt.body is not None:
        parts.append("{")
    return " ".join(parts)


class _Printer:
    def __init__(self, file: File, text: str) -> None:
        self.src = text.splitlines()
        self.comments: list[Comment] = sorted(file.comments, key=lambda c: (c.line, c.col))
        self.next = 0
        self.out: list[str] = []
        self.fresh = True  # nothing printed yet in the current block

    def _blank_before(self, line: int) -> bool:
        return line >= 2 and line - 2 < len(self.src) and not self.src[line - 2].strip()

    def _space(self, line: int) -> None:
        if not self.fresh and self._blank_before(line) and self.out and self.out[-1] != "":
            self.out.append("")

    def leading(self, before: int, depth: int) -> None:
        """Comments on lines before `before`, each on a line of its own."""
        while self.next < len(self.comments) and self.comments[self.next].line < before:
            c = self.comments[self.next]
            self._space(c.line)
            self.out.append(INDENT * depth + c.text.rstrip())
            self.fresh = False
            self.next += 1

    def trailing(self, line: int) -> str:
        """The comment on `line`, if any, as a suffix."""
        parts = []
        while self.next < len(self.comments) and self.comments[self.next].line == line:
            parts.append(self.comments[self.next].text.rstrip())
            self.next += 1
        return ("  " + " ".join(parts)) if parts else ""

    def stmt(self, s: Stmt, depth: int) -> None:
        self.leading(s.span.line, depth)
        self._space(s.span.line)
        if s.body is None:
            last = s.span.end_line or s.span.line
            self.leading(last, depth)  # comments inside a multi-line statement
            self.out.append(INDENT * depth + statement_text(s) + self.trailing(last))
            self.fresh = False
            return
        self.out.append(INDENT * depth + statement_text(s) + self.trailing(s.span.line))
        self.fresh = True
        for child in s.body:
            self.stmt(child, depth + 1)
        end = s.end.line if s.end else (s.span.end_line or s.span.line)
        self.leading(end, depth + 1)
        self.out.append(INDENT * depth + "}" + self.trailing(end))
        self.fresh = False

    def file(self, f: File) -> str:
        for s in f.stmts:
            self.stmt(s, 0)
        self.leading(1 << 30, 0)
        return "\n".join(self.out) + "\n" if self.out else ""


def format_ast(file: File, text: str) -> str:
    """The canonical text of a parsed file (`text` is its source, for blank lines)."""
    return _Printer(file, text).file(file)


@dataclass(frozen=True)
class FormatResult:
    original: str | None
    formatted: str | None
    diagnostics: tuple[Diagnostic, ...]


def format_source(text: str, path: str) -> FormatResult:
    """Format policy text; a file with syntax errors is left alone (its errors returned)."""
    early = check_text(text, path)
    if early:
        return FormatResult(text, None, tuple(early))
    parsed = parse_text(text, path)
    if parsed.file is None or parsed.diagnostics:
        return FormatResult(text, None, parsed.diagnostics)
    file = parsed.file
    return FormatResult(text, format_ast(file, text), ())


def format_file(path: str) -> FormatResult:
    """Read and format one file (reading problems become diagnostics)."""
    text, diags = read_source(path)
    if text is None:
        return FormatResult(None, None, tuple(diags))
    return format_source(text, path)
