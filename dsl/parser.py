"""Text -> AST (dsl/ast.py), reporting every syntax error in the file, not just the first.

The parser is dsl/grammar.py's, built once per process (`get_parser`).

Error recovery is by re-parsing: on a syntax error the statement that holds it is
replaced by a placeholder (`RECOVERED`, keeping its braces so the block structure
survives) with line and column of everything else unchanged, and the file is parsed
again. Each round finds the next error; rounds stop at `MAX_ERRORS` or `RECOVERY_SECONDS`.
The placeholder parses as a `recovered` statement that the checker knows to skip.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import cast

from lark.exceptions import UnexpectedEOF, UnexpectedInput, UnexpectedToken

from dsl.ast import Comment, File, Stmt
from dsl.diagnostics import Diagnostic, Span
from dsl.grammar import MAX_JSON_DEPTH, Built, PostLexer, TooDeep, cached, get_parser
from dsl.syntax_errors import describe_error

__all__ = ["MAX_ERRORS", "ParseResult", "get_parser", "parse_text"]

SENTINEL = "\ue000"
MAX_ERRORS = 50
RECOVERY_SECONDS = 2.0


@dataclass(frozen=True)
class ParseResult:
    file: File | None  # None when recovery gave up
    diagnostics: tuple[Diagnostic, ...]


def parse_text(text: str, path: str) -> ParseResult:
    """Parse `text`; on syntax errors, recover and keep going (see the module docstring).

    Thread-safe: the one parser is shared, so parses take turns.
    """
    built = cached()
    with built.lock:
        built.to_ast.path = path
        return _parse_locked(built, text, path)


def _parse_locked(built: Built, text: str, path: str) -> ParseResult:
    diags: list[Diagnostic] = []
    work = text
    if SENTINEL in work:
        for i, ch in enumerate(work):
            if ch == SENTINEL:
                line = work.count("\n", 0, i) + 1
                col = i - (work.rfind("\n", 0, i) + 1) + 1
                diags.append(
                    Diagnostic("RP103", "error", Span(path, line, col), "unexpected character U+E000")
                )
        work = work.replace(SENTINEL, " ")
    deadline = time.monotonic() + RECOVERY_SECONDS
    last_pos = -1
    while True:
        built.postlex.comments.clear()
        started = time.monotonic()
        try:
            # the transformer builds the AST while the parser reduces: `start` returns the statements
            stmts = cast("tuple[Stmt, ...]", built.lark.parse(work))
        except TooDeep as exc:
            tok = exc.token
            diags.append(
                Diagnostic(
                    "RP107",
                    "error",
                    Span(path, tok.line or 1, tok.column or 1),
                    f"inline JSON nested more than {MAX_JSON_DEPTH} deep",
                    "flatten the value, or serve it from a file with `fallback status CODE file \"PATH\"`",
                )
            )
            pos = tok.start_pos or 0
            work = _blank(work, built.postlex.current_stmt_start(pos), pos, built.postlex.json_from)
        except UnexpectedInput as exc:
            diag, pos = _diagnose(exc, work, path, built.postlex)
            diags.append(diag)
            if isinstance(exc, UnexpectedEOF) or (
                isinstance(exc, UnexpectedToken) and exc.token.type == "$END"
            ):
                if built.postlex.open_blocks:
                    work = work + "\n}"
                    last_pos = -1
                else:
                    break
            else:
                if pos <= last_pos:
                    # the text before the last error parsed, so an error there again comes
                    # from the placeholder, not from the file: not a problem of its own
                    diags.pop()
                    break
                last_pos = pos
                work = _blank(work, built.postlex.current_stmt_start(pos), pos, built.postlex.json_from)
        else:
            comments = tuple(
                Comment(c.line or 1, c.column or 1, str(c)) for c in built.postlex.comments
            )
            return ParseResult(File(path, stmts, comments, bool(diags)), tuple(diags))
        now = time.monotonic()
        if len(diags) >= MAX_ERRORS or now + (now - started) > deadline:
            # another round would end past the deadline (each round re-parses the file)
            diags.append(
                Diagnostic(
                    "RP108",
                    "error",
                    diags[-1].span,
                    f"stopped looking for syntax errors after {len(diags)}",
                    "fix the errors above and check again",
                )
            )
            break
    return ParseResult(None, tuple(diags))


def _diagnose(exc: UnexpectedInput, text: str, path: str, postlex: PostLexer) -> tuple[Diagnostic, int]:
    """The diagnostic for one Lark error, and the offset it points at."""
    if isinstance(exc, UnexpectedToken) and exc.token.type == "$END" and postlex.open_blocks:
        opener = postlex.open_blocks[-1]
        line = text.count("\n") + 1
        col = len(text) - (text.rfind("\n") + 1) + 1
        diag = Diagnostic(
            "RP104",
            "error",
            Span(path, opener.line or line, opener.column or col),
            "this block is never closed: missing '}'",
            "add a '}' on a line of its own after the block's last statement",
        )
        return diag, len(text)
    pos = _offset(exc, text)
    return describe_error(exc, text, path, postlex.current_stmt_start(pos)), pos


def _offset(exc: UnexpectedInput, text: str) -> int:
    pos: int | None = None
    if isinstance(exc, UnexpectedToken):
        pos = exc.token.start_pos
        if pos is not None:
            return pos
    pos = getattr(exc, "pos_in_stream", None)
    return pos if isinstance(pos, int) else len(text)


def _blank(text: str, start: int, error_pos: int, json_from: int = -1) -> str:
    """Replace the statement from `start` to the end of the error's line by the placeholder.

    Newlines are kept (line numbers stay right); a net opening or closing brace is kept so
    that the block structure around the statement survives. When the error is inside an
    inline JSON value (`json_from` >= 0: the offset after the word `json`), the whole value
    goes, up to the end of the line where it closes, and its brackets are not block braces.
    """
    start = min(start, error_pos)
    end = text.find("\n", error_pos)
    if end == -1:
        end = len(text)
    json_close, stray = _json_scan(text, json_from) if 0 <= json_from <= error_pos else (-1, [])
    if json_close > end:
        end = text.find("\n", json_close)
        if end == -1:
            end = len(text)
    region = text[start:end]
    if not region.strip():
        # the error is at a newline of its own: blank just the character there
        end = min(len(text), error_pos + 1)
        region = text[start:end]
    if 0 <= json_from <= error_pos and start <= json_from <= end:
        # brackets of the JSON value are not blocks: count only around it (and the `}`
        # after a value that never closes)
        net = _net_braces(text[start:json_from])
        if json_close != -1:
            net += _net_braces(text[json_close:end])
        else:
            net -= sum(1 for i in stray if i < end)
    else:
        net = _net_braces(region)
    chars = ["\n" if ch == "\n" else " " for ch in region]
    if chars:
        chars[0] = SENTINEL
        if net != 0:
            last = max(i for i, ch in enumerate(chars) if ch != "\n")
            if last == 0:
                pass  # a stray brace alone: drop it
            elif net > 0:
                chars[last] = "{" if net == 1 else " "
            else:
                chars[last] = "}" if net == -1 else " "
    return text[:start] + "".join(chars) + text[end:]


def _json_scan(text: str, start: int) -> tuple[int, list[int]]:
    """Scan the inline JSON value that begins at or after `start` (whitespace and comments
    skipped): the offset just after it, or -1 when it is not a bracketed value that closes,
    and the offsets of the `}` that close no bracket of the value (block braces).

    A closer that matches a bracket further down closes the ones above it too (a missing
    `]` before the `}` does not swallow the rest of the file); one that matches none is
    not part of the value.
    """
    i = start
    n = len(text)
    while i < n and text[i] in " \t\r\n":
        i += 1
    stray: list[int] = []
    if i >= n or text[i] not in "{[":
        return -1, stray
    stack: list[str] = []
    in_str = False
    esc = False
    while i < n:
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"' or ch == "\n":
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "#":
            nl = text.find("\n", i)
            if nl == -1:
                break
            i = nl
            continue
        elif ch in "{[":
            stack.append(ch)
        elif ch in "}]":
            opener = "{" if ch == "}" else "["
            if opener in stack:
                while stack.pop() != opener:
                    pass
                if not stack:
                    return i + 1, stray
            elif ch == "}":
                stray.append(i)
        i += 1
    return -1, stray


def _net_braces(region: str) -> int:
    """Opening minus closing braces outside strings and comments."""
    net = 0
    in_str = False
    esc = False
    comment = False
    for ch in region:
        if comment:
            if ch == "\n":
                comment = False
            continue
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"' or ch == "\n":
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch == "#":
            comment = True
        elif ch == "{":
            net += 1
        elif ch == "}":
            net -= 1
    return net
