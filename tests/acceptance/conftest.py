"""The one place the acceptance tests start "the sidecar for this policy".

Every sidecar of these tests comes from the `run_sidecar` fixture (a `riprap run` subprocess,
`acc_kit.Sidecar`), and every test that uses it runs once per engine (section 11: sections
4 to 6 and 9 hold on both): `engine` is a module-scoped parameter, `python` then `envoy`,
and `run_sidecar` adds `--engine envoy` for the second. A test whose assertion does not
hold on Envoy says so with `@pytest.mark.envoy_differs(KEY)`, KEY listed in
`engine_differences.py`; `@pytest.mark.engines("python")` keeps a test to the engines named
(for what only one engine has, e.g. the Python engine's own internals).
Each sidecar it started is stopped when the module's tests are done (a test may stop one
earlier itself: stopping twice is harmless).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from acc_kit import RunSidecar, Sidecar, Upstream, free_port
from engine_differences import reason

ENGINES = ("python", "envoy")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "engines(*names): run this test on these engines only")
    config.addinivalue_line("markers", "envoy_differs(key): skipped on the Envoy engine, "
                                       "for the difference KEY of engine_differences.py")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engine" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("engines")
    engines = tuple(marker.args) if marker else ENGINES
    metafunc.parametrize("engine", engines, scope="module")


@pytest.fixture(autouse=True)
def _engine_differences(request: pytest.FixtureRequest) -> None:
    marker = request.node.get_closest_marker("envoy_differs")
    if marker is None or "engine" not in request.fixturenames:
        return
    if request.getfixturevalue("engine") == "envoy":
        pytest.skip(reason(str(marker.args[0])))


@pytest.fixture(scope="module")
def run_sidecar(engine: str) -> Iterator[RunSidecar]:
    """`run_sidecar(policy, *args, port=None, admin=None, admin_host=..., cwd=None)`: a started,
    ready sidecar for `policy` (free loopback ports unless given), on this module's `engine`."""
    started: list[Sidecar] = []

    def run(policy: Path, *args: str, port: int | None = None, admin: int | None = None,
            admin_host: str = "127.0.0.1", cwd: Path | None = None,
            timeout: float = 15.0) -> Sidecar:
        if engine != "python" and "--engine" not in args:
            args = (*args, "--engine", engine)
        sc = Sidecar(policy, port if port is not None else free_port(),
                     admin if admin is not None else free_port(), *args,
                     admin_host=admin_host, cwd=cwd)
        sc.engine = engine
        started.append(sc)
        return sc.start(timeout)

    yield run
    for sc in reversed(started):
        sc.stop()


@pytest.fixture(scope="module")
def ups() -> Iterator[dict[str, Any]]:
    """Upstreams A, B and C (`acc_kit.Upstream`, one per test file) and a port nothing listens on."""
    a, b, c = Upstream("A"), Upstream("B"), Upstream("C")
    yield {"A": a, "B": b, "C": c, "DEAD": free_port()}
    a.close()
    b.close()
    c.close()
