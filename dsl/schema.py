"""The plan's JSON Schema (dsl/plan.schema.json, draft 2020-12) and validation against it.

Every compile and every load of a plan file is validated, so the engine can trust the
shape of what it is given. Errors are returned as sentences that start with the JSON
pointer of the offending value (`/services/payments/timeout: -1 is less than ...`).

Validation uses `jsonschema-rs` when it is installed (a 1,000-service plan in ~10 ms,
against ~1.6 s for the pure-Python `jsonschema`, which would dominate `riprap check`),
and `jsonschema` otherwise; both implement draft 2020-12.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator

SCHEMA_FILE = "plan.schema.json"
MAX_REPORTED = 20


@lru_cache(maxsize=1)
def plan_schema() -> dict[str, Any]:
    """The schema as a dict (shipped inside the package)."""
    text = resources.files("dsl").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


@lru_cache(maxsize=1)
def _validator() -> Any:
    schema = plan_schema()
    try:
        import jsonschema_rs
    except ImportError:
        Draft202012Validator.check_schema(schema)
        return Draft202012Validator(schema)
    return jsonschema_rs.Draft202012Validator(schema)


def _pointer(path: Any) -> str:
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _where(err: Any) -> list[Any]:
    path = getattr(err, "absolute_path", None)  # jsonschema; jsonschema_rs says instance_path
    if path is None:
        return list(getattr(err, "instance_path", ()))
    return list(path)


def validate_plan_dict(data: dict[str, Any]) -> list[str]:
    """Human-readable schema violations of a plan in its JSON form; empty when valid."""
    errors = sorted(_validator().iter_errors(data), key=lambda e: list(map(str, _where(e))))
    out = []
    for err in errors[:MAX_REPORTED]:
        message = err.message if len(err.message) <= 300 else err.message[:297] + "..."
        out.append(f"{_pointer(_where(err))}: {message}")
    if len(errors) > MAX_REPORTED:
        out.append(f"... and {len(errors) - MAX_REPORTED} more")
    return out
