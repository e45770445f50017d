"""A diagnostic's source line never shows a URL's password (`check` output, the sidecar's
log on a failed reload), and its caret still points at the same column."""

from __future__ import annotations

from dsl.diagnostics import Diagnostic, Span, mask_passwords, render_text


def test_passwords_are_masked_with_as_many_stars() -> None:
    assert mask_passwords("store redis://:hunter2@h:6379/0") == "store redis://:*******@h:6379/0"
    assert mask_passwords("store rediss://user:p%40ss@h:6380/0 x") == \
        "store rediss://user:******@h:6380/0 x"
    assert mask_passwords("endpoint http://h:8080/a@b") == "endpoint http://h:8080/a@b"
    assert mask_passwords("store redis://127.0.0.1:6379") == "store redis://127.0.0.1:6379"


def test_the_rendered_line_is_masked_and_the_caret_stays() -> None:
    source = "app a\nstore redis://:hunter2@127.0.0.1:1/0 x\n"
    diag = Diagnostic(code="RP101", severity="error", message="expected the end of the line",
                      span=Span(file="p.riprap", line=2, col=38, end_line=2, end_col=39))
    text = render_text(diag, {"p.riprap": source})
    assert "hunter2" not in text
    src_line, caret = text.splitlines()[2], text.splitlines()[3]
    assert src_line.endswith("store redis://:*******@127.0.0.1:1/0 x")
    assert src_line.index(" x") + 1 == caret.index("^")
