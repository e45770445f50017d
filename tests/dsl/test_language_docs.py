"""The docs' riprap examples parse, and the language reference names every directive."""

from __future__ import annotations

import re
from pathlib import Path

from dsl.parser import parse_text
from dsl.syntax_errors import DIRECTIVES

ROOT = Path(__file__).resolve().parents[2]


def _blocks(doc: str) -> list[str]:
    return re.findall(r"```riprap\n(.*?)```", doc, flags=re.S)


def test_language_reference_examples_parse() -> None:
    doc = (ROOT / "docs/language.md").read_text(encoding="utf-8")
    blocks = _blocks(doc)
    assert len(blocks) >= 20
    for block in blocks:
        result = parse_text(block, "docs/language.md")
        assert not result.diagnostics, (block, result.diagnostics)


def test_language_reference_documents_every_directive() -> None:
    doc = (ROOT / "docs/language.md").read_text(encoding="utf-8")
    headings = " ".join(re.findall(r"^### (.*)$", doc, flags=re.M))
    for directive in DIRECTIVES:
        if directive in ("run", "restart"):
            assert f"    {directive} " in doc
        else:
            assert directive in headings, directive


def test_plan_doc_names_every_plan_field() -> None:
    import dataclasses

    from dsl import plan

    doc = (ROOT / "docs/plan.md").read_text(encoding="utf-8")
    for cls in (plan.Plan, plan.ServicePlan, plan.RetrySpec):
        for f in dataclasses.fields(cls):
            assert re.search(rf"\b{f.name}\b", doc), (cls.__name__, f.name)
