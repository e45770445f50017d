"""What compiling one policy file yields, for the CLI and for mesh analysis."""

from __future__ import annotations

from dataclasses import dataclass, field

from dsl.diagnostics import Diagnostic, Span
from dsl.plan import Plan


@dataclass(frozen=True)
class CompiledUnit:
    """One file's compile result.

    `plan` is None when the file had errors. `service_spans` locates each `service`
    statement and `app_span` the `app` statement (or line 1 when the app is the file's
    stem), so mesh findings can point at the line that causes them. `resolved` is the
    plan when there is one; for a file with errors, the partial plan of the services its
    errors leave intact (dsl.compiler.intact_services), so one-file findings are still
    made on them: `findings` holds the compiler's (RP301-RP303) and dsl.analysis adds its
    own. Only `plan` is ever run or joined into a mesh. `statement_spans` locates the line
each directive of a service's resolved policy came from.
    """

    path: str
    source: str
    plan: Plan | None
    diagnostics: tuple[Diagnostic, ...] = ()
    app_span: Span | None = None
    service_spans: dict[str, Span] = field(default_factory=dict)
    resolved: Plan | None = None
    findings: tuple[Diagnostic, ...] = ()
    # service -> directive ("retry", or "hedge at" for a form) -> the line in force, for
    # findings about a resolved statement (`check --engine`, dsl/engines.py)
    statement_spans: dict[str, dict[str, Span]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.plan is not None and not any(d.is_error for d in self.diagnostics)
