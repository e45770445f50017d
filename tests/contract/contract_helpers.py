"""Black-box helpers for the contract acceptance tests (/work/shared/language.md).

Every test here drives the `riprap` console script in a subprocess and looks only at what
the contract promises: exit codes, the diagnostic text format, the plan JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

_BIN = Path(sys.executable).with_name("riprap")
if os.environ.get("RIPRAP"):
    RIPRAP_CMD = [os.environ["RIPRAP"]]
elif _BIN.exists():
    RIPRAP_CMD = [str(_BIN)]
elif shutil.which("riprap"):
    RIPRAP_CMD = [shutil.which("riprap")]
else:  # pragma: no cover - fall back to the entry point itself
    RIPRAP_CMD = [sys.executable, "-c", "import sys; from dsl.cli import main; sys.exit(main())"]

CONTRACT_DIR = Path(os.environ.get("RIPRAP_CONTRACT_DIR", "/work/shared/contract"))
CHECKOUT = CONTRACT_DIR / "checkout.riprap"

# section 8: `PATH:LINE:COL: error[CODE]: message` (warnings the same with `warning[CODE]`)
HEADER = re.compile(
    r"^(?P<path>.+?):(?P<line>\d+):(?P<col>\d+): (?P<sev>error|warning)\[(?P<code>[^\]\s]+)\]: (?P<msg>.*)$"
)


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + "\n" + self.err

    def json(self):
        return json.loads(self.out)


@dataclass
class Diag:
    path: str
    line: int
    col: int
    sev: str
    code: str
    msg: str
    body: list[str]  # the lines after the header, up to the next header

    @property
    def full(self) -> str:
        return "\n".join([self.msg, *self.body])


def riprap(*args: str | os.PathLike, cwd: str | os.PathLike | None = None, timeout: float = 30) -> Result:
    proc = subprocess.run(
        [*RIPRAP_CMD, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def parse_diags(text: str) -> list[Diag]:
    """Every diagnostic in `text` (section 8's text format), with the lines that follow it."""
    diags: list[Diag] = []
    for raw in text.splitlines():
        m = HEADER.match(raw)
        if m:
            diags.append(
                Diag(m["path"], int(m["line"]), int(m["col"]), m["sev"], m["code"], m["msg"], [])
            )
        elif diags:
            diags[-1].body.append(raw)
    return diags


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def compile_plan(path: Path, cwd: Path | None = None) -> dict:
    res = riprap("compile", path, cwd=cwd)
    assert res.rc == 0, f"compile failed rc={res.rc}\n{res.err}"
    return json.loads(res.out)


def errors(res: Result) -> list[Diag]:
    return [d for d in parse_diags(res.text) if d.sev == "error"]


def warnings(res: Result) -> list[Diag]:
    return [d for d in parse_diags(res.text) if d.sev == "warning"]


@pytest.fixture
def checkout_copy(tmp_path: Path) -> Path:
    """A private copy of the contract's example (with its fallbacks/ directory)."""
    if not CHECKOUT.exists():
        pytest.skip(f"{CHECKOUT} is missing")
    dst = tmp_path / "contract"
    shutil.copytree(CONTRACT_DIR, dst)
    return dst / "checkout.riprap"


def run_scenarios(base: Path, scenarios: dict, workers: int = 4) -> dict[str, Result]:
    """Write each scenario's files into base/NAME and run `riprap ARGS...` there, concurrently.

    scenarios: name -> ({relative path: text or bytes}, [riprap arguments]).
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(item):
        name, (files, args) = item
        d = base / name
        d.mkdir(parents=True, exist_ok=True)
        for rel, text in files.items():
            if isinstance(text, bytes):
                (d / rel).parent.mkdir(parents=True, exist_ok=True)
                (d / rel).write_bytes(text)
            else:
                write(d, rel, text)
        return name, riprap(*args, cwd=d)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(one, scenarios.items()))


def plan_of(res: Result) -> dict:
    """The plan a `riprap compile` run printed (it must have succeeded)."""
    assert res.rc == 0, f"compile failed rc={res.rc}\n{res.err}"
    return json.loads(res.out)


def narrow(res: Result, files: list[str]) -> Result:
    """The diagnostics of `res` (text format) that belong to `files` (by file name)."""
    keep, out = False, []
    for raw in res.err.splitlines() + res.out.splitlines():
        m = HEADER.match(raw)
        if m:
            keep = Path(m["path"]).name in files
        elif not raw.startswith((" ", "\t")) and raw.strip():
            keep = False
        if keep:
            out.append(raw)
    return Result(res.rc, "", "\n".join(out))


def group_checks(scenarios: dict, names: list[str], group: str) -> dict[str, list[str]]:
    """Move the `check FILE...` scenarios `names` into one scenario `group` (one run).

    Their files must have distinct names and share no service or app names. Returns
    name -> its files, for `ungroup`.
    """
    files: dict = {}
    members: dict[str, list[str]] = {}
    for name in names:
        f, args = scenarios.pop(name)
        assert args[0] == "check" and len(args) == 1 + len(f), (name, args)
        assert not set(f) & set(files), name
        members[name] = [Path(k).name for k in f]
        files.update(f)
    scenarios[group] = (files, ["check", *sorted(files)])
    return members


def ungroup(results: dict[str, Result], members: dict[str, list[str]], group: str) -> dict[str, Result]:
    """Give each grouped scenario its own result: the group's, narrowed to its files.

    Its `rc` is the group's; tests of grouped scenarios look at their own diagnostics.
    """
    for name, files in members.items():
        results[name] = narrow(results[group], files)
    return results
