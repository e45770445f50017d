"""Regenerate the golden plans: one `tests/golden/plans/<path>.plan.json` per example.

Run after a deliberate change to the compiler or to an example:

    .venv/bin/python tests/golden/regen.py          # every examples/**/*.riprap
    .venv/bin/python tests/golden/regen.py FILE...  # only these

Review the diff before committing it: a golden plan is the compiler's promise.
Machine-specific absolute paths (`source`, `watch`, fallback `file`, tls files) are written
relative to the repository root, so the goldens are the same on every checkout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PLANS = Path(__file__).resolve().parent / "plans"


def examples() -> list[Path]:
    """Every example policy file, sorted."""
    return sorted((ROOT / "examples").rglob("*.riprap"))


def golden_path(example: Path) -> Path:
    rel = example.resolve().relative_to(ROOT)
    return PLANS / rel.with_suffix(".plan.json")


def _rel(path: str) -> str:
    try:
        return Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return path


def normalise(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan with its absolute paths made relative to the repository root."""
    data = json.loads(json.dumps(plan))
    if data.get("source"):
        data["source"] = _rel(data["source"])
    data["watch"] = [_rel(p) for p in data.get("watch", [])]
    for svc in data.get("services", {}).values():
        for scope in [svc] + list(svc.get("shards", [])):
            for fb in scope.get("fallbacks", []):
                if fb.get("file"):
                    fb["file"] = _rel(fb["file"])
            tls = scope.get("tls") or {}
            for key in ("ca", "cert", "key"):
                if tls.get(key):
                    tls[key] = _rel(tls[key])
    return data


def render(example: Path) -> str:
    """The golden text of one example (raises if it does not compile)."""
    sys.path.insert(0, str(ROOT))
    from dsl.compiler import compile_file, plan_dict

    unit = compile_file(str(example))
    if unit.plan is None:
        problems = "\n".join(f"{d.code} {d.span}: {d.message}" for d in unit.diagnostics)
        raise SystemExit(f"{example} does not compile:\n{problems}")
    return json.dumps(normalise(plan_dict(unit.plan)), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    targets = [Path(a).resolve() for a in argv] or examples()
    for example in targets:
        out = golden_path(example)
        out.parent.mkdir(parents=True, exist_ok=True)
        text = render(example)
        changed = not out.exists() or out.read_text(encoding="utf-8") != text
        out.write_text(text, encoding="utf-8")
        print(f"{'wrote ' if changed else 'same  '} {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
