"""Regenerate the golden Envoy configurations: `tests/golden/envoy/<example>/` per example.

    .venv/bin/python tests/golden/regen_envoy.py

Each folder holds envoy.yaml, lds.yaml and cds.yaml as `riprap compile --target envoy`
writes them, with fixed ports (listen and admin from the example) and the watched folder
given as `.`, so the goldens are the same on every checkout and Envoy accepts them when
started in that folder. Review the diff before committing it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dsl.compiler import compile_file  # noqa: E402
from sidecar.engines.envoy.config import EnvoyConfig, EnvoyPorts, build_config, write_config  # noqa: E402
from sidecar.engines.envoy.target import split_address  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "envoy"


def examples() -> list[Path]:
    return sorted((ROOT / "examples").rglob("*.riprap"))


def golden_dir(example: Path) -> Path:
    return GOLDEN / example.resolve().relative_to(ROOT).with_suffix("")


def golden_config(example: Path) -> EnvoyConfig:
    unit = compile_file(str(example))
    assert unit.plan is not None, f"{example} does not compile"
    host, port = split_address(unit.plan.listen)
    _, admin = split_address(unit.plan.admin)
    return build_config(unit.plan, EnvoyPorts(host, port, admin), dynamic_dir=Path("."), chaos=False)


def write_golden(example: Path, out: Path) -> list[Path]:
    return write_config(golden_config(example), out)


def main() -> int:
    if GOLDEN.exists():
        shutil.rmtree(GOLDEN)
    for example in examples():
        for path in write_golden(example, golden_dir(example)):
            print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
