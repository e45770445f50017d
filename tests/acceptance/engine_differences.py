"""What the Envoy engine does differently, in one place, for the acceptance suites.

Section 11: "Sections 4 to 6 and 9 hold on both engines"; where Envoy cannot do exactly what
a statement says, the engine does the closest thing and `check`/`run --engine envoy` warn.
Every acceptance test runs once per engine (`conftest.py` parametrizes `engine`). A test
whose assertion does not hold on Envoy is marked `@pytest.mark.envoy_differs(KEY)`: on
the Envoy engine it is skipped with the text below as the reason, so that each skip names
a difference listed here, documented in docs/engines.md, and (when `warning` is set)
printed by `riprap check --engine envoy` for the statement.
"""

from __future__ import annotations

from typing import NamedTuple


class Difference(NamedTuple):
    what: str  # what differs on the Envoy engine, in words
    warning: str | None  # a text `check --engine envoy` prints for it; None: engine-wide (docs)


ENVOY_DIFFERENCES: dict[str, Difference] = {
    "concurrency-queue-timeout": Difference(
        "a queued call waits until a slot frees (or its timeout), not at most queue-timeout: "
        "Envoy's pending requests have no wait bound of their own",
        "a queued call waits until a slot frees or its timeout, not at most `queue-timeout` "
        "(Envoy's pending requests have no wait bound of their own)"),
    "retry-wait-with-per-try": Difference(
        "with a per-try time (or a hedge) Envoy waits between attempts itself: a fully "
        "jittered backoff whatever the jitter, and a Retry-After rounded up to whole seconds "
        "(Envoy runs the per-try timer from the start of an attempt, through any wait riprap's "
        "upstream filter would make)",
        "with a per-try time or a hedge, Envoy waits between attempts itself: a fully jittered "
        "backoff, and a Retry-After rounded up to whole seconds (plus up to half of it)"),
    "limit-reload-refills": Difference(
        "a reload that changes any service's local limit starts every local bucket full again "
        "(Envoy's local rate limit filter is configured as one whole)",
        "a reload that changes any service's local limit starts every local bucket full again "
        "(Envoy's local rate limit filter is configured as one whole); other reloads keep them"),
}


def reason(key: str) -> str:
    """The skip reason for difference KEY (a KeyError names a difference not listed)."""
    return f"envoy engine differs ({key}): {ENVOY_DIFFERENCES[key].what}"
