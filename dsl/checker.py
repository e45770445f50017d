"""Semantic checks on the AST: every rule of sections 3-6, every problem reported.

The grammar accepts any statement in any block; this module says which statement may
stand where, checks every value (ranges, statuses, addresses, names) and every name
reference (`use`, `fallback service`, `shard default`), and never stops at the first
problem. The compiler only runs on a file this module found no error in.

Warnings that need the resolved plan (retries that cannot fit the timeout, a timeout
not below the built-in default, retries without a budget) are in `check_plan`.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Iterable, Mapping
from urllib.parse import urlsplit

from dsl.ast import File, Lit, Opt, Stmt
from dsl.diagnostics import Diagnostic, Span, did_you_mean
from dsl.explain import shown_store
from dsl import statements as T
from dsl.plan import BUILTIN_TIMEOUT, Plan, ServicePlan, ShardPlan
from dsl.transformer import BadJson, string_problem

# which statement may stand where, its options, how it merges: from the statement table
ALLOWED = T.ALLOWED
BLOCK_WORDS = T.BLOCK_WORDS
# directives where a later line replaces an earlier one (a duplicate in one block is suspect)
REPLACING = T.REPLACING
RETRY_CONDITIONS = ("connect-failure", "reset", "timeout")
JITTERS = ("full", "equal", "decorrelated", "none")
VERIFY = ("on", "off")
STORE_SCHEMES = ("redis", "rediss")
MIN_RESOLVE_EVERY = 1.0  # `resolve every D` below this is a warning (RP310)
BALANCES = ("round-robin", "least-request", "random")
KNOWN_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE", "POST", "PATCH", "CONNECT")
_METHOD = re.compile(r"[A-Z]+")

# the options each statement form accepts
OPTIONS: dict[tuple[str, str | None], frozenset[str]] = {key: frozenset(keys) for key, keys in T.OPTIONS.items()}
MAX_RETRIES = 100  # `retry N`: N is 0..100 (docs/language.md)
MAX_SECONDS = 365 * 24 * 3600  # a duration is at most a year
# kind -> (largest value, hint): beyond these a number is an error (RP227) at its place
NUMBER_LIMITS: dict[str, tuple[float, str]] = {
    "int": (2**53 - 1, "a count is at most 9007199254740991"),
    "duration": (MAX_SECONDS, "a duration is at most a year (8760h)"),
    "rate": (1e9, "a rate is at most 1000000000/s"),
}
HEALTH_OPTIONS = OPTIONS[("health", None)]
APP_HEALTH_OPTIONS = frozenset(T.STATEMENTS["health"].app_options or ())
# top-level statements given at most once (RP221)
ONCE_AT_TOP = tuple(k for k in T.ALLOWED["top"] if T.STATEMENTS[k].merge == "once")


class _Checker:
    def __init__(self, file: File) -> None:
        self.file = file
        self.diags: list[Diagnostic] = []
        self.policies: dict[str, Stmt] = {}
        self.services: dict[str, Stmt] = {}

    # ---- reporting -----------------------------------------------------------------
    def error(self, code: str, span: Span, message: str, hint: str | None = None) -> None:
        self.diags.append(Diagnostic(code, "error", span, message, hint))

    def warn(self, code: str, span: Span, message: str, hint: str | None = None) -> None:
        self.diags.append(Diagnostic(code, "warning", span, message, hint))

    # ---- entry ---------------------------------------------------------------------
    def run(self) -> list[Diagnostic]:
        top = self.file.stmts
        self.collect_names(top)
        self.check_block(top, "top", None)
        self.check_top(top)
        for stmt in top:
            if stmt.kind == "service":
                self.check_service(stmt)
        self.check_policy_use(top)
        self.check_hosts(top)
        return self.diags

    def collect_names(self, top: Iterable[Stmt]) -> None:
        for stmt in top:
            name = stmt.name
            if stmt.kind == "service" and name is not None:
                if name in self.services:
                    first = self.services[name].span
                    self.error(
                        "RP202",
                        stmt.args[0].span,
                        f"service '{name}' is declared twice",
                        f"the first declaration is at line {first.line}",
                    )
                else:
                    self.services[name] = stmt
            elif stmt.kind == "policy" and name is not None:
                if name in self.policies:
                    first = self.policies[name].span
                    self.error(
                        "RP203",
                        stmt.args[0].span,
                        f"policy '{name}' is declared twice",
                        f"the first declaration is at line {first.line}",
                    )
                else:
                    self.policies[name] = stmt

    # ---- placement and per-statement values ---------------------------------------
    def check_block(self, stmts: Iterable[Stmt], block: str, owner: Stmt | None) -> None:
        seen: dict[str, Stmt] = {}
        for stmt in stmts:
            if stmt.kind == "recovered":
                continue
            if stmt.kind not in ALLOWED[block]:
                where = T.STATEMENTS[stmt.kind].where()
                self.error(
                    "RP219",
                    stmt.span,
                    f"'{_word(stmt.kind)}' is not allowed {BLOCK_WORDS[block]}",
                    f"'{_word(stmt.kind)}' is allowed {where}",
                )
                continue
            if stmt.kind in REPLACING and block != "app":
                if stmt.kind in seen:
                    self.warn(
                        "RP304",
                        stmt.span,
                        f"'{stmt.kind}' is given twice in this block; this line replaces line "
                        f"{seen[stmt.kind].span.line}",
                        "remove one of the two lines",
                    )
                seen[stmt.kind] = stmt
            self.check_stmt(stmt, block)
            if stmt.body is not None and stmt.kind in ("defaults", "policy", "shard", "app"):
                self.check_block(stmt.body, stmt.kind, stmt)
            elif stmt.body is not None and stmt.kind == "service":
                self.check_block(stmt.body, "service", stmt)

    def check_stmt(self, stmt: Stmt, block: str) -> None:
        self.check_options(stmt, block)
        self.numbers(stmt)
        handler = getattr(self, "v_" + stmt.kind.replace("-", "_"), None)
        if handler is not None:
            handler(stmt, block)

    def check_options(self, stmt: Stmt, block: str) -> None:
        if stmt.kind == "health":
            allowed = APP_HEALTH_OPTIONS if block == "app" else HEALTH_OPTIONS
        else:
            allowed = OPTIONS.get((stmt.kind, stmt.form), frozenset())
        seen: set[str] = set()
        for opt in stmt.opts:
            if opt.key not in allowed:
                valid = ", ".join(f"'{k}'" for k in sorted(allowed - {"method"})) or "none"
                self.error(
                    "RP220",
                    opt.span,
                    f"'{opt.key}' is not an option of '{_describe(stmt)}'{' in an app block' if block == 'app' else ''}",
                    f"its options are: {valid}",
                )
            elif opt.key in seen:
                self.error("RP220", opt.span, f"'{opt.key}' is given twice in one statement")
            seen.add(opt.key)

    # values ------------------------------------------------------------------------
    def positive(self, lit: Lit | None, what: str) -> None:
        if lit is not None and lit.value is not None and lit.value <= 0:
            self.error("RP222", lit.span, f"{what} must be greater than zero, got {lit.text}")

    def at_least(self, lit: Lit | None, low: int, what: str, code: str = "RP222") -> None:
        if lit is not None and isinstance(lit.value, int) and lit.value < low:
            self.error(code, lit.span, f"{what} must be at least {low}, got {lit.text}")

    def percent(self, lit: Lit | None, what: str, allow_zero: bool = True) -> None:
        if lit is None:
            return
        if lit.value > 1.0:
            self.error("RP211", lit.span, f"{what} {lit.text} is over 100%", "use 0%..100%")
        elif not allow_zero and lit.value <= 0:
            self.error("RP222", lit.span, f"{what} must be greater than 0%, got {lit.text}")

    def status(self, lit: Lit, allow_class: bool = True) -> None:
        if lit.kind == "int":
            if not 100 <= lit.value <= 599:
                self.error(
                    "RP212", lit.span, f"status {lit.text} is out of range", "a status is 100..599"
                )
        elif lit.kind == "status-class":
            if not allow_class:
                self.error("RP212", lit.span, f"a status code is needed here, not the class {lit.text}")
            elif lit.text not in ("1xx", "2xx", "3xx", "4xx", "5xx"):
                self.error(
                    "RP212", lit.span, f"status class {lit.text} is out of range", "a class is 1xx..5xx"
                )

    def range_(self, lits: tuple[Lit, ...], what: str) -> None:
        for lit in lits:
            self.positive(lit, what)
        if len(lits) == 2 and lits[0].value > lits[1].value:
            self.error(
                "RP210",
                lits[0].span,
                f"{what} range {lits[0].text}..{lits[1].text} runs backwards",
                f"write the smaller bound first: {lits[1].text}..{lits[0].text}",
            )

    def method(self, lit: Lit) -> None:
        if not _METHOD.fullmatch(lit.text):
            hint = f"did you mean '{lit.text.upper()}'?" if _METHOD.fullmatch(lit.text.upper()) else None
            self.error("RP223", lit.span, f"'{lit.text}' is not an HTTP method", hint)

    def one_of(self, lit: Lit, choices: tuple[str, ...], what: str) -> None:
        if lit.text not in choices:
            hint = did_you_mean(lit.text, choices) or "one of: " + ", ".join(choices)
            self.error("RP224", lit.span, f"unknown {what} '{lit.text}'", hint)

    def address(self, lit: Lit) -> None:
        problem = address_problem(lit.text)
        if problem:
            self.error("RP217", lit.span, f"bad address '{lit.text}': {problem}", "write HOST:PORT, e.g. 127.0.0.1:7400")

    def url(self, lit: Lit) -> None:
        problem = url_problem(lit.text)
        if problem:
            self.error("RP217", lit.span, f"bad URL '{lit.text}': {problem}", "e.g. http://127.0.0.1:9001")

    def string(self, lit: Lit) -> None:
        if lit.kind == "string" and lit.value is None:
            self.error("RP109", lit.span, string_problem(lit.text), 'use JSON escapes: \\" \\\\ \\n \\t \\uXXXX')

    def numbers(self, stmt: Stmt) -> None:
        """RP227: a number too large to mean anything (or for a float to hold) is an error at it."""
        for lit in stmt.args + tuple(a for o in stmt.opts for a in o.args):
            limit = NUMBER_LIMITS.get(lit.kind)
            if limit is None:
                continue
            value = lit.value
            if isinstance(value, (int, float)) and not (math.isfinite(value) and value <= limit[0]):
                self.error("RP227", lit.span, f"{lit.text if len(lit.text) <= 24 else lit.text[:20] + '...'} is too large", limit[1])

    # statement handlers (v_KIND) ---------------------------------------------------
    def v_listen(self, stmt: Stmt, block: str) -> None:
        lit = stmt.args[0]
        self.address(lit)
        if address_problem(lit.text) is None and not is_loopback(lit.text):
            what = (
                "calls sent here go out through the sidecar"
                if stmt.kind == "listen"
                else "the admin endpoints (/plan, /state, /metrics) have no authentication"
            )
            self.warn(
                "RP311",
                lit.span,
                f"{stmt.kind} {lit.text} binds beyond loopback: any host that reaches this one can connect, and {what}",
                "bind 127.0.0.1 unless the network in front is trusted (a pod network, a firewall)",
            )

    v_admin = v_listen

    def v_resolver(self, stmt: Stmt, block: str) -> None:
        for lit in stmt.args:
            problem = address_problem(lit.text)
            if problem:
                self.error("RP217", lit.span, f"bad resolver address '{lit.text}': {problem}", "write HOST:PORT, e.g. 127.0.0.1:53")

    def v_store(self, stmt: Stmt, block: str) -> None:
        lit = stmt.args[0]
        problem = store_problem(lit.text)
        if problem:
            self.error(
                "RP232",
                lit.span,
                f"bad store URL '{shown_store(lit.text)}': {problem}",
                "write redis://[:PASSWORD@]HOST:PORT[/DB], or rediss://... for TLS",
            )

    def v_tls(self, stmt: Stmt, block: str) -> None:
        for opt in stmt.opts:
            if opt.key in ("ca", "cert", "key"):
                self.string(opt.args[0])
                if opt.args[0].value == "":
                    self.error("RP229", opt.args[0].span, f"the tls {opt.key} path is empty")
        cert, key = stmt.opt("cert"), stmt.opt("key")
        if (cert is None) != (key is None):
            given, missing = (cert, "key") if cert is not None else (key, "cert")
            assert given is not None
            self.error(
                "RP230",
                given.span,
                f"tls {given.key} without {missing}: a client certificate needs its private key",
                'give both: cert "client.pem" key "client-key.pem"',
            )
        verify = stmt.opt("verify")
        if verify is not None:
            lit = verify.args[0]
            self.one_of(lit, VERIFY, "verify setting")
            if lit.text == "off":
                self.warn(
                    "RP308",
                    verify.span,
                    "tls verify off: upstream certificates are not checked, so anyone on the path can read and change these calls",
                    'trust a private CA with `tls ca "ca.pem"` instead',
                )

    def v_run(self, stmt: Stmt, block: str) -> None:
        lit = stmt.args[0]
        self.string(lit)
        if lit.value is not None and not lit.value.strip():
            self.error("RP225", lit.span, "the run command is empty")

    def v_restart(self, stmt: Stmt, block: str) -> None:
        self.range_(stmt.args, "restart backoff")

    def v_timeout(self, stmt: Stmt, block: str) -> None:
        self.positive(stmt.args[0], "timeout")

    def v_retry(self, stmt: Stmt, block: str) -> None:
        n = stmt.args[0]
        self.at_least(n, 0, "the number of retries")
        if isinstance(n.value, int) and MAX_RETRIES < n.value <= NUMBER_LIMITS["int"][0]:
            self.error(
                "RP227",
                n.span,
                f"retry {n.text} is too many: at most {MAX_RETRIES} retries",
                "a few retries (1-3) with a budget is usual; more only multiply load on a failing service",
            )
        for opt in stmt.opts:
            if opt.key == "on":
                for cond in opt.args:
                    if cond.kind == "name":
                        self.one_of(cond, RETRY_CONDITIONS, "retry condition")
                    else:
                        self.status(cond)
            elif opt.key == "backoff":
                self.range_(opt.args, "backoff")
            elif opt.key == "jitter":
                self.one_of(opt.args[0], JITTERS, "jitter")
                if stmt.opt("backoff") is None:
                    self.warn("RP307", opt.span, "jitter without backoff does nothing", "add `backoff 100ms..1s`")
            elif opt.key == "per-try":
                self.positive(opt.args[0], "per-try timeout")
            elif opt.key == "budget":
                # 0% is meaningful: only the floor (`min R`, default 10/s) lets retries through
                self.percent(opt.args[0], "retry budget")
                if len(opt.args) > 1:
                    self.positive(opt.args[1], "the budget's minimum rate")
            elif opt.key == "methods":
                for m in opt.args:
                    self.method(m)

    def v_hedge(self, stmt: Stmt, block: str) -> None:
        lit = stmt.args[0]
        if stmt.form == "after":
            self.positive(lit, "hedge delay")
        elif not 0 < lit.value < 1:
            self.error("RP211", lit.span, f"percentile {lit.text} is out of range", "use p1..p99.9, e.g. p95")
        opt = stmt.opt("min")
        if opt:
            self.positive(opt.args[0], "hedge minimum delay")
        opt = stmt.opt("max")
        if opt:
            self.at_least(opt.args[0], 1, "hedge max", code="RP215")

    def v_breaker(self, stmt: Stmt, block: str) -> None:
        lit = stmt.args[0]
        if stmt.form == "failures":
            self.at_least(lit, 1, "breaker failures", code="RP216")
        else:
            self.percent(lit, "failure rate", allow_zero=False)
        window = stmt.opt("window")
        minimum = stmt.opt("min")
        if window:
            self.at_least(window.args[0], 1, "breaker window", code="RP216")
        if minimum:
            self.at_least(minimum.args[0], 1, "breaker min", code="RP216")
        w = window.args[0].value if window else T.default("breaker", "window", "failure-rate")
        m = minimum.args[0].value if minimum else T.default("breaker", "min", "failure-rate")
        if w >= 1 and m > w:
            where = (minimum or window or stmt).span
            self.error(
                "RP216",
                where,
                f"breaker min {m} is larger than its window {w}: it could never open",
                "min counts calls within the window; keep min <= window",
            )
        for key, what in (("open", "breaker open time"), ("slow", "breaker slow threshold")):
            opt = stmt.opt(key)
            if opt:
                self.positive(opt.args[0], what)
        opt = stmt.opt("probes")
        if opt:
            self.at_least(opt.args[0], 1, "breaker probes", code="RP216")

    def v_limit(self, stmt: Stmt, block: str) -> None:
        self.positive(stmt.args[0], "limit rate")
        opt = stmt.opt("burst")
        if opt:
            self.at_least(opt.args[0], 1, "burst")
        shared = stmt.opt("shared")
        if shared is not None and not any(s.kind == "store" for s in self.file.stmts):
            self.error(
                "RP231",
                shared.span,
                "a shared limit needs a `store`: the fleet's bucket lives there",
                "add e.g. `store redis://127.0.0.1:6379` at the top of the file",
            )

    def v_concurrency(self, stmt: Stmt, block: str) -> None:
        self.at_least(stmt.args[0], 1, "concurrency")
        opt = stmt.opt("queue-timeout")
        if opt:
            self.positive(opt.args[0], "queue timeout")

    def v_fallback(self, stmt: Stmt, block: str) -> None:
        if stmt.form in ("json", "text", "file"):
            self.status(stmt.args[0], allow_class=False)
            if stmt.form in ("text", "file"):
                self.string(stmt.args[1])
            elif isinstance(stmt.args[1].value, BadJson):
                for bad in stmt.args[1].value.bad:
                    self.error("RP109", bad.span, bad.problem, 'use JSON escapes: \\" \\\\ \\n \\t \\uXXXX')
            elif not _finite(stmt.args[1].value):
                self.error("RP109", stmt.args[1].span, "a number in this JSON value is too large", "JSON numbers must be finite")
        elif stmt.form == "stale":
            self.positive(stmt.args[0], "stale age")
        elif stmt.form == "service":
            target = stmt.args[0]
            if target.value not in self.services:
                hint = did_you_mean(target.value, self.services) or "declare it with `service NAME { ... }`"
                self.error("RP209", target.span, f"fallback to unknown service '{target.value}'", hint)

    def v_chaos(self, stmt: Stmt, block: str) -> None:
        self.percent(stmt.args[0], "chaos probability")
        if stmt.form == "delay":
            self.positive(stmt.args[1], "chaos delay")
        opt = stmt.opt("status")
        if opt:
            self.status(opt.args[0], allow_class=False)

    def v_use(self, stmt: Stmt, block: str) -> None:
        name = stmt.args[0]
        if name.value not in self.policies:
            hint = did_you_mean(name.value, self.policies) or (
                "declare it with `policy NAME { ... }`" if not self.policies else
                "known policies: " + ", ".join(sorted(self.policies))
            )
            self.error("RP201", name.span, f"unknown policy '{name.value}'", hint)

    def v_endpoint(self, stmt: Stmt, block: str) -> None:
        self.url(stmt.args[0])
        opt = stmt.opt("weight")
        if opt:
            self.at_least(opt.args[0], 1, "weight", code="RP213")
        opt = stmt.opt("tier")
        if opt:
            self.at_least(opt.args[0], 1, "failover tier", code="RP214")
        opt = stmt.opt("resolve")
        if opt:
            self.v_resolve(stmt.args[0], opt)

    def v_resolve(self, url: Lit, opt: Opt) -> None:
        try:
            host = urlsplit(url.text).hostname or ""
        except ValueError:
            host = ""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            self.warn(
                "RP309",
                opt.span,
                f"'resolve' on {host} does nothing: an IP address has no name to look up",
                "remove `resolve`, or give the URL a host name",
            )
        if opt.args:
            every = opt.args[0]
            self.positive(every, "resolve interval")
            if 0 < every.value < MIN_RESOLVE_EVERY:
                self.warn(
                    "RP310",
                    every.span,
                    f"resolve every {every.text} is below 1s: every sidecar asks DNS that often",
                    "DNS answers rarely change faster than that; the default is every 5s",
                )

    v_failover = v_endpoint

    def v_balance(self, stmt: Stmt, block: str) -> None:
        self.one_of(stmt.args[0], BALANCES, "balance")

    def v_health(self, stmt: Stmt, block: str) -> None:
        target = stmt.args[0]
        if block == "app":
            if target.kind != "url":
                self.error("RP225", target.span, "the app's health check needs a full URL", "e.g. http://127.0.0.1:8000/healthz")
            else:
                self.url(target)
        elif target.kind != "path":
            self.error(
                "RP217",
                target.span,
                "a service's health check takes a path, checked on every endpoint",
                "e.g. health GET /healthz",
            )
        for opt in stmt.opts:
            if opt.key == "method":
                self.method(opt.args[0])
            elif opt.key in ("every", "timeout"):
                self.positive(opt.args[0], f"health {opt.key}")
            elif opt.key in ("fall", "rise"):
                self.at_least(opt.args[0], 1, f"health {opt.key}")
            elif opt.key == "expect":
                for lit in opt.args:
                    self.status(lit)

    def v_outlier(self, stmt: Stmt, block: str) -> None:
        self.at_least(stmt.args[0], 1, "outlier failures")
        opt = stmt.opt("eject")
        if opt:
            self.positive(opt.args[0], "ejection time")
        opt = stmt.opt("max")
        if opt:
            self.percent(opt.args[0], "outlier max", allow_zero=False)

    def v_shard_by(self, stmt: Stmt, block: str) -> None:
        if stmt.form == "path-segment":
            self.at_least(stmt.args[0], 1, "path segment", code="RP208")

    # ---- whole-file and per-service rules ------------------------------------------
    def check_top(self, top: tuple[Stmt, ...]) -> None:
        first: dict[str, Stmt] = {}
        for stmt in top:
            if stmt.kind in ONCE_AT_TOP:
                if stmt.kind in first:
                    self.error(
                        "RP221",
                        stmt.span,
                        f"'{stmt.kind}' is given twice",
                        f"the first is at line {first[stmt.kind].span.line}",
                    )
                else:
                    first[stmt.kind] = stmt
        listen, admin = first.get("listen"), first.get("admin")
        if listen and admin and listen.args[0].text == admin.args[0].text:
            self.error("RP217", admin.args[0].span, "admin and listen use the same address")
        app = first.get("app")
        if app is not None and app.body is not None:
            if not any(s.kind in ("run", "recovered") for s in app.body):
                self.error("RP225", app.span, f"app '{app.name}' has a block but no `run` command", 'add e.g. run "python -m shop"')
            for kind in ("run", "health", "restart"):
                lines = [s for s in app.body if s.kind == kind]
                for dup in lines[1:]:
                    self.error("RP221", dup.span, f"'{kind}' is given twice in the app block")
        # a line that did not parse (reported already) may be the service the file meant:
        # saying it declares none would be a second, wrong finding
        if not any(s.kind in ("service", "recovered") for s in top):
            span = top[0].span if top else Span(self.file.path, 1, 1)
            self.warn("RP305", span, "this file declares no services", "the sidecar would forward nothing")

    def check_service(self, svc: Stmt) -> None:
        body = svc.body or ()
        name = svc.name or ""
        recovered = any(s.kind == "recovered" for s in body)
        endpoints = [s for s in body if s.kind == "endpoint"]
        failovers = [s for s in body if s.kind == "failover"]
        shards = [s for s in body if s.kind == "shard"]
        shard_by = [s for s in body if s.kind == "shard-by"]
        defaults = [s for s in body if s.kind == "shard-default"]
        if (endpoints or failovers) and shards:
            self.error(
                "RP205",
                svc.args[0].span,
                f"service '{name}' has both endpoints and shards",
                "a service has endpoints or shards, never both: move the endpoints into shards",
            )
        elif not endpoints and not shards and not recovered:
            if failovers:
                self.error("RP214", failovers[0].span, f"service '{name}' has failover endpoints but no primary `endpoint`")
            else:
                self.error(
                    "RP206",
                    svc.args[0].span,
                    f"service '{name}' has no endpoints and no shards",
                    "add `endpoint http://HOST:PORT` or `shard NAME { endpoint ... }`",
                )
        for extra in shard_by[1:]:
            self.error("RP221", extra.span, "'shard by' is given twice")
        for extra in defaults[1:]:
            self.error("RP221", extra.span, "'shard default' is given twice")
        if shards and not shard_by:
            self.error(
                "RP208",
                shards[0].span,
                f"shard '{shards[0].name}' in a service without `shard by`",
                "add e.g. `shard by header X-Tenant` to say how calls map to shards",
            )
        if shard_by and not shards:
            self.error("RP208", shard_by[0].span, f"service '{name}' says `shard by` but declares no shard")
        if defaults and not shard_by and not shards:
            self.error("RP208", defaults[0].span, "`shard default` in a service without shards")
        names: dict[str, Stmt] = {}
        for shard in shards:
            sname = shard.name or ""
            if sname in names:
                self.error(
                    "RP204",
                    shard.args[0].span,
                    f"shard '{sname}' is declared twice in service '{name}'",
                    f"the first is at line {names[sname].span.line}",
                )
            else:
                names[sname] = shard
            sbody = shard.body or ()
            if not any(s.kind in ("endpoint", "recovered") for s in sbody):
                if any(s.kind == "failover" for s in sbody):
                    self.error("RP214", shard.args[0].span, f"shard '{sname}' has failover endpoints but no primary `endpoint`")
                else:
                    self.error("RP206", shard.args[0].span, f"shard '{sname}' has no endpoints", "add `endpoint http://HOST:PORT`")
        for d in defaults:
            target = d.args[0]
            if shards and target.value not in names:
                hint = did_you_mean(target.value, names) or "shards: " + ", ".join(names)
                self.error("RP207", target.span, f"shard default names unknown shard '{target.value}'", hint)
        self.check_self_fallback(svc)

    def check_self_fallback(self, svc: Stmt) -> None:
        """`fallback service` naming the service itself, wherever the line comes from."""
        name = svc.name
        lines: list[tuple[Stmt, str]] = []
        top = self.file.stmts
        for stmt in top:
            if stmt.kind == "defaults":
                lines += [(s, " (from defaults)") for s in stmt.body or ()]
        for use in (s for s in svc.body or () if s.kind == "use"):
            policy = self.policies.get(str(use.args[0].value))
            if policy is not None:
                lines += [(s, f" (from policy '{policy.name}')") for s in policy.body or ()]
        lines += [(s, "") for s in svc.body or ()]
        for shard in (s for s in svc.body or () if s.kind == "shard"):
            lines += [(s, f" (in shard '{shard.name}')") for s in shard.body or ()]
        for stmt, via in lines:
            if stmt.kind == "fallback" and stmt.form == "service" and stmt.args[0].value == name:
                self.error(
                    "RP209",
                    stmt.args[0].span,
                    f"service '{name}' falls back to itself{via}",
                    "a fallback service must be another service",
                )

    def check_policy_use(self, top: tuple[Stmt, ...]) -> None:
        used = {
            str(u.args[0].value)
            for svc in top
            if svc.kind == "service"
            for u in svc.body or ()
            if u.kind == "use"
        }
        for name, policy in self.policies.items():
            if name not in used:
                self.warn("RP306", policy.args[0].span, f"policy '{name}' is never used", f"add `use {name}` to a service, or remove it")

    def check_hosts(self, top: tuple[Stmt, ...]) -> None:
        owner: dict[str, str] = {name.lower(): name for name in self.services}
        for svc in top:
            if svc.kind != "service" or svc.name is None:
                continue
            for host in (s for s in svc.body or () if s.kind == "host"):
                for lit in host.args:
                    key = str(lit.value).lower()
                    other = owner.get(key)
                    if other is not None and other != svc.name:
                        self.error(
                            "RP218",
                            lit.span,
                            f"host '{lit.value}' already routes to service '{other}'",
                            "a host name routes to one service only",
                        )
                    elif other is None:
                        owner[key] = svc.name


def _finite(value: object) -> bool:
    """Whether every number in a JSON value is finite (`1e999` is not)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _word(kind: str) -> str:
    stmt = T.STATEMENTS.get(kind)
    return stmt.words if stmt is not None else kind


