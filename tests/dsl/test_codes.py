"""One test per diagnostic code: the code, its line and its column.

`CASES` is also the list docs/diagnostics.md documents; `test_every_code_is_documented`
keeps the two in step.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dsl.compiler import compile_file, compile_source
from dsl.diagnostics import Diagnostic

ROOT = Path(__file__).resolve().parents[2]
EP = "    endpoint http://127.0.0.1:9001\n"

# code -> (source, line, col). Each source triggers the code at that place.
CASES: dict[str, tuple[str, int, int]] = {
    "RP007": ("# nothing but a comment\n", 1, 1),
    "RP101": ("service a {\n    timeout 5x\n" + EP + "}\n", 2, 13),
    "RP102": ("service a {\n    timout 5s\n" + EP + "}\n", 2, 5),
    "RP103": ("service a {\n" + EP + "    timeout 1s @\n}\n", 3, 16),
    "RP104": ("service a {\n" + EP, 1, 11),
    "RP105": ("}\nservice a {\n" + EP + "}\n", 1, 1),
    "RP106": ('service a {\n' + EP + '    fallback status 503 text "oops\n}\n', 3, 30),
    "RP107": ("service a {\n" + EP + "    fallback status 503 json " + "[" * 70 + "]" * 70 + "\n}\n", 3, 94),
    "RP108": ("".join(f"bogus{i} 1\n" for i in range(60)), 50, 1),
    "RP109": ('service a {\n' + EP + '    fallback status 503 text "\\q"\n}\n', 3, 30),
    "RP201": ("policy critical {\n    timeout 1s\n}\nservice a {\n    use critcal\n" + EP + "}\n", 5, 9),
    "RP202": ("service a {\n" + EP + "}\nservice a {\n" + EP + "}\n", 4, 9),
    "RP203": ("policy p {\n    timeout 1s\n}\npolicy p {\n    timeout 2s\n}\nservice a {\n    use p\n" + EP + "}\n", 4, 8),
    "RP204": (
        "service a {\n    shard by header X\n    shard s {\n" + EP + "    }\n    shard s {\n" + EP + "    }\n}\n",
        6,
        11,
    ),
    "RP205": ("service a {\n" + EP + "    shard by header X\n    shard s {\n" + EP + "    }\n}\n", 1, 9),
    "RP206": ("service a {\n    timeout 1s\n}\n", 1, 9),
    "RP207": ("service a {\n    shard by header X\n    shard default t\n    shard s {\n" + EP + "    }\n}\n", 3, 19),
    "RP208": ("service a {\n    shard s {\n" + EP + "    }\n}\n", 2, 5),
    "RP209": ("service a {\n" + EP + "    fallback service b\n}\n", 3, 22),
    "RP210": ("service a {\n" + EP + "    retry 2 backoff 2s..1s budget 10%\n}\n", 3, 21),
    "RP211": ("service a {\n" + EP + "    chaos abort 150%\n}\n", 3, 17),
    "RP212": ("service a {\n" + EP + "    fallback status 700 text \"x\"\n}\n", 3, 21),
    "RP213": ("service a {\n    endpoint http://127.0.0.1:9001 weight 0\n}\n", 2, 43),
    "RP214": ("service a {\n" + EP + "    failover http://127.0.0.1:9002 tier 0\n}\n", 3, 41),
    "RP215": ("service a {\n" + EP + "    hedge after 50ms max 0\n}\n", 3, 26),
    "RP216": ("service a {\n" + EP + "    breaker failure-rate 50% window 5 min 10\n}\n", 3, 39),
    "RP217": ("listen 127.0.0.1:99999\nservice a {\n" + EP + "}\n", 1, 8),
    "RP218": ("service a {\n" + EP + "}\nservice b {\n    host a\n" + EP + "}\n", 5, 10),
    "RP219": ("defaults {\n" + EP + "}\nservice a {\n" + EP + "}\n", 2, 5),
    "RP220": ("service a {\n" + EP + "    breaker failures 5 window 10\n}\n", 3, 24),
    "RP221": ("listen 127.0.0.1:7400\nlisten 127.0.0.1:7500\nservice a {\n" + EP + "}\n", 2, 1),
    "RP222": ("service a {\n" + EP + "    timeout 0s\n}\n", 3, 13),
    "RP223": ("service a {\n" + EP + "    retry 2 budget 10% methods post\n}\n", 3, 32),
    "RP224": ("service a {\n" + EP + "    balance fastest\n}\n", 3, 13),
    "RP225": ('app shop {\n    restart backoff 1s..5s\n}\nservice a {\n' + EP + "}\n", 1, 1),
    "RP226": ('service a {\n' + EP + '    fallback status 503 file "missing.json"\n}\n', 3, 30),
    "RP227": ("service a {\n" + EP + "    retry 101 budget 10%\n}\n", 3, 11),
    "RP228": ('service a {\n' + EP + '    fallback status 200 file "../../etc/passwd"\n}\n', 3, 30),
    "RP229": ('service a {\n' + EP + '    tls ca "missing-ca.pem"\n}\n', 3, 5),
    "RP230": ('service a {\n' + EP + '    tls sni api.internal cert "client.pem"\n}\n', 3, 26),
    "RP231": ("service a {\n" + EP + "    limit 20/s burst 5 shared\n}\n", 3, 24),
    "RP232": ("store http://127.0.0.1:6379\nservice a {\n" + EP + "}\n", 1, 7),
    "RP301": ("service a {\n" + EP + "    timeout 1s\n    retry 3 per-try 400ms budget 10%\n}\n", 4, 5),
    "RP302": ("service a {\n" + EP + "    timeout 20s\n}\n", 3, 5),
    "RP303": ("service a {\n" + EP + "    timeout 2s\n    retry 2\n}\n", 4, 5),
    "RP304": ("service a {\n" + EP + "    timeout 1s\n    timeout 2s\n}\n", 4, 5),
    "RP305": ("app lonely\n", 1, 1),
    "RP306": ("policy p {\n    timeout 1s\n}\nservice a {\n" + EP + "    timeout 1s\n}\n", 1, 8),
    "RP307": ("service a {\n" + EP + "    retry 1 jitter full budget 10%\n}\n", 3, 13),
    "RP308": ("service a {\n    endpoint https://127.0.0.1:9001\n    tls verify off\n}\n", 3, 9),
    "RP309": ("service a {\n    endpoint http://127.0.0.1:9001 resolve\n}\n", 2, 36),
    "RP310": ("service a {\n    endpoint http://pool.internal:9001 resolve every 200ms\n}\n", 2, 54),
    "RP311": ("admin 0.0.0.0:7401\nservice a {\n" + EP + "}\n", 1, 7),
}

# codes about reading files, tested with real files below
FILE_CODES = ("RP001", "RP002", "RP003", "RP004", "RP005", "RP006", "RP008", "RP009")


def _diags(source: str, tmp_path: Path) -> list[Diagnostic]:
    path = tmp_path / "t.riprap"
    path.write_text(source, encoding="utf-8")
    return list(compile_file(str(path)).diagnostics)


@pytest.mark.parametrize("code", sorted(CASES))
def test_code_is_reported_at_its_place(code: str, tmp_path: Path) -> None:
    source, line, col = CASES[code]
    diags = _diags(source, tmp_path)
    found = [d for d in diags if d.code == code]
    assert found, f"{code} not reported; got {[(d.code, d.message) for d in diags]}"
    places = [(d.span.line, d.span.col) for d in found if d.span]
    assert (line, col) in places, f"{code} at {places}, expected {(line, col)}"
    assert all(d.span is not None and d.span.file.endswith("t.riprap") for d in found)


def test_every_code_is_documented() -> None:
    doc = (ROOT / "docs/diagnostics.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^### (RP[0-35]\d\d)", doc, flags=re.M))
    tested = set(CASES) | set(FILE_CODES) | set(ENGINE_CASES) | {"RP299"}
    assert documented == tested


# codes of `check --engine ENGINE`: code -> (engine, source, line, col)
ENGINE_CASES: dict[str, tuple[str, str, int, int]] = {
    "RP501": ("envoy", "service a {\n" + EP + "    timeout 1s\n    hedge at p95\n}\n", 4, 5),
}


@pytest.mark.parametrize("code", sorted(ENGINE_CASES))
def test_engine_code_is_reported_at_its_place(code: str) -> None:
    from dsl.engines import engine_findings

    engine, source, line, col = ENGINE_CASES[code]
    unit = compile_source(source, "t.riprap")
    found = [(d.severity, d.span.line, d.span.col) for d in engine_findings(unit, engine) if d.code == code and d.span]
    assert found == [("warning", line, col)]


def test_warnings_are_warnings(tmp_path: Path) -> None:
    codes = [c for c in CASES if c.startswith("RP3")]
    assert codes
    for code in codes:
        source = CASES[code][0]
        diags = _diags(source, tmp_path)
        assert all(d.severity == "warning" for d in diags if d.code == code)
        # a file with only warnings still compiles
        assert not any(d.is_error for d in diags), (code, diags)


def test_internal_schema_failure_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import dsl.schema

    monkeypatch.setattr(dsl.schema, "validate_plan_dict", lambda data: ["/app: broken"])
    unit = compile_source("service a {\n" + EP + "}\n", "t.riprap")
    assert unit.plan is None
    assert [(d.code, d.span.line if d.span else 0) for d in unit.diagnostics if d.is_error] == [("RP299", 1)]
