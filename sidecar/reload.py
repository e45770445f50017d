"""PlanHolder: the running plan, and how a new one replaces it (hot reload).

A reload is: compile and validate the file in a worker thread (the event loop keeps
serving), hand the new plan to `ResilientTransport.update` (which builds the new runtime
off the hot path, carries over the state of unchanged services and endpoints and swaps one
reference), then swap the routing table. Calls in flight finish on the runtime they
started with. A file that does not compile changes nothing: the diagnostics are logged,
shown at `/plan` as `last_error` and counted in `riprap_reloads_total{result="error"}`.

Watching: the *directories* holding the plan's files are watched (watchfiles, inotify),
not the files, because editors save by writing a temporary file and renaming it over the
original, and Kubernetes swaps a ConfigMap by re-pointing the `..data` symlink: in both
cases the watched file's inode changes and a file watch would go deaf. Any event in those
directories leads to a cheap fingerprint (the bytes of every watched file, read through
symlinks); only a changed fingerprint triggers a reload, so unrelated files in the same
directory cost a few reads and nothing else; with no event for 0.5 s the fingerprint is
taken anyway (a change that lands while the watcher restarts has no event of its own).
SIGHUP reloads unconditionally.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

import watchfiles

from dsl.diagnostics import Diagnostic, render_all_text, render_text
from dsl.plan import Plan
from policies.redact import redact
from sidecar.routing import Router

if TYPE_CHECKING:
    from policies.transport import ResilientTransport

log = logging.getLogger("riprap.reload")

LOAD_ERROR_CODE = "RP900"  # the plan could not be read or loaded at all (I/O, crash)


class PlanLoadError(Exception):
    """The plan source did not compile; `diagnostics` say why, `text` renders them."""

    def __init__(self, diagnostics: list[Diagnostic], text: str) -> None:
        super().__init__(text)
        self.diagnostics = diagnostics
        self.text = text


def compile_source(path: str) -> tuple[Plan, list[Diagnostic]]:
    """Compile a `.riprap` file or load a plan `.json`: the plan and its warnings.

    Raises PlanLoadError with every diagnostic when there is any error. Runs in a worker
    thread during reloads, so it may block.
    """
    try:
        from dsl.loader import load_plan_source

        unit = load_plan_source(path)
    except Exception as exc:  # noqa: BLE001 - an unreadable plan is a diagnostic, not a crash
        diag = Diagnostic(LOAD_ERROR_CODE, "error", None, f"cannot load plan {path}: {exc}")
        raise PlanLoadError([diag], render_all_text([diag])) from exc
    diags = list(unit.diagnostics)
    if unit.plan is None or any(d.is_error for d in diags):
        if not diags:
            diags = [Diagnostic(LOAD_ERROR_CODE, "error", None, f"{path}: no plan produced")]
        raise PlanLoadError(diags, render_all_text(diags, {unit.path: unit.source}))
    return unit.plan, diags


def fingerprint(paths: tuple[str, ...]) -> str:
    """A hash of the bytes of every file (through symlinks); missing files count as such."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode() + b"\0")
        try:
            with open(p, "rb") as f:
                h.update(f.read())
        except OSError as exc:
            h.update(f"<{type(exc).__name__}>".encode())
        h.update(b"\0")
    return h.hexdigest()


TransportFactory = Callable[[Plan], Any]


