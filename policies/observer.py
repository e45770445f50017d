"""What the engine tells the outside world about each call (metrics, logs).

The engine never imports prometheus or the sidecar: it calls an `Observer`, and the
sidecar passes one that feeds prometheus-client. `NullObserver` is the default.
Every method must be cheap and must never raise: it runs on the hot path.
"""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    def call_finished(
        self,
        service: str,
        outcome: str,  # "ok" | "upstream-5xx" | "upstream-4xx" | an x-riprap-reason value
        status: int,
        attempts: int,
        duration: float,
        fallback: str | None,  # "static" | "stale" | "service" | None
    ) -> None: ...

    def attempt_finished(
        self, service: str, endpoint: str, outcome: str, latency: float
    ) -> None: ...

    def retried(self, service: str) -> None: ...

    def retry_refused(self, service: str, why: str) -> None: ...  # "budget" | "deadline"

    def hedged(self, service: str) -> None: ...

    def breaker_changed(self, service: str, shard: str | None, state: str) -> None: ...

    def ejected(self, service: str, endpoint: str) -> None: ...

    def rejected(self, service: str, by: str) -> None: ...  # "limit" | "concurrency"

    def health_changed(self, service: str, endpoint: str, healthy: bool) -> None: ...

    def dns_lookup(
        self, service: str, shard: str | None, line: str, result: str, addresses: int
    ) -> None: ...  # result: policies.discovery.RESULTS; addresses: the line's count after it


class NullObserver:
    """Observes nothing; the default for in-process use."""

    def call_finished(self, service: str, outcome: str, status: int, attempts: int,
                      duration: float, fallback: str | None) -> None:
        pass

    def attempt_finished(self, service: str, endpoint: str, outcome: str, latency: float) -> None:
        pass

    def retried(self, service: str) -> None:
        pass

    def retry_refused(self, service: str, why: str) -> None:
        pass

    def hedged(self, service: str) -> None:
        pass

    def breaker_changed(self, service: str, shard: str | None, state: str) -> None:
        pass

    def ejected(self, service: str, endpoint: str) -> None:
        pass

    def rejected(self, service: str, by: str) -> None:
        pass

    def health_changed(self, service: str, endpoint: str, healthy: bool) -> None:
        pass

    def dns_lookup(self, service: str, shard: str | None, line: str, result: str,
                   addresses: int) -> None:
        pass
