"""Fixtures: real redis-servers (skipped, saying why, without one) and a real upstream."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from redis_kit import REDIS_SERVER, RedisServer

from riprap_testing.faults import FaultServer


def require_redis() -> None:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server; "
                    ".ci/run installs it)")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    require_redis()
    server = RedisServer(Path(tmp_path_factory.mktemp("redis"))).start()
    yield server
    server.stop()


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that kill, pause or restart it."""
    require_redis()
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own that asks for LOCKED_PASSWORD."""
    require_redis()
    server = RedisServer(tmp_path, password=LOCKED_PASSWORD).start()
    yield server
    server.kill()


LOCKED_PASSWORD = "s3cret-Pa55word"


@pytest.fixture
def upstream() -> Iterator[FaultServer]:
    """A fault-controllable upstream on loopback (riprap_testing.faults)."""
    server = FaultServer(name="up").start()
    yield server
    server.stop()
