"""Every difference the acceptance suites allow on Envoy is one the user is told about.

Section 11: where Envoy cannot do exactly what a statement says, `riprap check --engine
envoy` prints a warning naming the statement and what differs. The suites skip or relax a
test on Envoy only for a key of engine_differences.py; this file holds each key to a
warning that `check --engine envoy` really prints for a file using the statement, and to
a line of docs/engines.md."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from acc_kit import riprap_cmd
from engine_differences import ENVOY_DIFFERENCES

# a service whose statements bring every listed difference into play
POLICY = """\
service a {
    endpoint http://127.0.0.1:9001
    timeout 2s
    concurrency 4 queue 2 queue-timeout 200ms
    retry 2 on 503 backoff 10ms..100ms per-try 300ms budget 20%
    limit 10/s
}
"""


@pytest.fixture(scope="module")
def warnings(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("diffs") / "d.riprap"
    path.write_text(POLICY, encoding="utf-8")
    done = subprocess.run([*riprap_cmd(), "check", "--engine", "envoy", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr  # warnings only: never refused
    return _words(done.stdout + done.stderr)


def _words(text: str) -> str:
    """Whitespace and code quotes aside (`run` logs the notes plain, `check` quotes names)."""
    return " ".join(text.replace("`", "").split())


@pytest.mark.parametrize("key", sorted(k for k, d in ENVOY_DIFFERENCES.items() if d.warning))
def test_each_listed_difference_is_a_check_warning(key: str, warnings: str) -> None:
    text = ENVOY_DIFFERENCES[key].warning
    assert text is not None
    assert _words(text) in warnings, (key, warnings)
    assert "warning[RP501]" in warnings


def test_the_python_engine_has_none_of_them(tmp_path: Path) -> None:
    path = tmp_path / "d.riprap"
    path.write_text(POLICY, encoding="utf-8")
    done = subprocess.run([*riprap_cmd(), "check", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert "RP501" not in done.stdout + done.stderr

