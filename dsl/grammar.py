"""The cached parser: dsl/grammar.lark built once per process, with its postlexer.

One LALR parser with a contextual lexer (`get_parser`). A small postlexer makes the
grammar newline-sensitive without pain: it collapses blank lines, drops the newlines
inside an inline JSON value (so JSON may span lines), bounds JSON nesting, and remembers
where the current statement began. Both parsing (dsl/parser.py) and the wording of syntax
errors (dsl/syntax_errors.py, which reads the grammar's keywords) use this one module,
so neither imports the other.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

from lark import Lark, Token

from dsl.transformer import ToAst

MAX_JSON_DEPTH = 64


class TooDeep(Exception):
    """Inline JSON nested deeper than MAX_JSON_DEPTH (keeps later walks shallow)."""

    def __init__(self, token: Token) -> None:
        super().__init__("JSON nested too deep")
        self.token = token


class PostLexer:
    """Newline handling for the grammar; records statement starts and open braces."""

    always_accept = ("NAME", "_NL")

    def __init__(self) -> None:
        self.stmt_start = 0
        self.new_stmt = True  # the next token starts a statement
        self.open_blocks: list[Token] = []
        self.comments: list[Token] = []
        self.json_from = -1  # inside an inline JSON value: the offset just after `json`

    def current_stmt_start(self, error_pos: int) -> int:
        """Where the statement holding an error at `error_pos` began."""
        return error_pos if self.new_stmt else min(self.stmt_start, error_pos)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        self.stmt_start = 0
        self.open_blocks = []
        self.new_stmt = True
        self.json_from = -1
        last_nl = True  # at the start of the file: drop leading newlines
        json_depth = -1  # -1: not in JSON; 0: a JSON value is expected next
        for tok in stream:
            kind = tok.type
            if kind == "_NL":
                if json_depth >= 0 or last_nl:
                    continue
                last_nl = True
                yield tok
                self.new_stmt = True  # only once the parser took the newline
                continue
            last_nl = False
            if self.new_stmt:
                self.stmt_start = tok.start_pos or 0
                self.new_stmt = False
            if json_depth >= 0:
                if kind in ("LBRACE", "LSQB"):
                    json_depth += 1
                    if json_depth > MAX_JSON_DEPTH:
                        raise TooDeep(tok)
                elif kind in ("RBRACE", "RSQB"):
                    json_depth -= 1
                if json_depth == 0 and kind not in ("COLON", "COMMA"):
                    json_depth = -1
                    self.json_from = -1
            elif kind == "JSON":
                json_depth = 0
                self.json_from = tok.end_pos or 0
            elif kind == "LBRACE":
                self.open_blocks.append(tok)
                yield tok
                self.new_stmt = True
                continue
            elif kind == "RBRACE":
                if self.open_blocks:
                    self.open_blocks.pop()
            yield tok


@dataclass
class Built:
    lark: Lark
    postlex: PostLexer
    to_ast: ToAst
    lock: threading.Lock


@lru_cache(maxsize=1)
def cached() -> Built:
    """The parser, with the AST built while it reduces (no Lark tree: about twice as fast).

    Every token is kept (`keep_all_tokens`) so that each node's span runs from its first
    token to its last; that replaces `propagate_positions`.
    """
    postlex = PostLexer()
    to_ast = ToAst()
    lark = Lark.open(
        "grammar.lark",
        rel_to=__file__,
        parser="lalr",
        lexer="contextual",
        keep_all_tokens=True,
        maybe_placeholders=False,
        postlex=postlex,
        transformer=to_ast,
        lexer_callbacks={"COMMENT": postlex.comments.append},
    )
    return Built(lark, postlex, to_ast, threading.Lock())


def get_parser() -> Lark:
    """The process-wide parser (built on first use, then cached)."""
    return cached().lark


def keyword(name: str) -> str | None:
    """The literal text of a keyword terminal (`per-try`), or None for a pattern terminal."""
    try:
        term = get_parser().get_terminal(name)
    except KeyError:
        return None
    if term.pattern.type == "str" and re.fullmatch(r"[a-z][a-z\-]*", term.pattern.value):
        return str(term.pattern.value)
    return None