def _describe(stmt: Stmt) -> str:
    if stmt.form and stmt.kind in ("hedge", "breaker", "chaos"):
        return f"{stmt.kind} {stmt.form}"
    return _word(stmt.kind)


def address_problem(text: str) -> str | None:
    """Why `HOST:PORT` is not a usable address, or None."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return "the port must be 1..65535"
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "not an IPv6 address"
        return None
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return "not an IPv4 address"
        return None
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9\-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9\-]*[A-Za-z0-9])?)*", host):
        return "not a host name"
    return None


def is_loopback(address: str) -> bool:
    """Whether a `HOST:PORT` binds only loopback: 127.0.0.0/8, [::1] or `localhost`."""
    host = address.rpartition(":")[0]
    if host.startswith("["):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower().rstrip(".") == "localhost"


def store_problem(text: str) -> str | None:
    """Why a `store` URL is not `redis://[:PASSWORD@]HOST:PORT[/DB]` (or `rediss://`), or None."""
    scheme = text.partition("://")[0].lower()
    if scheme not in STORE_SCHEMES:
        return f"the scheme must be redis:// or rediss:// (TLS), not {scheme}://"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return "the port must be 1..65535"
    if not parts.hostname:
        return "no host"
    host = parts.netloc.rsplit("@", 1)[-1]
    if port is not None:
        host = host.rsplit(":", 1)[0]
    problem = address_problem(f"{host}:{port or 6379}")
    if problem:
        return problem
    db = parts.path[1:] if parts.path.startswith("/") else parts.path
    if db and not db.isdigit():
        return f"the database must be a number (/0, /1, ...), not /{db}"
    if parts.query or parts.fragment:
        return "a store URL takes no query or fragment"
    return None


def url_problem(text: str) -> str | None:
    """Why an endpoint URL is unusable, or None."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        return str(exc)
    if not parts.hostname:
        return "no host"
    if port is not None and not 1 <= port <= 65535:
        return "the port must be 1..65535"
    host = parts.netloc.rsplit("@", 1)[-1]
    if port is not None:
        host = host.rsplit(":", 1)[0]
    return address_problem(f"{host}:{port or 80}")


