"""Mesh analysis (section 10). Being built: the mesh-analysis work replaces this file."""

from __future__ import annotations

from typing import Sequence

from dsl.diagnostics import Diagnostic
from dsl.units import CompiledUnit


def analyse(units: Sequence[CompiledUnit], max_amplification: float = 10.0) -> list[Diagnostic]:
    """Findings over the compiled files taken together (and per file)."""
    return []


def explain_mesh(units: Sequence[CompiledUnit]) -> str:
    """Each app's worst-case fan-out and time, in words."""
    return ""
