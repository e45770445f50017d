"""`riprap compile FILE --target envoy -o DIR`: the files, the header, Envoy's verdict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from dsl.cli import main
from envoy_harness import validate
from sidecar.engines.envoy.config import to_yaml, validation_bootstrap
from sidecar.engines.envoy.target import split_address

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "contract" / "checkout.riprap"


def test_compile_target_envoy_writes_a_runnable_folder(tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "envoy-config"
    assert main(["compile", str(EXAMPLE), "--target", "envoy", "-o", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["cds.yaml", "ecds-upstream.yaml", "ecds.yaml", "envoy.yaml", "lds.yaml", "rds.yaml"]
    text = (out / "envoy.yaml").read_text()
    assert text.startswith("# Envoy configuration compiled by riprap")
    assert "envoy -c envoy.yaml" in text
    boot = yaml.safe_load(text)
    assert boot["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 7401}
    lds = boot["dynamic_resources"]["lds_config"]["path_config_source"]
    assert lds == {"path": str(out / "lds.yaml"), "watched_directory": {"path": str(out)}}
    done = validate(out / "envoy.yaml")
    assert done.returncode == 0, done.stderr
    listener = yaml.safe_load((out / "lds.yaml").read_text())["resources"][0]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 7400}


def test_compile_target_envoy_prints_what_differs(tmp_path: Path) -> None:
    out = tmp_path / "o"
    done = subprocess.run([sys.executable, "-m", "dsl.cli", "compile", str(EXAMPLE), "--target", "envoy",
                           "-o", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "warning[envoy]: service inventory: breaker:" in done.stderr
    assert f"{EXAMPLE}:" in done.stderr


def test_compile_target_envoy_needs_a_folder(capsys: object) -> None:
    assert main(["compile", str(EXAMPLE), "--target", "envoy"]) == 2


def test_compile_target_plan_is_the_default(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    assert main(["compile", str(EXAMPLE), "--target", "plan", "-o", str(out)]) == 0
    assert out.read_text().lstrip().startswith("{")


def test_validation_bootstrap_holds_every_resource(tmp_path: Path) -> None:
    from dsl.compiler import compile_file
    from sidecar.engines.envoy import EnvoyPorts, build_config

    plan = compile_file(str(EXAMPLE)).plan
    assert plan is not None
    config = build_config(plan, EnvoyPorts("127.0.0.1", 7400, 7401), dynamic_dir=tmp_path, chaos=True)
    static = validation_bootstrap(config)
    assert "dynamic_resources" not in static
    # its services' clusters, and Envoy's own listener (the upstream Lua filter's waits)
    assert len(static["static_resources"]["clusters"]) == 5
    path = tmp_path / "static.yaml"
    path.write_text(to_yaml(static))
    done = validate(path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_split_address() -> None:
    assert split_address("127.0.0.1:7400") == ("127.0.0.1", 7400)
    assert split_address("[::1]:80") == ("::1", 80)
