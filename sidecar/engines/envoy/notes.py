"""Where Envoy does the closest thing rather than exactly what a statement says."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineNote:
    """One approximation: the service (or `*` for the whole plan), the statement, what differs."""

    service: str
    statement: str
    differs: str


class NoteSink:
    """Collects notes once each; hands them out by service and statement."""

    def __init__(self) -> None:
        self._notes: dict[tuple[str, str, str], EngineNote] = {}

    def add(self, service: str, statement: str, differs: str) -> None:
        note = EngineNote(service, statement, differs)
        self._notes.setdefault((service, statement, differs), note)

    def notes(self) -> tuple[EngineNote, ...]:
        return tuple(sorted(self._notes.values(), key=lambda n: (n.service, n.statement)))


__all__ = ["EngineNote", "NoteSink"]
