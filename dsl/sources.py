"""Reading sources: the text of a policy (or plan) file, or why it cannot be used.

Reading is where bad input is caught before the parser sees it: a missing or unreadable
path, a file over `MAX_SOURCE_BYTES`, a binary file (a NUL byte), text that is not UTF-8
(located at the first bad byte). Each becomes a diagnostic, never an exception. This
module knows nothing of compiling (dsl/compiler.py uses it; dsl/loader.py loads plans).
"""

from __future__ import annotations

import os

from dsl.diagnostics import Diagnostic, Span

MAX_SOURCE_BYTES = 4 * 1024 * 1024


def _locate(data: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column (in characters) of byte `offset`."""
    line = data.count(b"\n", 0, offset) + 1
    start = data.rfind(b"\n", 0, offset) + 1
    col = len(data[start:offset].decode("utf-8", errors="replace")) + 1
    return line, col


def read_source(path: str) -> tuple[str | None, list[Diagnostic]]:
    """The text of `path`, or None and the diagnostics saying why it cannot be used."""
    try:
        if os.path.isdir(path):
            return None, [Diagnostic("RP002", "error", None, f"{path}: is a directory, not a policy file")]
        size = os.path.getsize(path)
        if size > MAX_SOURCE_BYTES:
            return None, [
                Diagnostic(
                    "RP006",
                    "error",
                    Span(path, 1, 1),
                    f"file is too large: {size} bytes (the limit is {MAX_SOURCE_BYTES // (1024 * 1024)} MiB)",
                    "a policy file this size is almost certainly not a policy file",
                )
            ]
        with open(path, "rb") as fh:
            data = fh.read(MAX_SOURCE_BYTES + 1)
    except FileNotFoundError:
        return None, [Diagnostic("RP001", "error", None, f"{path}: no such file or directory")]
    except PermissionError:
        return None, [Diagnostic("RP002", "error", None, f"{path}: permission denied")]
    except OSError as exc:
        return None, [Diagnostic("RP002", "error", None, f"{path}: cannot read: {exc.strerror or exc}")]
    return decode_source(data, path)


def decode_source(data: bytes, path: str) -> tuple[str | None, list[Diagnostic]]:
    """UTF-8 text of `data`, or the located reason it is not a text file."""
    if len(data) > MAX_SOURCE_BYTES:
        return None, [
            Diagnostic("RP006", "error", Span(path, 1, 1), f"file is too large (the limit is {MAX_SOURCE_BYTES // (1024 * 1024)} MiB)")
        ]
    nul = data.find(b"\x00")
    if nul != -1:
        line, col = _locate(data, nul)
        return None, [
            Diagnostic("RP005", "error", Span(path, line, col), "this is a binary file, not a policy file (NUL byte)")
        ]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = _locate(data, exc.start)
        return None, [
            Diagnostic(
                "RP004",
                "error",
                Span(path, line, col),
                f"the file is not UTF-8: invalid byte 0x{data[exc.start]:02x}",
                "save the file as UTF-8",
            )
        ]
    if text.startswith("\ufeff"):
        text = text[1:]
    return text, []


def check_text(text: str, path: str) -> list[Diagnostic]:
    """Checks on text handed in directly (the same limits as for files)."""
    if len(text) > MAX_SOURCE_BYTES:
        return [Diagnostic("RP006", "error", Span(path, 1, 1), f"the text is too large (the limit is {MAX_SOURCE_BYTES // (1024 * 1024)} MiB)")]
    nul = text.find("\x00")
    if nul != -1:
        line = text.count("\n", 0, nul) + 1
        col = nul - (text.rfind("\n", 0, nul) + 1) + 1
        return [Diagnostic("RP005", "error", Span(path, line, col), "this is a binary file, not a policy file (NUL byte)")]
    return []
