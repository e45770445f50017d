"""`riprap graph` renderers on meshes built from plans: mermaid, dot (checked by graphviz), json."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import replace

import pytest
from mesh_fixtures import svc, unit

from dsl.graph import edge_label, layout, render, to_json
from dsl.plan import BreakerSpec, RetrySpec, ShardPlan, ShardingSpec


def mesh():
    """edge → api (×3) → ledger (×3) → db (×3) is the worst path; api → cache is calm."""
    return [
        unit("edge", replace(svc("api", 2, timeout=1.0), breaker=BreakerSpec("consecutive", failures=5, open=10.0))),
        unit("api", svc("ledger", 2, timeout=3.0, per_try=0.8), svc("cache", None, timeout=0.1)),
        unit("ledger", svc("db", 2, timeout=2.0)),
    ]


def test_edge_labels():
    e_api, e_ledger = layout(mesh()).mesh.out["app:edge"][0], layout(mesh()).mesh.out["app:api"][0]
    assert edge_label(e_api) == "timeout 1s · 3 attempts · breaker 5 failures, open 10s"
    assert edge_label(e_ledger) == "timeout 3s (per-try 800ms) · 3 attempts · no breaker"
    rate = replace(svc("x", None), breaker=BreakerSpec("rate", rate=0.5, window=20, open=30.0))
    assert edge_label(layout([unit("a", rate)]).mesh.out["app:a"][0]) == (
        "timeout 5s · 1 attempt · breaker 50% of 20, open 30s"
    )


def test_sharded_breakers_that_differ_say_per_shard():
    shards = (
        ShardPlan(name="a", endpoints=(), breaker=BreakerSpec("consecutive", failures=3)),
        ShardPlan(name="b", endpoints=(), breaker=BreakerSpec("consecutive", failures=5)),
    )
    s = replace(svc("users"), sharding=ShardingSpec(by="header", key="X"), shards=shards)
    assert edge_label(layout([unit("a", s)]).mesh.out["app:a"][0]).endswith("breaker per shard")


def test_mermaid_nodes_edges_and_highlighted_worst_path():
    text = render(mesh(), "mermaid")
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    assert '  n0["edge"]:::entry' in lines
    assert '  n1["api"]:::app' in lines
    assert '  n3(["cache"]):::leaf' in lines
    links = [line for line in lines if "-->" in line]
    assert links == [
        '  n0 -->|"timeout 1s · 3 attempts · breaker 5 failures, open 10s"| n1',
        '  n1 -->|"timeout 3s (per-try 800ms) · 3 attempts · no breaker"| n2',
        '  n1 -->|"timeout 100ms · 1 attempt · no breaker"| n3',
        '  n2 -->|"timeout 2s · 3 attempts · no breaker"| n4',
    ]
    # edge → api → ledger → db: links 0, 1 and 3 (not the calm api → cache, link 2)
    assert "  linkStyle 0,1,3 stroke:#dc2626,stroke-width:3px" in lines
    # every node id used by a link is declared
    declared = set(re.findall(r"^\s+(n\d+)[\[(]", text, re.M))
    used = re.findall(r"^\s+(n\d+) -->\|.*\| (n\d+)$", text, re.M)
    assert len(used) == 4
    assert {n for pair in used for n in pair} <= declared


def test_mermaid_marks_cycle_edges():
    units = [unit("edge", svc("a", 1)), unit("a", svc("b", 1)), unit("b", svc("a", 1))]
    lines = render(units, "mermaid").splitlines()
    assert "  linkStyle 0 stroke:#dc2626,stroke-width:3px" in lines  # edge → a, the worst path
    assert "  linkStyle 1,2 stroke:#ea580c,stroke-width:2px,stroke-dasharray:5 4" in lines


def test_dot_text():
    text = render(mesh(), "dot")
    assert text.startswith("digraph mesh {\n")
    assert '  "app:edge" [label="edge", style="filled,bold", fillcolor="#dbeafe"];' in text
    assert '  "svc:cache" [label="cache", shape=box, style="rounded,dashed"];' in text
    assert (
        '  "app:edge" -> "app:api" [label="timeout 1s\\n3 attempts\\nbreaker 5 failures, open 10s", '
        "color=red, penwidth=2];"
    ) in text
    assert '  "app:api" -> "svc:cache" [label="timeout 100ms\\n1 attempt\\nno breaker"];' in text


def _dot() -> str:
    path = shutil.which("dot")
    if path is None:
        pytest.skip("graphviz `dot` is not installed (apt-get install graphviz); dot output not validated")
    return path


@pytest.mark.parametrize(
    "units",
    [
        mesh(),
        [unit("a", svc("b", 1)), unit("b", svc("a", 1))],  # a cycle, no entry app
        [unit("lonely")],
    ],
    ids=["mesh", "cycle", "empty"],
)
def test_dot_output_is_valid_graphviz(units):
    dot = _dot()
    done = subprocess.run(
        [dot, "-Tsvg"], input=render(units, "dot"), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.lstrip().startswith(("<?xml", "<svg"))
    assert done.stderr == ""


def test_json_for_tools():
    data = json.loads(render(mesh(), "json"))
    assert [n["id"] for n in data["nodes"]] == ["app:edge", "app:api", "app:ledger", "svc:cache", "svc:db"]
    assert data["nodes"][0] == {
        "id": "app:edge",
        "name": "edge",
        "kind": "app",
        "entry": True,
        "file": "mesh/edge.riprap",
    }
    assert data["entries"] == ["app:edge"]
    first = data["edges"][1]
    assert first == {
        "from": "app:api",
        "to": "app:ledger",
        "service": "ledger",
        "file": "mesh/api.riprap",
        "line": 3,
        "timeout": 3.0,
        "per_try": 0.8,
        "retries": 2,
        "hedges": 0,
        "attempts": 3,
        "steady_attempts": 3.0,
        "worst_time": 2.4,
        "breaker": None,
        "label": "timeout 3s (per-try 800ms) · 3 attempts · no breaker",
        "highlighted": True,
        "in_cycle": False,
    }
    assert data["worst_paths"] == [
        {
            "entry": "app:edge",
            "target": "svc:db",
            "path": ["app:edge", "app:api", "app:ledger", "svc:db"],
            "factors": [3, 3, 3],
            "amplification": 27,
            "steady": 27.0,
        }
    ]
    assert data["cycles"] == []


def test_json_lists_cycles():
    units = [unit("a", svc("b", 1)), unit("b", svc("c", 1)), unit("c", svc("a", 1))]
    assert to_json(layout(units))["cycles"] == [["app:a", "app:b", "app:c", "app:a"]]


def test_retry_without_plan_fields_is_plain():
    s = replace(svc("x"), retry=RetrySpec(retries=0))
    assert edge_label(layout([unit("a", s)]).mesh.out["app:a"][0]) == "timeout 5s · 1 attempt · no breaker"


MERMAID_CHECK = r"""
import { createRequire } from 'module';
import { pathToFileURL } from 'url';
import fs from 'fs';
const dir = process.env.RIPRAP_MERMAID_DIR;
const require = createRequire(dir + '/');
const { JSDOM } = require('jsdom');
const dom = new JSDOM('<!doctype html><html><body></body></html>');
globalThis.window = dom.window;
globalThis.document = dom.window.document;
const { default: mermaid } = await import(pathToFileURL(dir + '/node_modules/mermaid/dist/mermaid.core.mjs'));
try {
  const r = await mermaid.parse(fs.readFileSync(0, 'utf8'));
  console.log(r.diagramType);
} catch (e) {
  console.log('ERROR ' + e.message);
  process.exit(1);
}
"""


@pytest.mark.parametrize("units", [mesh(), [unit("a", svc("b", 1)), unit("b", svc("a", 1))]], ids=["mesh", "cycle"])
def test_mermaid_output_parses_with_mermaid(units, tmp_path):
    """Mermaid's own parser, where a node_modules with `mermaid` and `jsdom` is named by RIPRAP_MERMAID_DIR."""
    import os

    where = os.environ.get("RIPRAP_MERMAID_DIR")
    node = shutil.which("node")
    if not where or node is None or not os.path.isdir(os.path.join(where, "node_modules", "mermaid")):
        pytest.skip("set RIPRAP_MERMAID_DIR to a directory where `npm install mermaid jsdom` ran to check mermaid syntax")
    script = tmp_path / "check.mjs"
    script.write_text(MERMAID_CHECK, encoding="utf-8")
    done = subprocess.run(
        [node, str(script)], input=render(units, "mermaid"), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "flowchart-v2"
