"""`riprap demo`: the seed's checkout survives failures live, with and without riprap.

One command starts the upstreams (payments x2 + a backup provider, inventory in two
shards, recommendations), `riprap run examples/checkout/checkout.riprap` (which starts
and supervises the checkout app), a second checkout wired straight to the replicas (the
baseline), and steady traffic to both; then it runs the chaos schedule, shows the live
view, prints the summary and stops every process it started (also on Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.live import Live

from sidecar.demo import live, report, summary
from sidecar.demo.chaos import Chaos, schedule
from sidecar.demo.layout import Layout, LayoutError, check_ports_free, find_policy, prepare
from sidecar.demo.processes import Child, ProcessRegistry
from sidecar.demo.sidecar_view import SidecarView, scrape
from sidecar.demo.traffic import Traffic
from sidecar.demo.upstreams import Fleet

RIPRAP_RUN = "import sys; from dsl.cli import main; sys.exit(main(sys.argv[1:]))"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
              "http_proxy", "https_proxy", "all_proxy", "no_proxy")


class DemoError(Exception):
    """The demo could not start; the message says why (with a log excerpt)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="riprap demo",
        description="Run the checkout demo: live faults, with and without riprap.")
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds of traffic (default 60; at least 10)")
    p.add_argument("--rate", type=float, default=25.0,
                   help="checkout calls per second to each checkout (default 25)")
    p.add_argument("--report", metavar="OUT.html", help="also write the story as an HTML page")
    p.add_argument("--json", metavar="OUT.json", help="write the summary figures as JSON")
    p.add_argument("--port-offset", type=int, default=0,
                   help="shift every port of the demo by N (runs a rewritten temp copy "
                        "of the policy); use when 18400..18700 is busy")
    p.add_argument("--policy", help="the demo policy (default: examples/checkout/checkout.riprap)")
    p.add_argument("--plain", action="store_true",
                   help="plain lines instead of the live panel, even on a terminal")
    p.add_argument("--seed", type=int, default=7, help="seed for traffic and faults")
    p.add_argument("--dashboard", action="store_true",
                   help="after the chaos schedule, keep the sidecar and light traffic up so the "
                        "dashboard (its URL is printed) can be watched, until Ctrl-C")
    p.add_argument("--engine", choices=("python", "envoy"), default="python",
                   help="what enforces the plan: riprap's own sidecar (default) or Envoy")
    return p.parse_args(argv)


