"""The shared store of `limit ... shared`: one pooled Redis client per `store` URL, guarded.

Why it looks like this:

- **One atomic operation per call.** A shared bucket is one Lua script (`BUCKET_LUA`, run
  with EVALSHA through redis-py's `register_script`), a GCRA: the key holds the bucket's
  theoretical arrival time (TAT) in microseconds of the *store's* clock
  (`redis.call('TIME')`), so sidecar clocks never matter. It has exactly the local
  token bucket's semantics (`policies.limiter`): rate R, burst B (at least 1), the bucket
  starts full (no key = full), and a refused call learns the time until the next token.
  The key expires once the bucket is full again (plus a margin), so an idle bucket costs
  the store nothing, and its expiry changes no answer.
- **Never a slow call because of the store.** Every operation has a tight deadline
  (`timeout`, 50 ms by default, an `asyncio.timeout` around the whole operation, the
  connection included; a cancelled command makes redis-py drop that connection; no
  socket timeouts of redis-py's, which would cost a task per command), and
  redis-py's own retries are off. A failure marks the store down (a missed deadline:
  the second in a row, so one stall of a busy machine is not an outage); while it is
  down no call asks it at all (the callers fall back to their local share at once), and
  a background task probes it every `probe` seconds until it answers again.
- **Presence.** The same background task refreshes, every `heartbeat` seconds, this
  sidecar's entry in a sorted set per shared bucket (`PRESENCE_LUA`: member = the
  sidecar's id, score = the store's time), drops entries older than `window` (60 s) and
  learns how many sidecars share each bucket: the divisor of the local fallback share.
  This never runs on a call's path.
- **Pooling.** One `redis.asyncio.Redis` (hiredis parser when installed) per URL, shared
  by every plan that names the URL (`StoreHub`), and closed a little after the last plan
  using it is gone, so a reload that changes the URL reconnects without failing calls
  (calls in flight finish against the old pool).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from policies.redact import redact

log = logging.getLogger("riprap.store")

SCHEMES = ("redis", "rediss")

# GCRA. KEYS[1]: the bucket. ARGV[1]: microseconds per token (1e6 / rate).
# ARGV[2]: tau = burst * interval (microseconds). ARGV[3]: expiry margin (ms).
# ARGV[4]: tokens to take (1 per call; Envoy may send a `hits_addend`).
# Returns 0 when the tokens were taken, else the microseconds until they are there.
# A token exists when the TAT after this call is within tau of now; the 1 us slack is
# the local bucket's `_ALMOST_ONE` (waiting exactly the reported time must succeed).
BUCKET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local new_tat = tat + interval * tonumber(ARGV[4])
local early = new_tat - tau - now
if early > 1 then
  return math.ceil(early)
end
local ttl = math.ceil((new_tat - now) / 1000) + tonumber(ARGV[3])
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl)
return 0
"""

# Presence. KEYS: one sorted set per shared bucket. ARGV[1]: this sidecar's id.
# ARGV[2]: the window (ms). Returns, per key, the sidecars seen in the window.
PRESENCE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
local out = {}
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  redis.call('PEXPIRE', key, window * 2)
  out[i] = redis.call('ZCARD', key)
end
return out
"""

ERROR_KINDS = ("timeout", "connection", "auth", "response", "other")

# one bucket step waiting for its batch: key, interval, tau, cost, the caller's future
_Step = tuple[str, float, float, int, "asyncio.Future[float | None]"]


def check_store_url(url: str) -> str:
    """`url` itself when it is a `redis://` or `rediss://` URL with a host, else ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(
            f"store {redact(url)!r}: expected a redis:// or rediss:// URL, not {parts.scheme or 'no'} scheme")
    if not parts.hostname:
        raise ValueError(f"store {redact(url)!r}: the URL names no host")
    return url


