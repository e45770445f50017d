"""The observer as the engine calls it: every event forwarded, every error swallowed.

Metrics must never break a call, so the runtime only ever holds a `SafeObserver`.
"""

from __future__ import annotations

import logging

from policies.observer import NullObserver, Observer

log = logging.getLogger("riprap.policies")


class SafeObserver:
    """Forwards to an Observer and swallows its errors: metrics never break a call."""

    __slots__ = ("_o",)

    def __init__(self, observer: Observer | None) -> None:
        self._o = observer if observer is not None else NullObserver()

    def _fail(self, exc: Exception) -> None:
        log.warning("observer failed: %r", exc)

    def call_finished(self, service: str, outcome: str, status: int, attempts: int,
                      duration: float, fallback: str | None) -> None:
        try:
            self._o.call_finished(service, outcome, status, attempts, duration, fallback)
        except Exception as exc:  # noqa: BLE001 - the observer must never break a call
            self._fail(exc)

    def attempt_finished(self, service: str, endpoint: str, outcome: str,
                         latency: float) -> None:
        try:
            self._o.attempt_finished(service, endpoint, outcome, latency)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def retried(self, service: str) -> None:
        try:
            self._o.retried(service)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def retry_refused(self, service: str, why: str) -> None:
        try:
            self._o.retry_refused(service, why)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def hedged(self, service: str) -> None:
        try:
            self._o.hedged(service)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def breaker_changed(self, service: str, shard: str | None, state: str) -> None:
        try:
            self._o.breaker_changed(service, shard, state)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def ejected(self, service: str, endpoint: str) -> None:
        try:
            self._o.ejected(service, endpoint)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def rejected(self, service: str, by: str) -> None:
        try:
            self._o.rejected(service, by)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def health_changed(self, service: str, endpoint: str, healthy: bool) -> None:
        try:
            self._o.health_changed(service, endpoint, healthy)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def dns_lookup(self, service: str, shard: str | None, line: str, result: str,
                   addresses: int) -> None:
        # off the call path (one per lookup); observers older than discovery lack it
        method = getattr(self._o, "dns_lookup", None)
        if method is None:
            return
        try:
            method(service, shard, line, result, addresses)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)


__all__ = ["SafeObserver"]
