"""RP302 says what the user wrote: an unset timeout is not called `timeout 15s`."""

from __future__ import annotations

from dsl.compiler import compile_source


def _rp302(text: str) -> list[str]:
    unit = compile_source(text, "t.riprap")
    return [d.message for d in unit.diagnostics if d.code == "RP302"]


def test_a_service_with_no_timeout_is_told_the_built_in_default_applies() -> None:
    msgs = _rp302("service a {\n    endpoint http://127.0.0.1:9001\n}\n")
    assert msgs == ["service 'a': no timeout below the built-in default of 15s: a call may wait that long"]


def test_a_written_timeout_above_the_default_is_named() -> None:
    msgs = _rp302("service a {\n    endpoint http://127.0.0.1:9001\n    timeout 20s\n}\n")
    assert msgs == ["service 'a': timeout 20s is not below the built-in default of 15s"]


def test_a_timeout_in_defaults_silences_it_for_every_service() -> None:
    text = ("defaults {\n    timeout 2s\n}\n"
            "service a {\n    endpoint http://127.0.0.1:9001\n}\n"
            "service b {\n    endpoint http://127.0.0.1:9002\n}\n")
    assert _rp302(text) == []
