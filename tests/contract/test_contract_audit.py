"""A sentence-by-sentence audit of language.md sections 2, 3, 7, 8, 10 and 11, black-box.

Each test cites the sentence it holds riprap to, and covers what the other contract tests
(test_cli_contract.py, test_language_contract.py, test_mesh_contract.py) do not.
"""

from __future__ import annotations

from pathlib import Path

from contract_helpers import parse_diags, riprap


def test_s8_s11_compile_target_envoy_warnings_read_like_diagnostics(checkout_copy: Path, tmp_path: Path) -> None:
    """s8: "A diagnostic reads `PATH:LINE:COL: ...`, then the source line and a caret under the
    column"; s11: where Envoy differs, the warning names the statement. `compile --target envoy`
    prints its `warning[envoy]` notes that way too, at the statement's own line."""
    res = riprap("compile", checkout_copy, "--target", "envoy", "-o", tmp_path / "out")
    assert res.rc == 0, res.err
    notes = [d for d in parse_diags(res.err) if d.code == "envoy"]
    assert notes, res.err
    lines = checkout_copy.read_text(encoding="utf-8").splitlines()
    for d in notes:
        assert d.sev == "warning"
        assert d.body[1].endswith(lines[d.line - 1].replace("\t", " ")), d
        assert d.body[2].index("^") - d.body[2].index("|") - 2 == d.col - 1, d
    breaker = next(d for d in notes if d.msg.startswith("service inventory: breaker:"))
    assert lines[breaker.line - 1].strip().startswith("breaker failure-rate"), breaker
