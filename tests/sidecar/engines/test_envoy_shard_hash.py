"""The Envoy engine's shard pick (lua/blake2b.lua, run by LuaJIT as in Envoy) equals the
Python engine's (policies/sharding.py) for random keys and shard lists."""

from __future__ import annotations

import shutil
from hashlib import blake2b
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.sharding import score, shard_for

LUA_DIR = Path(__file__).resolve().parents[3] / "sidecar" / "engines" / "envoy" / "lua"
DRIVER = r"""
package.path = LUA_DIR .. "/?.lua;" .. package.path
local b = require("blake2b")
local function unhex(s) return (s:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end)) end
for line in io.lines() do
  local op, key, rest = line:match("^(%a+) (%x*) ?(.*)$")
  if op == "score" then
    local hi, lo = b.score(unhex(key))
    io.write(string.format("%08x%08x\n", hi, lo))
  else
    local names = {}
    for n in rest:gmatch("%x+") do names[#names + 1] = unhex(n) end
    io.write(b.pick(names, unhex(key)), "\n")
  end
  io.flush()
end
"""


@pytest.fixture(scope="module")
def lua() -> Iterator[subprocess.Popen[str]]:
    exe = shutil.which("luajit")
    if exe is None:
        pytest.fail("luajit is missing (Debian package `luajit`: the Lua engine Envoy embeds)")
    code = f"LUA_DIR = {str(LUA_DIR)!r}\n" + DRIVER
    proc = subprocess.Popen([exe, "-e", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            encoding="latin-1")
    yield proc
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.wait(timeout=5)
    proc.stdout.close()


def _ask(proc: subprocess.Popen[str], line: str) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().rstrip("\n")


names = st.text(alphabet=st.characters(min_codepoint=48, max_codepoint=122), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(key=st.text(max_size=300), shards=st.lists(names, min_size=1, max_size=8, unique=True))
def test_lua_pick_equals_python(lua: subprocess.Popen[str], key: str, shards: list[str]) -> None:
    data = key.encode("utf-8", "surrogatepass")
    line = "pick " + data.hex() + " " + ",".join(n.encode().hex() for n in shards)
    assert _ask(lua, line).encode("latin-1").decode("utf-8") == shard_for(key, shards)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600))
def test_lua_blake2b_equals_hashlib(lua: subprocess.Popen[str], data: bytes) -> None:
    # any bytes, across the 128-byte block boundaries
    assert _ask(lua, "score " + data.hex()) == blake2b(data, digest_size=8).hexdigest()


def test_lua_score_is_the_python_score(lua: subprocess.Popen[str]) -> None:
    for shard, key in [("a", "sku-1"), ("s3", ""), ("east", "\u00e9t\u00e9"), ("x" * 200, "k" * 300)]:
        data = shard.encode() + b"\x00" + key.encode()
        assert int(_ask(lua, "score " + data.hex()), 16) == score(shard, key)
