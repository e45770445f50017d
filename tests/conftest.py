"""Fixtures for every test directory: `vclock`, a driven virtual clock
(`riprap_testing.clock.VirtualClock`) for the engine and the sidecar in virtual time."""

from __future__ import annotations

from typing import AsyncIterator

import pytest_asyncio

from riprap_testing.clock import VirtualClock, driven


@pytest_asyncio.fixture
async def vclock() -> AsyncIterator[VirtualClock]:
    async with driven() as clock:
        yield clock