class PlanHolder:
    """The running plan, its transport and routing table, and how they are replaced."""

    def __init__(self, plan: Plan, transport: ResilientTransport, metrics: Any, *,
                 source_path: str | None = None, warnings: list[Diagnostic] | None = None,
                 on_supervise_change: Callable[[Plan], None] | None = None) -> None:
        self.plan = plan
        self.digest = plan.digest()
        self.router = Router(plan)
        self._transport = transport
        self.metrics = metrics
        self.source_path = source_path
        self.loaded_at = datetime.now(timezone.utc)
        self.last_error: list[dict[str, Any]] | None = None
        self.draining = False
        self.reloads = 0
        self.last_reload_seconds: float | None = None
        self.on_supervise_change = on_supervise_change
        self._lock = asyncio.Lock()
        self._applying: asyncio.Event | None = None  # set while an engine applies a new plan
        self._watch_task: asyncio.Task[None] | None = None
        self._stop_watch = asyncio.Event()
        self._watched: list[str] = []
        self._fingerprint = fingerprint(self.watch_paths())
        self._named = self._named_files(plan)
        metrics.plan_loaded_now(self.digest, plan.app)
        for w in warnings or ():
            log.warning("%s", render_text(w))

    def _named_files(self, plan: Plan) -> str:
        """The fingerprint of the files the plan names besides its source (TLS files,
        fallback files): when one changes, the runtime is rebuilt even if the plan is not."""
        source = os.path.abspath(self.source_path) if self.source_path else None
        return fingerprint(tuple(p for p in plan.watch if os.path.abspath(p) != source))

    @property
    def transport(self) -> ResilientTransport:
        return self._transport

    def watch_paths(self, plan: Plan | None = None) -> tuple[str, ...]:
        paths = list((plan or self.plan).watch)
        if self.source_path and self.source_path not in paths:
            paths.insert(0, self.source_path)
        return tuple(os.path.abspath(p) for p in paths)

    def watch_dirs(self) -> list[str]:
        """The directories to watch: each file's own, and its symlink target's.

        A symlinked policy file (dotfile managers, `ln -s`) is edited at its target, in
        another directory; a ConfigMap's files point into `..data`'s current timestamped
        directory. Both are watched; the set is recomputed after every reload.
        """
        dirs = set()
        for p in self.watch_paths():
            dirs.add(os.path.dirname(p) or ".")
            real = os.path.realpath(p)
            if real != p:
                dirs.add(os.path.dirname(real) or ".")
        return sorted(d for d in dirs if os.path.isdir(d))

    async def settled(self, timeout: float = 3.0) -> None:
        """Wait (bounded) for a plan the engine is applying right now: the Envoy engine
        puts a plan in force in steps (clusters, routes, listeners), and `/plan` should not
        show the old plan once calls already see the new one."""
        applying = self._applying
        if applying is not None:
            try:
                await asyncio.wait_for(applying.wait(), timeout)
            except TimeoutError:
                pass

    def plan_document(self) -> dict[str, Any]:
        plan = self.plan.to_dict()
        if plan.get("store"):
            plan["store"] = redact(plan["store"])  # the admin API has no authentication
        return {
            "plan": plan,
            "hash": self.digest,
            "loaded_at": self.loaded_at.isoformat(),
            "last_error": self.last_error,
        }

    # -- reloading ----------------------------------------------------------------------
    async def reload(self, trigger: str = "manual") -> bool:
        """Compile the source again and put it in force. True when the new plan runs."""
        try:
            return await self._reload(trigger)
        finally:
            if self._watch_task is not None and self.watch_dirs() != self._watched:
                self._stop_watch.set()  # the watcher restarts on the new directories

    async def _reload(self, trigger: str) -> bool:
        if self.source_path is None:
            log.info("reload (%s) ignored: the plan was not loaded from a file", trigger)
            return False
        async with self._lock:
            started = time.monotonic()
            # What is about to be read, taken BEFORE reading: a save that lands while this
            # reload compiles (an editor's truncate-then-write) then differs from it, and
            # the watcher reloads once more instead of keeping a half-written file's verdict.
            paths_before = self.watch_paths()
            before = fingerprint(paths_before)

            def seen(new: Plan | None = None) -> str:
                paths = self.watch_paths(new)
                return before if paths == paths_before else fingerprint(paths)

            try:
                plan, warnings = await asyncio.to_thread(compile_source, self.source_path)
            except PlanLoadError as exc:
                self.last_error = [d.to_dict() for d in exc.diagnostics]
                self.metrics.reloaded("error")
                log.error("reload (%s) failed; the running plan stays in force:\n%s",
                          trigger, exc.text)
                self._fingerprint = seen()
                return False
            for w in warnings:
                log.warning("%s", render_text(w))
            # The new plan's files, as they are now (just compiled): taken before the engine
            # applies the plan, which may take a while, so that a file changed meanwhile
            # (or deleted) is seen as a change once this reload is done.
            compiled = seen(plan)
            digest = plan.digest()
            old = self.plan
            named = self._named_files(plan)
            # The same plan, but a file it names changed (a rotated certificate): rebuild.
            if digest == self.digest and plan.watch == old.watch and named == self._named:
                self.last_error = None  # the file compiles again, to the plan in force
                self.metrics.reloaded("unchanged")
                self._fingerprint = compiled
                log.info("reload (%s): plan unchanged (%s)", trigger, digest[:12])
                return True
            if (plan.listen, plan.admin) != (old.listen, old.admin):
                log.warning("reload (%s): listen/admin addresses changed in the file; they "
                            "take effect on restart", trigger)
            applying = self._applying = asyncio.Event()
            try:
                await self._transport.update(plan)
            except Exception as exc:  # noqa: BLE001 - keep serving the old plan
                diag = Diagnostic(LOAD_ERROR_CODE, "error", None,
                                  f"the engine refused the new plan: {exc}")
                self.last_error = [diag.to_dict()]
                self.metrics.reloaded("error")
                log.exception("reload (%s) failed while building the new plan", trigger)
                return False
            finally:
                self._applying = None
                applying.set()  # (the plan below is swapped before any waiter runs again)
            # only now, with the new plan in force (the engine may take a while: Envoy
            # validates and applies it), is the last failure behind us
            self.last_error = None
            self.plan = plan
            self._named = named
            self.router = Router(plan)
            self.digest = digest
            self.loaded_at = datetime.now(timezone.utc)
            self.reloads += 1
            self.metrics.reloaded("ok")
            self.metrics.plan_loaded_now(digest, plan.app)
            self._fingerprint = compiled
            self.last_reload_seconds = time.monotonic() - started
            log.info("reload (%s): plan %s in force (%.0f ms)", trigger, digest[:12],
                     self.last_reload_seconds * 1000)
            if plan.supervise != old.supervise and self.on_supervise_change is not None:
                self.on_supervise_change(plan)
            return True

    def start_watching(self) -> None:
        if self.source_path is not None and self._watch_task is None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            dirs = self._watched = self.watch_dirs()
            self._stop_watch = asyncio.Event()
            try:
                if fingerprint(self.watch_paths()) != self._fingerprint:
                    await self.reload("file change")  # changed while the watcher restarted
                # every 0.5 s without events, the fingerprint is taken too: a change made
                # while the watcher was restarting (no event seen) takes effect all the same
                async for _changes in watchfiles.awatch(
                    *dirs, stop_event=self._stop_watch, debounce=400, step=25,
                    recursive=False, rust_timeout=500, yield_on_timeout=True,
                ):
                    for _ in range(3):  # again while files changed during the reload
                        if fingerprint(self.watch_paths()) == self._fingerprint:
                            break
                        await self.reload("file change")
                    if self.watch_dirs() != dirs:
                        break  # new files or symlink targets: watch the new directories
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a watcher hiccup must not stop the sidecar
                log.exception("file watcher failed; restarting it in 1 s")
                await asyncio.sleep(1.0)

    async def stop_watching(self) -> None:
        task, self._watch_task = self._watch_task, None
        if task is not None:
            self._stop_watch.set()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def with_addresses(self, listen: str | None, admin: str | None) -> tuple[str, str]:
        """The effective listen and admin addresses (command-line overrides win)."""
        return listen or self.plan.listen, admin or self.plan.admin

