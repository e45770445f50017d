"""A save that lands while a reload compiles is never lost.

An editor that truncates and then writes (or two saves in quick succession) can be read
half-way: the reload then sees an empty or stale file. The watcher must compile again,
so the plan in force (or the error shown at /plan) is always the file's last content.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

import sidecar.reload as reload_module
from sidecar.app import create_app

GOOD = "app race\nservice one {\n    endpoint http://127.0.0.1:9\n}\n"
FINAL = GOOD + "service broken {\n    retry lots\n    endpoint nowhere\n}\n"


async def test_a_save_during_a_reload_is_compiled_again(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    policy = tmp_path / "race.riprap"
    policy.write_text(GOOD)
    sidecar = create_app(policy, inner=httpx.MockTransport(lambda r: httpx.Response(200)))
    real_compile = reload_module.compile_source
    calls: list[str] = []

    def compile_while_the_editor_writes(path: str) -> Any:
        calls.append(Path(path).read_text())
        try:
            return real_compile(path)  # reads the half-written (empty) file
        finally:
            if len(calls) == 1:
                policy.write_text(FINAL)  # the rest of the save lands meanwhile

    monkeypatch.setattr(reload_module, "compile_source", compile_while_the_editor_writes)
    await sidecar.start()
    try:
        await asyncio.sleep(0.3)  # the watcher is up
        policy.write_text("")  # the editor's truncate
        deadline = asyncio.get_running_loop().time() + 8
        doc: dict[str, Any] = {}
        while asyncio.get_running_loop().time() < deadline:
            doc = sidecar.holder.plan_document()
            if doc["last_error"] and "lots" in str(doc["last_error"]):
                break
            await asyncio.sleep(0.05)
        assert doc["last_error"] and "lots" in str(doc["last_error"]), (calls, doc["last_error"])
        assert calls[0] == "" and calls[-1] == FINAL
        assert list(doc["plan"]["services"]) == ["one"]  # the good plan stays in force
    finally:
        await sidecar.aclose()
