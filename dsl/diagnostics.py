"""Located diagnostics and their renderers.

A diagnostic reads like a compiler's (mypy, ruff, rustc):

    PATH:LINE:COL: error[RP101]: unknown policy 'critcal'
       12 |     use critcal
          |         ^
      = hint: did you mean 'critical'?

Lines and columns are 1-based. Codes are stable and documented in docs/diagnostics.md.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Sequence

Severity = Literal["error", "warning"]

# `scheme://[user]:PASSWORD@host`: a source line shown under a diagnostic (in `check`'s output,
# and in the sidecar's log when a reload fails) never shows a URL's password; it is masked
# with as many `*`, so the caret below still points where it did.
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:@/]*:)([^\s@/]+)(@)", re.I)


def mask_passwords(line: str) -> str:
    return _URL_PASSWORD.sub(lambda m: m.group(1) + "*" * len(m.group(2)) + m.group(3), line)


@dataclass(frozen=True, order=True)
class Span:
    """Where a node starts (and optionally ends) in a file. 1-based line and column."""

    file: str
    line: int
    col: int
    end_line: int | None = None
    end_col: int | None = None


@dataclass(frozen=True)
class Diagnostic:
    code: str  # e.g. "RP101"
    severity: Severity
    span: Span | None  # None only for problems with no place (a missing path)
    message: str
    hint: str | None = None

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def as_error(self) -> "Diagnostic":
        """The same diagnostic raised to an error (`--strict`)."""
        return Diagnostic(self.code, "error", self.span, self.message, self.hint)

    def to_dict(self) -> dict[str, object]:
        """The JSON form. `path` and `column` repeat `file` and `col` under the names of the
        text form (`PATH:LINE:COL`) and of mypy's JSON output, so either spelling works."""
        span = self.span
        return {
            "code": self.code,
            "severity": self.severity,
            "file": span.file if span else None,
            "line": span.line if span else None,
            "col": span.col if span else None,
            "message": self.message,
            "hint": self.hint,
            "path": span.file if span else None,
            "column": span.col if span else None,
        }


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """A 'did you mean ...?' hint for a misspelt name, or None when nothing is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def sort_key(d: Diagnostic) -> tuple[str, int, int, str]:
    if d.span is None:
        return ("", 0, 0, d.code)
    return (d.span.file, d.span.line, d.span.col, d.code)


def render_text(diag: Diagnostic, sources: Mapping[str, str] | None = None) -> str:
    """One diagnostic as text: the header line, the source line with a caret, the hint."""
    span = diag.span
    where = f"{span.file}:{span.line}:{span.col}: " if span else ""
    out = [f"{where}{diag.severity}[{diag.code}]: {diag.message}"]
    text = (sources or {}).get(span.file) if span else None
    if span is not None and text is not None:
        lines = text.splitlines()
        if 1 <= span.line <= len(lines):
            # the line as written (tabs kept); the caret's indent repeats its tabs, so the caret
            # sits under the column in any terminal and is still the COL-th character
            src = mask_passwords(lines[span.line - 1])
            gutter = str(span.line)
            pad = " " * len(gutter)
            out.append(f" {pad} |")
            out.append(f" {gutter} | {src}")
            width = 1
            if span.end_line == span.line and span.end_col and span.end_col > span.col:
                width = span.end_col - span.col
            indent = "".join("\t" if c == "\t" else " " for c in src[: span.col - 1])
            indent += " " * (span.col - 1 - len(indent))
            out.append(f" {pad} | {indent}{'^' * width}")
    if diag.hint:
        out.append(f"  = hint: {diag.hint}")
    return "\n".join(out)


def render_all_text(diags: Sequence[Diagnostic], sources: Mapping[str, str] | None = None) -> str:
    return "\n\n".join(render_text(d, sources) for d in diags)


def render_json(diags: Sequence[Diagnostic]) -> str:
    return json.dumps([d.to_dict() for d in diags], indent=2)
