"""`riprap demo`: the end-to-end demonstration (see docs/demo.md).

`dsl/cli.py` hands the argv after `demo` to `main`. The heavy imports stay inside it so
that importing the package costs nothing.
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    """Run the demo; returns the process exit code."""
    from sidecar.demo.cli import main as run

    return run(list(argv))


__all__ = ["main"]