def error_kind(exc: BaseException) -> str:
    """What kind of store failure `exc` is: one of `ERROR_KINDS`."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, rexc.TimeoutError)):
        return "timeout"
    if isinstance(exc, (rexc.AuthenticationError, rexc.AuthorizationError)):
        return "auth"
    if isinstance(exc, (rexc.ConnectionError, OSError)):
        return "connection"
    if isinstance(exc, rexc.ResponseError):
        return "response"
    return "other"


def new_sidecar_id() -> str:
    """A readable id that is unique per process and hub: host, pid and a random tail."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Store:
    """One store URL: its pooled client, the bucket script, its health and presence.

    `up` is read on every shared-limit call: while it is False nobody asks the store.
    Counters (`errors`) and shares are plain values read by `/state` and the metrics.
    """

    def __init__(self, url: str, sidecar_id: str, *, timeout: float = 0.05,
                 heartbeat: float = 2.0, probe: float = 0.25, window: float = 60.0,
                 margin_ms: int = 1000, max_connections: int = 256,
                 errors: dict[str, int] | None = None) -> None:
        check_store_url(url)
        self.url = url
        self.label = redact(url)
        self.sidecar_id = sidecar_id
        self.timeout = timeout
        self.beat_timeout = max(0.5, timeout * 4)  # off the call path: looser
        self.heartbeat = heartbeat
        self.probe = probe
        self.window = window
        self.margin_ms = margin_ms
        # Every operation runs inside an asyncio.timeout of ours (a call's `timeout`, a
        # beat's looser one), so redis-py's per-read/write socket timeout is off: with one
        # set it wraps every write in asyncio.wait_for, a task per command on Python 3.11.
        # The connect timeout is only a backstop.
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=None, socket_connect_timeout=self.beat_timeout * 2,
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0,
            max_connections=max_connections)
        self._bucket = self.client.register_script(BUCKET_LUA)
        self._presence = self.client.register_script(PRESENCE_LUA)
        self.up = True  # optimistic until an operation or the first heartbeat says otherwise
        self.checked = False  # has the store answered (or failed) at least once?
        self.last_error: str | None = None
        self.changed_at = time.time()
        # errors by kind; a hub passes its own dict so the totals outlive one URL's store
        self.errors: dict[str, int] = errors if errors is not None else {}
        self._members: dict[str, int] = {}  # presence key -> how many users joined it
        self.shares: dict[str, int] = {}  # presence key -> sidecars seen in the window
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Step] = []  # bucket steps of this loop turn, sent together
        self._inflight = 0  # steps sent alone, not answered yet
        self._sending: set[asyncio.Task[None]] = set()
        self._closed = False
        self._last_beat = -math.inf
        self._joined = False
        self._loaded = False  # has a beat loaded the bucket script?
        self._late = 0  # calls in a row that missed their deadline
        self._gone: set[str] = set()  # presence sets left, this sidecar still to be removed

    # -- the call path ---------------------------------------------------------------

    async def take(self, key: str, interval_us: float, tau_us: float,
                   cost: int = 1) -> float | None:
        """One GCRA step on `key`: 0.0 when `cost` tokens were taken, else the seconds until
        they are there; None when the store did not answer in time (the caller falls back).

        A step with nobody else waiting is sent at once. The steps asked for while one
        is in flight go to the store together, one pipeline per turn of the event loop on
        one connection (each still its own atomic script): under concurrency a sidecar
        makes one round trip per loop turn, not one per call, and does not open a
        connection per call in flight."""
        if self._task is None:
            self.start()
        if not self._pending and not self._inflight:
            return await self._alone(key, interval_us, tau_us, cost)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[float | None] = loop.create_future()
        pending = self._pending
        if not pending:
            loop.call_soon(self._flush)
        pending.append((key, interval_us, tau_us, cost, fut))
        return await fut

    async def _alone(self, key: str, interval_us: float, tau_us: float,
                     cost: int) -> float | None:
        """The step of a call with nobody else waiting: sent at once, in the caller's task
        (the calls that arrive meanwhile form the next batch)."""
        self._inflight += 1
        try:
            async with asyncio.timeout(self.timeout):
                wait = await self._bucket(keys=(key,), args=(interval_us, tau_us, self.margin_ms,
                                                             cost))
        except Exception as exc:  # noqa: BLE001 - any failure: fall back, never fail the call
            self._failed(exc, call=True)
            return None
        finally:
            self._inflight -= 1
        self._late = 0
        if not self.checked:
            self._set_up(True)
        return int(wait) / 1e6 if wait else 0.0

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            assert self._loop is not None
            task = self._loop.create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Step]) -> None:
        """Run the batch's steps within the deadline; every caller gets an answer or None."""
        results: list[Any] = []
        try:
            async with asyncio.timeout(self.timeout):
                results = await self._pipeline(batch)
                missing = [i for i, r in enumerate(results) if isinstance(r, rexc.NoScriptError)]
                if missing:  # a restarted store forgot the script: load it, send those again
                    await self.client.script_load(BUCKET_LUA)
                    again = await self._pipeline([batch[i] for i in missing])
                    for i, r in zip(missing, again, strict=True):
                        results[i] = r
        except Exception as exc:  # noqa: BLE001 - any failure: fall back, never fail the call
            self._failed(exc, call=True)
            results = []
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            self._failed(errors[0], call=True)
        elif results:
            self._late = 0
            if not self.checked:
                self._set_up(True)
        for i, step in enumerate(batch):
            fut = step[4]
            if fut.done():
                continue
            r = results[i] if i < len(results) else None
            if r is None or isinstance(r, Exception):
                fut.set_result(None)
            else:
                fut.set_result(int(r) / 1e6 if r else 0.0)

    async def _pipeline(self, batch: list[_Step]) -> list[Any]:
        sha, margin = self._bucket.sha, self.margin_ms
        pipe = self.client.pipeline(transaction=False)
        for key, interval_us, tau_us, cost, _fut in batch:
            pipe.evalsha(sha, 1, key, interval_us, tau_us, margin, cost)
        return await pipe.execute(raise_on_error=False)

    # -- presence --------------------------------------------------------------------

    def join(self, key: str) -> None:
        """Count this sidecar among the users of bucket `key` (refcounted)."""
        self._gone.discard(key)
        if key not in self._members:
            self._joined = True  # learn its share at the next tick, not a heartbeat later
        self._members[key] = self._members.get(key, 0) + 1
        self.shares.setdefault(key, 1)

    def leave(self, key: str) -> None:
        count = self._members.get(key, 0) - 1
        if count > 0:
            self._members[key] = count
        else:
            self._members.pop(key, None)
            self.shares.pop(key, None)
            self._gone.add(key)  # leave its presence set at the next tick (or on close)

    def share(self, key: str) -> int:
        """Sidecars seen sharing `key` in the last window (at least 1)."""
        return max(1, self.shares.get(key, 1))

    # -- health ------------------------------------------------------------------------

    def _failed(self, exc: BaseException, *, call: bool = False) -> None:
        kind = error_kind(exc)
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.last_error = f"{kind}: {exc!r}"[:200]
        if call and kind == "timeout":
            # One late answer on a busy machine is not an outage: that call alone falls
            # back; a second one in a row (a paused or swamped store) marks it down.
            self._late += 1
            if self._late < 2:
                return
        self._set_up(False)

    def _set_up(self, up: bool) -> None:
        first = not self.checked
        self.checked = True
        if up == self.up and not first:
            return
        changed = up != self.up
        self.up = up
        if changed:
            self.changed_at = time.time()
        if up and changed:
            log.warning("store %s answers again: shared limits use the shared buckets", self.label)
        elif not up:
            log.warning("store %s is down (%s): each sidecar enforces its local share of the "
                        "shared limits until it answers", self.label, self.last_error)
        elif first:
            log.info("store %s is up", self.label)

    async def beat(self) -> bool:
        """Refresh presence (or just ping) within `beat_timeout`; True when the store answered.

        Off the call path, so its deadline is looser than a call's: a beat also connects
        and loads the bucket script (the calls then never meet NOSCRIPT), and a sidecar
        that is busy starting up must not report a healthy store as down."""
        keys = tuple(self._members)
        try:
            async with asyncio.timeout(self.beat_timeout):
                if not self._loaded:
                    await self.client.script_load(BUCKET_LUA)
                    self._loaded = True
                if keys:
                    counts = await self._presence(
                        keys=keys, args=(self.sidecar_id, int(self.window * 1000)))
                else:
                    await self.client.ping()
                    counts = []
        except Exception as exc:  # noqa: BLE001 - a failed beat is a down store
            self._loaded = False  # a restarted store has forgotten the script
            self._failed(exc)
            return False
        for key, count in zip(keys, counts, strict=False):
            if key in self._members:
                self.shares[key] = max(1, int(count))
        self._last_beat = time.monotonic()
        self._late = 0
        self._set_up(True)
        return True

    def start(self) -> None:
        """Start the heartbeat and probe task (idempotent; needs a running loop)."""
        if self._task is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._run(), name=f"riprap-store-{self.label}")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: "asyncio.Task[None]") -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("store %s: the heartbeat stopped: %r", self.label, task.exception())

    async def _run(self) -> None:
        # Ticks every `probe` seconds (cheap); asks the store only when a beat is due, a
        # bucket was joined, or the store is down (the probe that brings it back).
        while True:
            if (not self.up or not self.checked or self._joined
                    or time.monotonic() >= self._last_beat + self.heartbeat):
                self._joined = False
                await self.beat()
            if self._gone and self.up:
                await self._leave_gone()
            await asyncio.sleep(self.probe)

    async def _leave_gone(self) -> None:
        gone = tuple(self._gone)
        try:
            async with asyncio.timeout(self.beat_timeout):
                pipe = self.client.pipeline(transaction=False)
                for key in gone:
                    pipe.zrem(key, self.sidecar_id)
                await pipe.execute()
        except Exception:  # noqa: BLE001 - leaving is a courtesy; the window expires us
            log.debug("store %s: could not leave the presence sets", self.label)
            return
        self._gone.difference_update(gone)

    async def aclose(self) -> None:
        """Stop the task, leave the presence sets (best effort), close the pool."""
        self._closed = True
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._gone.update(self._members)
        if self.up and self._gone:
            await self._leave_gone()
        await self.client.aclose()

    def snapshot(self) -> dict[str, Any]:
        return {
            "url": self.label,
            "up": self.up,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.changed_at)),
            "last_error": self.last_error,
            "sidecar_id": self.sidecar_id,
            "sharing": dict(sorted(self.shares.items())),
        }


