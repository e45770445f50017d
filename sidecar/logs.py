"""Logging: human-readable lines by default, an opt-in JSON access log (one line per call).

Access-log lines go through a bounded queue to a writer thread, so a slow reader of
stdout never blocks the event loop (lines beyond the bound are dropped, not queued).

The access log is assembled from what the engine already reports (the `Observer` calls):
the last endpoint an attempt went to, the attempt count, the outcome and the duration.
The proxy opens a `CallRecord` per call and the observer fills it through a contextvar,
so nothing is parsed from headers and nothing is kept once the line is written.
"""

from __future__ import annotations

import atexit
import contextvars
import json
import logging
import queue
import sys
import time
from dataclasses import dataclass
from logging.handlers import QueueHandler, QueueListener
from typing import Any

ACCESS_LOGGER = "riprap.access"
ACCESS_QUEUE_SIZE = 10_000  # lines waiting for stdout; beyond this, lines are dropped
_listener: QueueListener | None = None


class DroppingQueueHandler(QueueHandler):
    """Hands access-log lines to a writer thread; never blocks the event loop.

    A slow stdout consumer (a full pipe) must not stall calls: when the queue is full the
    line is dropped and counted in `dropped`.
    """

    def __init__(self, q: "queue.Queue[logging.LogRecord]") -> None:
        super().__init__(q)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # the message is already a finished JSON line

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
_current: contextvars.ContextVar["CallRecord | None"] = contextvars.ContextVar(
    "riprap_call", default=None)


def setup_logging(level: str = "info") -> None:
    """Human logs on stderr: `2026-01-01T10:00:00Z riprap INFO message`."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s",
                            datefmt="%Y-%m-%dT%H:%M:%S")
    handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    # "Started server process" twice, and one line per file event: noise for an operator.
    if numeric > logging.DEBUG:
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        logging.getLogger("watchfiles").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per health probe
    global _listener
    access = logging.getLogger(ACCESS_LOGGER)
    access.propagate = False
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    lines: "queue.Queue[logging.LogRecord]" = queue.Queue(ACCESS_QUEUE_SIZE)
    access.handlers[:] = [DroppingQueueHandler(lines)]
    access.setLevel(logging.INFO)
    if _listener is not None:
        _listener.stop()
    _listener = QueueListener(lines, out)
    _listener.start()
    atexit.register(stop_logging)


def stop_logging() -> None:
    """Write out the access-log lines still queued (at exit)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


_stamp: list[Any] = [-1, ""]  # [unix second, its ISO-8601 text]


def _utc_stamp() -> str:
    """`2026-01-01T10:00:00Z` for now; formatted once per second, not once per line."""
    now = int(time.time())
    if now != _stamp[0]:
        _stamp[1] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        _stamp[0] = now
    return _stamp[1]  # type: ignore[no-any-return]


@dataclass(slots=True)
class CallRecord:
    """What one call's access-log line says; filled while the call runs."""

    method: str
    path: str
    service: str
    start: float
    endpoint: str | None = None
    attempts: int = 0
    outcome: str | None = None
    status: int = 0
    fallback: str | None = None
    seen: int = 0  # attempts that finished, counted as they do (for a call cut short)


class AccessLog:
    """Writes one JSON line per call to the `riprap.access` logger (stdout)."""

    def __init__(self) -> None:
        self.logger = logging.getLogger(ACCESS_LOGGER)

    def begin(self, method: str, path: str, service: str) -> tuple[CallRecord, contextvars.Token["CallRecord | None"]]:
        rec = CallRecord(method, path, service, time.monotonic())
        return rec, _current.set(rec)

    def end(self, rec: CallRecord, token: contextvars.Token["CallRecord | None"], status: int,
            outcome: str | None = None, attempts: int | None = None) -> None:
        _current.reset(token)
        line = {
            "ts": _utc_stamp(),
            "service": rec.service,
            "method": rec.method,
            "path": rec.path,
            "status": status,
            "endpoint": rec.endpoint,
            "attempts": rec.attempts if attempts is None else attempts,
            "outcome": outcome or rec.outcome or ("ok" if status < 500 else "error"),
            "fallback": rec.fallback,
            "duration_ms": round((time.monotonic() - rec.start) * 1000, 3),
        }
        self.logger.info(json.dumps(line, separators=(",", ":")))


class AccessObserver:
    """The Observer half of the access log: records endpoint/attempts/outcome per call."""

    def attempt_finished(self, service: str, endpoint: str, outcome: str, latency: float) -> None:
        rec = _current.get()
        if rec is not None:
            rec.endpoint = endpoint
            rec.seen += 1

    def call_finished(self, service: str, outcome: str, status: int, attempts: int,
                      duration: float, fallback: str | None) -> None:
        rec = _current.get()
        if rec is not None and rec.service == service:
            rec.outcome = outcome
            rec.attempts = attempts
            rec.status = status
            rec.fallback = fallback
