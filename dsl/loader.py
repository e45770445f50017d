"""Loading plans: a `.riprap` policy file (compiled) or a compiled plan `.json`, as the
sidecar loads them on every (re)load. Reading the text is dsl/sources.py's job.
"""

from __future__ import annotations

import dataclasses
import json
import os

from dsl.analysis import analyse
from dsl.compiler import compile_file
from dsl.diagnostics import Diagnostic, Span
from dsl.plan import Plan
from dsl.schema import validate_plan_dict
from dsl.sources import MAX_SOURCE_BYTES, check_text, decode_source, read_source
from dsl.units import CompiledUnit

__all__ = ["MAX_SOURCE_BYTES", "check_text", "decode_source", "load_plan_source", "read_source"]


def load_plan_source(path: str) -> CompiledUnit:
    """A `.json` file is a compiled plan (schema-validated); anything else is compiled.

    The sidecar calls this on every (re)load, so it never raises on bad input.
    """
    if not path.endswith(".json"):
        return _refuse_errors_of_analysis(compile_file(path))
    text, diags = read_source(path)
    if text is None:
        return CompiledUnit(path, "", None, tuple(diags))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return CompiledUnit(
            path,
            text,
            None,
            (Diagnostic("RP009", "error", Span(path, exc.lineno, exc.colno), f"not valid JSON: {exc.msg}"),),
        )
    if not isinstance(data, dict):
        return CompiledUnit(
            path, text, None, (Diagnostic("RP008", "error", Span(path, 1, 1), "a plan is a JSON object"),)
        )
    problems = validate_plan_dict(data)
    if problems:
        return CompiledUnit(
            path,
            text,
            None,
            tuple(
                Diagnostic("RP008", "error", Span(path, 1, 1), f"the plan does not match its schema: {p}")
                for p in problems
            ),
        )
    # the plan file itself is the source the reloader watches (fallback bodies are inline),
    # and the TLS files it names (a rotated certificate is picked up without a restart)
    here = os.path.abspath(path)
    loaded = Plan.from_dict(data)
    tls = [f for svc in loaded.services.values() for t in (svc.tls, *(s.tls for s in svc.shards))
           if t is not None for f in (t.ca, t.cert, t.key) if f]
    plan = dataclasses.replace(loaded, source=here, watch=(here, *dict.fromkeys(tls)))
    return _refuse_errors_of_analysis(CompiledUnit(path, text, plan, ()))


def _refuse_errors_of_analysis(unit: CompiledUnit) -> CompiledUnit:
    """A plan whose one-file analysis finds errors (a fallback cycle) is not loaded either:
    `run` refuses what `check` and `compile` refuse. Warnings do not block a load."""
    if unit.plan is None:
        return unit
    errors = tuple(d for d in analyse([unit]) if d.is_error)
    if not errors:
        return unit
    return dataclasses.replace(unit, plan=None, diagnostics=unit.diagnostics + errors)
