"""Fixtures for every test directory: `vclock`, a driven virtual clock
(`riprap_testing.clock.VirtualClock`) for the engine and the sidecar in virtual time;
`fake_dns`, a real DNS server on loopback (`tests/dns_kit.py`).

This file's folder is on `sys.path` (pytest's rootdir conftest), so test modules anywhere
under tests/ can `from dns_kit import FakeDns, free_port_on`.
"""

from __future__ import annotations

from typing import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from dns_kit import FakeDns
from riprap_testing.clock import VirtualClock, driven


@pytest_asyncio.fixture
async def vclock() -> AsyncIterator[VirtualClock]:
    async with driven() as clock:
        yield clock


@pytest.fixture
def fake_dns() -> Iterator[FakeDns]:
    """An authoritative DNS server on 127.0.0.1 (UDP and TCP, one free port)."""
    server = FakeDns().start()
    yield server
    server.stop()
