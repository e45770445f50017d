"""The Python engine enforces `limit ... shared` with no grpc at all.

grpcio is in the `envoy` extra only (it serves the Envoy engine's rate limit service), so a
plain `pip install riprap` has none: a sidecar whose interpreter cannot import `grpc`
(blocked by a `sitecustomize`) still starts, shares its bucket through Redis and answers
over the limit with 429.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fleet_kit import Sidecar, hammer
from redis_kit import RedisServer

from riprap_testing.faults import FaultServer

pytestmark = pytest.mark.slow


def test_shared_limit_on_the_python_engine_without_grpc(
        tmp_path: Path, redis_server: RedisServer, upstream: FaultServer) -> None:
    blocker = tmp_path / "block"
    blocker.mkdir()
    marker = tmp_path / "blocked"
    (blocker / "sitecustomize.py").write_text(
        "import sys\nsys.modules['grpc'] = None  # `import grpc` raises ImportError\n"
        f"open({str(marker)!r}, 'w').close()\n")
    policy = tmp_path / "nogrpc.riprap"
    policy.write_text(f"""\
app nogrpc
store {redis_server.url}

service api {{
    endpoint {upstream.url}
    timeout 2s
    limit 1/s burst 5 shared
}}
""")
    car = Sidecar(policy, env={"PYTHONPATH": f"{blocker}:{Path(__file__).resolve().parents[2]}"})
    car.start()
    try:
        (answers,) = asyncio.run(hammer([car.url], 1.5, workers=1, pause=0.02))
        assert 5 <= answers.count(200) <= 8, answers.statuses  # burst 5 + 1/s
        assert answers.count(429) > 0
        assert car.state()["services"]["api"]["limiter"]["store"] == "up"
    finally:
        car.stop()
    assert marker.exists()  # the sidecar's interpreter ran the blocker
    assert "No module named" not in car.logs() and "ImportError" not in car.logs(), car.logs()