def _child_env(layout: Layout) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")  # the policy's `run "python ..."`
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Demo:
    def __init__(self, args: argparse.Namespace, layout: Layout, logdir: str,
                 console: Console) -> None:
        self.args = args
        self.layout = layout
        self.console = console
        self.registry = ProcessRegistry(env=_child_env(layout), log_dir=logdir)
        self.logdir = logdir
        self.steps = schedule(args.duration)
        self.baseline: Child | None = None
        self.sidecar: Child | None = None
        self.pids_seen: set[int] = set()
        self.view = SidecarView(error="not started")
        self.doc: dict[str, Any] | None = None

    # -- processes ---------------------------------------------------------------
    def _start_baseline(self) -> None:
        ups = {u.name: u.url for u in self.layout.upstreams}
        direct = {"payments": [ups["payments-1"], ups["payments-2"]],
                  "inventory": {"shards": [ups["inventory-a"], ups["inventory-b"]]},
                  "recommendations": [ups["recommendations"]]}
        self.baseline = self.registry.start("checkout-baseline", [
            sys.executable, "-m", "sidecar.demo.checkout", "--listen",
            f"127.0.0.1:{self.layout.baseline}", "--direct", json.dumps(direct),
            "--seed", str(self.args.seed)])

    async def _wait_http(self, session: aiohttp.ClientSession, url: str, what: str,
                         timeout: float, child: Child | None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child is not None and child.proc.poll() is not None:
                raise DemoError(f"{what} exited with code {child.proc.returncode}\n"
                                + self._log_tail(child.name))
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        body = await r.json(content_type=None)
                        return body if isinstance(body, dict) else {}
            except (TimeoutError, aiohttp.ClientError, ValueError):
                pass
            await asyncio.sleep(0.1)
        raise DemoError(f"{what} did not become ready within {timeout:.0f}s ({url})\n"
                        + (self._log_tail(child.name) if child else ""))

    def _log_tail(self, name: str, lines: int = 25) -> str:
        path = Path(self.logdir) / f"{name}.log"
        if not path.exists():
            return ""
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last lines of {name}'s log ---\n" + "\n".join(text)

    async def _checkout_pid(self, session: aiohttp.ClientSession) -> int | None:
        try:
            async with session.get(f"http://127.0.0.1:{self.layout.checkout}/healthz",
                                   timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                pid = (await r.json(content_type=None)).get("pid")
        except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError):
            return None
        if isinstance(pid, int):
            self.pids_seen.add(pid)
            self.registry.track(pid)
            return pid
        return None

    # -- the run -------------------------------------------------------------------
    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:  # trust_env=False: never a proxy
            fleet = Fleet(self.layout, self.registry, session, seed=self.args.seed)
            engine = getattr(self.args, "engine", "python")
            self.console.print(f"starting 6 upstreams, riprap run {self.layout.policy} "
                               f"--engine {engine}, and a baseline checkout without riprap ...")
            await fleet.start()
            self.sidecar = self.registry.start(
                "riprap", [sys.executable, "-c", RIPRAP_RUN, "run", str(self.layout.policy),
                           "--engine", engine])
            self._start_baseline()
            admin = f"127.0.0.1:{self.layout.admin}"
            await self._wait_http(session, f"http://{admin}/readyz", "riprap run", 30, self.sidecar)
            await self._wait_http(session, f"http://127.0.0.1:{self.layout.checkout}/healthz",
                                  "the supervised checkout app", 30, self.sidecar)
            await self._wait_http(session, f"http://127.0.0.1:{self.layout.baseline}/healthz",
                                  "the baseline checkout", 30, self.baseline)
            await self._checkout_pid(session)
            self.console.print(f"dashboard: http://{admin}/ (live breakers, success rate, latency; "
                               "open it in a browser)")
            traffic = Traffic({"riprap": f"http://127.0.0.1:{self.layout.checkout}/checkout",
                               "baseline": f"http://127.0.0.1:{self.layout.baseline}/checkout"},
                              self.args.rate, seed=self.args.seed)
            chaos = Chaos(self.steps, self._actions(session, fleet))
            traffic_task = asyncio.create_task(traffic.run(session, self.args.duration))
            await asyncio.sleep(0)
            chaos_task = asyncio.create_task(chaos.run(traffic.now, asyncio.sleep))
            try:
                await self._watch(session, traffic, traffic_task, admin)
            finally:
                chaos_task.cancel()
                traffic.cancel()
                await asyncio.gather(chaos_task, return_exceptions=True)
            self.view = await scrape(session, admin)
            if self.args.dashboard:
                await self._hold(session, admin)
            for step, at, error in chaos.done:
                if error:
                    self.console.print(f"[yellow]chaos step '{step.title}' at {at:.1f}s "
                                       f"failed: {error}[/]")
            self.calls = traffic.calls

    async def _hold(self, session: aiohttp.ClientSession, admin: str) -> None:
        """`--dashboard`: keep everything up, with light traffic, until Ctrl-C (or SIGTERM)."""
        loop = asyncio.get_running_loop()
        release = asyncio.Event()
        loop.add_signal_handler(signal.SIGINT, release.set)
        self.console.print(f"holding the demo up: watch http://{admin}/ ; Ctrl-C for the summary")
        idle = Traffic({"riprap": f"http://127.0.0.1:{self.layout.checkout}/checkout"},
                       max(1.0, self.args.rate / 5), seed=self.args.seed + 1)
        idle_task = asyncio.create_task(idle.run(session, 24 * 3600.0))
        try:
            while not release.is_set():
                await asyncio.wait({asyncio.ensure_future(release.wait())}, timeout=10.0)
                idle.calls.clear()  # nobody reads them: keep the hold's memory flat
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            idle.cancel()
            idle_task.cancel()
            await asyncio.gather(idle_task, return_exceptions=True)

    def _actions(self, session: aiohttp.ClientSession, fleet: Fleet) -> dict[str, Any]:
        async def kill_payment() -> None:
            fleet.kill("payments-1")

        async def payment_503() -> None:
            await fleet.set("payments-2", error_rate=0.5)

        async def inventory_down() -> None:
            fleet.kill("inventory-b")

        async def recs_slow() -> None:
            await fleet.set("recommendations", delay=0.4)

        async def kill_checkout() -> None:
            pid = await self._checkout_pid(session)
            if pid is None:
                raise DemoError("the supervised checkout did not answer /healthz")
            os.kill(pid, signal.SIGKILL)
            if self.baseline is not None:  # nothing restarts it: that is the point
                self.registry.kill(self.baseline)

        async def heal() -> None:
            await fleet.heal()
            self._start_baseline()  # an operator restarts the baseline by hand

        return {"kill-payment": kill_payment, "payment-503": payment_503,
                "inventory-down": inventory_down, "recs-slow": recs_slow,
                "kill-checkout": kill_checkout, "heal": heal}

    async def _watch(self, session: aiohttp.ClientSession, traffic: Traffic,
                     traffic_task: asyncio.Task[None], admin: str) -> None:
        duration = self.args.duration
        fancy = self.console.is_terminal and not self.args.plain
        ctx = Live(console=self.console, refresh_per_second=4, transient=False) if fancy else None
        if ctx is not None:
            ctx.start()
        try:
            while not traffic_task.done():
                self.view = await scrape(session, admin)
                await self._checkout_pid(session)
                t = traffic.now()
                if ctx is not None:
                    ctx.update(live.render(traffic.calls, t, duration, self.steps, self.view))
                else:
                    print(live.plain_line(traffic.calls, t, self.steps, self.view), flush=True)
                await asyncio.wait({traffic_task}, timeout=1.0)
            traffic_task.result()
        finally:
            if ctx is not None:
                ctx.stop()

    def finish(self) -> int:
        """Stop everything, then print the summary (and write the report)."""
        survivors = self.registry.stop_all()
        pids = self.registry.all_pids()
        calls = getattr(self, "calls", [])
        if not calls:
            self.console.print("[red]no traffic was recorded[/]")
            return 1
        doc = summary.summarise(calls, self.steps, self.args.duration, self.view,
                                max(0, len(self.pids_seen) - 1), pids)
        doc["survivors"] = survivors
        doc["dashboard"] = f"http://127.0.0.1:{self.layout.admin}/"
        self.doc = doc
        self.console.print(summary.render(doc, self.steps))
        try:
            if self.args.report:
                report.write(self.args.report, calls, self.steps, self.args.duration, doc)
                self.console.print(f"report written to {self.args.report}")
            if self.args.json:
                Path(self.args.json).write_text(json.dumps(doc, indent=2, default=str))
        except OSError as exc:
            self.console.print(f"[red]cannot write {exc.filename}: {exc.strerror}[/]")
            return 1
        if survivors:
            self.console.print(f"[red]processes still alive after stopping: {survivors}[/]")
            return 1
        self.console.print(f"stopped all {len(pids)} processes the demo started "
                           f"(pids {' '.join(map(str, pids))}).")
        return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    console = Console()
    err = Console(stderr=True)
    if args.duration < 10:
        err.print("riprap demo: --duration must be at least 10 seconds")
        return 2
    if args.rate <= 0 or args.rate > 200:
        err.print("riprap demo: --rate must be within 0..200 calls per second")
        return 2
    for flag, out in (("--report", args.report), ("--json", args.json)):
        if out and not Path(out).resolve().parent.is_dir():
            err.print(f"riprap demo: {flag} {out}: directory {Path(out).resolve().parent} "
                      "does not exist")
            return 2
    with tempfile.TemporaryDirectory(prefix="riprap-demo-") as tmp:
        try:
            layout = prepare(find_policy(args.policy), args.port_offset, Path(tmp))
            check_ports_free(layout)
        except LayoutError as exc:
            err.print(f"riprap demo: {exc}")
            return 2
        logdir = Path(tmp) / "logs"
        logdir.mkdir()
        demo = Demo(args, layout, str(logdir), console)
        loop_main = _run_cancellable(demo)
        try:
            status = asyncio.run(loop_main)
        except KeyboardInterrupt:
            status = 130
        except (DemoError, RuntimeError, OSError) as exc:
            demo.registry.stop_all()
            err.print(f"riprap demo: {exc}")
            return 1
        if status != 0:
            survivors = demo.registry.stop_all()
            err.print("riprap demo: interrupted; stopped every process it started"
                      + (f" except {survivors}" if survivors else "") + ".")
            return status
        return demo.finish()


async def _run_cancellable(demo: Demo) -> int:
    """Run the demo; SIGTERM (like Ctrl-C) cancels it, and the caller stops the processes."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    interrupted = False

    def on_signal() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_signal)
    try:
        await demo.run()
    except asyncio.CancelledError:
        if interrupted:
            return 143
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
    return 0
