"""`riprap run` on a plan whose shared limits the engine cannot build: a clear error, no
traceback (a compiled plan `.json` is not checked for a `store` by the language)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dsl.plan import Plan

ROOT = Path(__file__).resolve().parents[2]


def run(plan: dict[str, object], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(Plan.from_dict(plan).to_dict()))
    return subprocess.run([sys.executable, "-m", "sidecar.cli", "run", str(path), "--listen",
                           "127.0.0.1:0", "--admin", "127.0.0.1:0"], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=60)


SERVICE = {"name": "api", "endpoints": [{"url": "http://127.0.0.1:9"}],
           "limit": {"rate": 1, "burst": 1, "shared": True}}


def test_shared_limit_without_store(tmp_path: Path) -> None:
    res = run({"app": "x", "services": {"api": SERVICE}}, tmp_path)
    assert res.returncode == 1
    assert "service 'api' has a shared limit, but the plan has no `store`" in res.stderr
    assert "Traceback" not in res.stderr


def test_store_that_is_not_redis(tmp_path: Path) -> None:
    res = run({"app": "x", "store": "http://127.0.0.1:6379", "services": {"api": SERVICE}},
              tmp_path)
    assert res.returncode == 1
    assert "store" in res.stderr and "not started" in res.stderr  # the schema refuses it
    assert "Traceback" not in res.stderr