def check_file(file: File) -> list[Diagnostic]:
    """Every semantic problem of a parsed file."""
    return _Checker(file).run()


# ---- warnings on the resolved plan (section 10, one file) ----------------------------


def check_plan(
    plan: Plan, retry_spans: Mapping[str, Span], timeout_spans: Mapping[str, Span]
) -> list[Diagnostic]:
    """RP301-RP303: retries that cannot fit, timeouts not below 15s, retries without budget.

    `retry_spans`/`timeout_spans` locate the line each scope's retry/timeout came from
    (its own, a policy's or the defaults'), keyed by service name and `svc/shard`. Each
    shard's resolved policy is checked too; a finding a shard only inherits from its
    service (same cause, same line) is reported once, for the service.
    """
    from dsl.worstcase import backoff_total, fmt_seconds

    out: list[Diagnostic] = []
    for name, svc in plan.services.items():
        scopes: list[tuple[str, ServicePlan | ShardPlan]] = [(name, svc)]
        scopes += [(f"{name}/{s.name}", s) for s in svc.shards]
        said: set[tuple[object, ...]] = set()

        def add(key: tuple[object, ...], code: str, span: Span, message: str, hint: str) -> None:
            if key not in said:  # noqa: B023 - called within the same iteration
                said.add(key)  # noqa: B023
                out.append(Diagnostic(code, "warning", span, message, hint))

        for key, p in scopes:
            label = f"service '{name}'" if key == name else f"shard '{key}'"
            retry_at = retry_spans.get(key) or retry_spans.get(name)
            timeout_at = timeout_spans.get(key) or timeout_spans.get(name)
            if p.retry is not None and p.retry.retries > 0 and retry_at is not None:
                r = p.retry
                backoff = backoff_total(r.backoff, r.retries)
                if r.per_try_timeout is not None:
                    need = (r.retries + 1) * r.per_try_timeout + backoff
                    detail = f"{r.retries + 1} tries × {fmt_seconds(r.per_try_timeout)} per try + {fmt_seconds(backoff)} backoff"
                else:
                    need = backoff
                    detail = f"{fmt_seconds(backoff)} of backoff alone"
                if need > p.timeout + 1e-9:
                    # at the retry line, or at the shard's own timeout when only that differs
                    own_timeout = key != name and timeout_at != timeout_spans.get(name)
                    own_retry = key == name or retry_at != retry_spans.get(name)
                    at = timeout_at if own_timeout and not own_retry and timeout_at else retry_at
                    add(
                        ("RP301", r, p.timeout),
                        "RP301",
                        at,
                        f"{label}: retries cannot all run within its timeout: {detail} = "
                        f"{fmt_seconds(need)} > {fmt_seconds(p.timeout)}",
                        "lower the retries, per-try or backoff, or raise the timeout",
                    )
                if r.budget is None:
                    add(
                        ("RP303", retry_at),
                        "RP303",
                        retry_at,
                        f"{label}: retries without a retry budget can multiply load during an outage",
                        "add e.g. `budget 20%` to the retry line",
                    )
            if p.timeout >= BUILTIN_TIMEOUT and timeout_at is not None:
                add(
                    ("RP302", timeout_at),
                    "RP302",
                    timeout_at,
                    (f"{label}: no timeout below the built-in default of "
                     f"{fmt_seconds(BUILTIN_TIMEOUT)}: a call may wait that long"
                     if p.timeout == BUILTIN_TIMEOUT else
                     f"{label}: timeout {fmt_seconds(p.timeout)} is not below the built-in "
                     f"default of {fmt_seconds(BUILTIN_TIMEOUT)}"),
                    "set a deadline the caller can wait for, e.g. `timeout 2s` in the service,"
                    " or once for every service in `defaults { ... }`",
                )
    return out
