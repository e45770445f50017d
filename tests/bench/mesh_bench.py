"""Mesh analysis benchmark: 200 policy files, 2,000 edges. Prints the wall time; asserts nothing.

Run:  .venv/bin/python tests/bench/mesh_bench.py [--files 200] [--edges-per-file 10]

The mesh is layered (20 apps per layer, each calling 10 services in deeper layers or
leaves), so every app is reachable along many paths: the worst case for path math.
It times `analyse` on units built directly from plans, then, when the compiler is there,
the whole `check`-like job on real files written to a temporary directory.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dsl.analysis import analyse, explain_mesh  # noqa: E402
from dsl.diagnostics import Span  # noqa: E402
from dsl.graph import render  # noqa: E402
from dsl.plan import BackoffSpec, Plan, RetrySpec, ServicePlan  # noqa: E402
from dsl.units import CompiledUnit  # noqa: E402


def mesh_spec(files: int, per_file: int, seed: int = 7) -> dict[str, list[tuple[str, int, float]]]:
    """app -> [(callee, retries, timeout)]; callees are apps in deeper layers or leaf services."""
    rng = random.Random(seed)
    layer = 20
    apps = [f"app{i:03d}" for i in range(files)]
    spec: dict[str, list[tuple[str, int, float]]] = {}
    for i, app in enumerate(apps):
        deeper = apps[(i // layer + 1) * layer :]
        pool = deeper + [f"leaf{j:03d}" for j in range(100)]
        callees = rng.sample(pool, per_file)
        spec[app] = [(c, rng.randint(0, 3), rng.choice([0.5, 1.0, 2.0, 5.0])) for c in callees]
    return spec


def units_from(spec: dict[str, list[tuple[str, int, float]]]) -> list[CompiledUnit]:
    units = []
    for app, calls in spec.items():
        path = f"bench/{app}.riprap"
        services = {
            c: ServicePlan(
                name=c,
                timeout=t,
                retry=RetrySpec(retries=r, backoff=BackoffSpec("exponential", 0.05, 1.0)) if r else None,
            )
            for c, r, t in calls
        }
        spans = {c: Span(path, 3 + 4 * k, 1) for k, c in enumerate(services)}
        units.append(
            CompiledUnit(path, "", Plan(app=app, services=services), app_span=Span(path, 1, 1), service_spans=spans)
        )
    return units


def policy_text(app: str, calls: list[tuple[str, int, float]]) -> str:
    lines = [f"app {app}", ""]
    for callee, retries, timeout in calls:
        lines.append(f"service {callee} {{")
        lines.append("    endpoint http://127.0.0.1:9000")
        lines.append(f"    timeout {int(timeout * 1000)}ms")
        if retries:
            lines.append(f"    retry {retries} backoff 50ms..1s budget 20%")
        lines.append("}")
    return "\n".join(lines) + "\n"


def timed(label: str, fn):
    start = time.perf_counter()
    result = fn()
    print(f"{label}: {time.perf_counter() - start:.3f} s")
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--edges-per-file", type=int, default=10)
    args = ap.parse_args()
    spec = mesh_spec(args.files, args.edges_per_file)
    edges = sum(len(v) for v in spec.values())
    units = units_from(spec)
    print(f"mesh: {len(units)} files, {edges} edges")
    diags = timed("analyse (plans built in memory)", lambda: analyse(units))
    print(f"  findings: {len(diags)} ({sum(d.code == 'RP401' for d in diags)} amplification, "
          f"{sum(d.code == 'RP402' for d in diags)} inversion)")
    timed("explain_mesh", lambda: explain_mesh(units))
    timed("graph --format dot", lambda: render(units, "dot"))
    try:
        from dsl.compiler import compile_file
    except ImportError:
        print("compile + analyse: skipped (dsl.compiler not available)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for app, calls in spec.items():
            p = Path(tmp) / f"{app}.riprap"
            p.write_text(policy_text(app, calls), encoding="utf-8")
            paths.append(p)

        def compile_and_analyse():
            compiled = [compile_file(str(p)) for p in paths]
            return compiled, analyse(compiled)

        compiled, _ = timed("compile 200 files + analyse", compile_and_analyse)
        bad = [u.path for u in compiled if u.plan is None]
        if bad:
            print(f"  {len(bad)} files failed to compile, e.g. {bad[0]}")
        timed("analyse (compiled files)", lambda: analyse(compiled))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