class StoreHub:
    """The stores of one sidecar (or one rate limit service): one `Store` per URL.

    `acquire(url, keys)` hands out the URL's store (created on first use) and joins the
    presence keys; `release(store, keys)` undoes it, and a store no plan uses any more is
    closed `grace` seconds later (calls in flight on the old plan finish against it).
    """

    def __init__(self, *, timeout: float = 0.05, heartbeat: float = 2.0, probe: float = 0.25,
                 window: float = 60.0, grace: float = 2.0, sidecar_id: str | None = None) -> None:
        self.sidecar_id = sidecar_id or new_sidecar_id()
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.probe = probe
        self.window = window
        self.grace = grace
        self.errors: dict[str, int] = {}  # by kind, over every store this hub had
        self._stores: dict[str, Store] = {}
        self._refs: dict[str, int] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.current: Store | None = None  # the store of the plan acquired last

    def acquire(self, url: str, keys: tuple[str, ...] = ()) -> Store:
        store = self._stores.get(url)
        if store is None:
            store = self._stores[url] = Store(
                url, self.sidecar_id, timeout=self.timeout, heartbeat=self.heartbeat,
                probe=self.probe, window=self.window, errors=self.errors)
            store.start()
        self._refs[url] = self._refs.get(url, 0) + 1
        for key in keys:
            store.join(key)
        self.current = store
        return store

    def release(self, store: Store, keys: tuple[str, ...] = ()) -> None:
        for key in keys:
            store.leave(key)
        url = store.url
        refs = self._refs.get(url, 0) - 1
        if refs > 0:
            self._refs[url] = refs
            return
        self._refs.pop(url, None)
        if self.current is store:
            self.current = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: aclose() closes it
        loop.call_later(self.grace, self._close_if_unused, url, store)

    def _close_if_unused(self, url: str, store: Store) -> None:
        if self._refs.get(url) or self._stores.get(url) is not store:
            return
        del self._stores[url]
        if self.current is store:
            self.current = None
        task = asyncio.get_running_loop().create_task(store.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def start(self) -> None:
        for store in self._stores.values():
            store.start()

    async def aclose(self) -> None:
        stores = list(self._stores.values())
        self._stores.clear()
        self._refs.clear()
        self.current = None
        await asyncio.gather(*(s.aclose() for s in stores), *self._closing,
                             return_exceptions=True)

    @property
    def stores(self) -> list[Store]:
        return list(self._stores.values())

    def status(self) -> tuple[bool | None, dict[str, int]]:
        """For the metrics: is the current plan's store up (None: no store), errors by kind."""
        current = self.current
        return (current.up if current is not None else None), self.errors

    def snapshot(self) -> dict[str, Any] | None:
        current = self.current
        if current is None:
            return None
        snap = current.snapshot()
        snap["errors"] = dict(self.errors)
        return snap


__all__ = ["BUCKET_LUA", "ERROR_KINDS", "PRESENCE_LUA", "Store", "StoreHub", "check_store_url",
           "error_kind", "redact"]
