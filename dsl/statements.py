"""The statement table: every directive of the language, declared once.

Each entry says where the statement may stand, its forms (the grammar rule of each) and
options in canonical order (with the grammar rule and the default of each, taken from
the plan's dataclasses in dsl/plan.py, never restated), how a later line merges with an
earlier one, the plan field it fills, and how each engine realises it. The rest of the
language derives from this table:

- dsl/transformer.py: the grammar rule -> (kind, form) and option-rule -> key maps;
- dsl/checker.py: which statement may stand in which block, each form's options, the
  directives a repeated line replaces;
- dsl/compiler.py: the precedence rules (replace / accumulate) and every default;
- dsl/fmt.py: each statement's option order;
- dsl/syntax_errors.py: the directive vocabulary ("unknown directive", did you mean);
- dsl/explain.py and `check --engine`: how each engine runs each statement.

tests/dsl/test_statements.py fails when dsl/grammar.lark has a statement or option the
table lacks (or the other way round), and checks docs/language.md against the table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from dsl.plan import (
    BUILTIN_TIMEOUT,
    DEFAULT_ADMIN,
    DEFAULT_LISTEN,
    DEFAULT_RESOLVE_EVERY,
    DEFAULT_RETRY_ON,
    AppHealthSpec,
    BackoffSpec,
    BreakerSpec,
    BudgetSpec,
    ConcurrencySpec,
    EndpointSpec,
    HealthSpec,
    HedgeSpec,
    OutlierSpec,
    ServicePlan,
    SuperviseSpec,
    TlsSpec,
)

ENGINES = ("python", "envoy")  # `--engine` of check, explain and run; python is the default
Engine = Literal["python", "envoy"]
Realisation = Literal["native", "extension", "approximate"]
Merge = Literal["replace", "accumulate", "list", "once", "block"]
Block = Literal["top", "defaults", "policy", "service", "shard", "app"]

POLICY_BLOCKS: frozenset[str] = frozenset({"defaults", "policy", "service", "shard"})
ENDPOINT_BLOCKS: frozenset[str] = frozenset({"service", "shard"})
BLOCK_WORDS: Mapping[str, str] = {
    "top": "at the top of the file",
    "defaults": "in defaults",
    "policy": "in a policy",
    "service": "in a service",
    "shard": "in a shard",
    "app": "in an app block",
}


def plan_default(cls: type, name: str) -> Any:
    """The default of field `name` of plan dataclass `cls` (dsl/plan.py states it once)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name}")


@dataclass(frozen=True)
class Envoy:
    """How the Envoy engine realises a form or option; `differs` says what, when not native."""

    how: Realisation
    differs: str = ""


NATIVE = Envoy("native")


@dataclass(frozen=True)
class Option:
    """One option: its AST key, how it is written, its grammar rule, its default."""

    key: str
    syntax: str
    rule: str
    default: Any = None
    envoy: Envoy | None = None  # None: as its statement's form


@dataclass(frozen=True)
class Form:
    """One form of a statement (`hedge after` / `hedge at`), or the only one (`name` None)."""

    name: str | None
    syntax: str
    rule: str
    options: tuple[Option, ...] = ()
    envoy: Envoy = NATIVE

    def option(self, key: str) -> Option:
        for opt in self.options:
            if opt.key == key:
                return opt
        raise KeyError(f"{self.syntax}: no option {key}")

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(o.key for o in self.options)


@dataclass(frozen=True)
class Statement:
    """A directive: its AST kind, first word(s), blocks, forms, merge rule and plan field.

    `merge`: `replace` (a later line of the directive replaces an earlier one, across
    defaults, policies, the service and a shard), `accumulate` (lines add up in that
    order), `list` (endpoint lines: only in services and shards, each one counts),
    `once` (at most once in its block), `block` (a named block: declarations).
    """

    kind: str
    words: str
    blocks: frozenset[str]
    forms: tuple[Form, ...]
    merge: Merge
    meaning: str
    field: str | None = None  # the ServicePlan/ShardPlan (or Plan) field it fills
    app_options: tuple[str, ...] | None = None  # `health` in an app block takes fewer options
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # other defaults

    def form(self, name: str | None) -> Form:
        for f in self.forms:
            if f.name == name:
                return f
        if len(self.forms) == 1 and self.forms[0].name is None:
            return self.forms[0]
        raise KeyError(f"{self.words}: no form {name}")

    @property
    def keyword(self) -> str:
        return self.words.split()[0]

    def where(self) -> str:
        """Where the statement may stand, in words (for RP219's hint)."""
        blocks = self.blocks
        if blocks == {"top"}:
            return "at the top of the file"
        if blocks == POLICY_BLOCKS:
            return "in policy blocks (defaults, policy, service, shard)"
        if blocks == {"service"}:
            return "in service blocks"
        if blocks == ENDPOINT_BLOCKS:
            return "in service and shard blocks"
        if blocks == {"service", "shard", "app"}:
            return "in service, shard and app blocks"
        if blocks == {"app"}:
            return "in an app block"
        return "in " + ", ".join(sorted(blocks)) + " blocks"


# ---- option helpers ------------------------------------------------------------------------


def _o(key: str, syntax: str, rule: str | None = None, default: Any = None, envoy: Envoy | None = None) -> Option:
    return Option(key, syntax, rule or key.replace("-", "_"), default, envoy)


_HEALTH_OPTIONS = (
    _o("method", "METHOD", "NAME", plan_default(HealthSpec, "method")),
    _o("every", "every D", default=plan_default(HealthSpec, "interval")),
    _o("timeout", "timeout D", "health_timeout", plan_default(HealthSpec, "timeout")),
    _o("fall", "fall N", default=plan_default(HealthSpec, "fall")),
    _o("rise", "rise N", default=plan_default(HealthSpec, "rise")),
    _o("expect", "expect STATUS, ...", default=plan_default(HealthSpec, "expect")),
)
_BREAKER_COMMON = (
    _o("open", "open D", default=plan_default(BreakerSpec, "open")),
    _o("probes", "probes K", default=plan_default(BreakerSpec, "probes")),
)
_BREAKER_ENVOY = Envoy(
    "approximate",
    "the Lua filter's breaker judges each attempt by the breaker as its call found it plus the call's "
    "own attempts (other calls' outcomes meanwhile count from the next call); `slow` is judged on a "
    "call's last attempt; each Envoy worker keeps its own",
)
_ENDPOINT_RESOLVE = _o(
    "resolve",
    "resolve [every D]",
    default=DEFAULT_RESOLVE_EVERY,
)
_CHAOS_ENVOY = Envoy(
    "approximate",
    "Envoy's fault filter injects once per call, before the retries, not on every attempt",
)
_SHARD_ENVOY = Envoy(
    "extension",
    "the Lua filter maps the key to its shard's cluster with the same rendezvous hash as the python engine",
)

# ---- the table --------------------------------------------------------------------------------

_TABLE: tuple[Statement, ...] = (
    # top level (section 3)
    Statement(
        "app",
        "app",
        frozenset({"top"}),
        (Form(None, "app NAME [{ ... }]", "app"),),
        "once",
        "the app this sidecar serves; the block form supervises it",
        "app",
    ),
    Statement(
        "listen", "listen", frozenset({"top"}), (Form(None, "listen HOST:PORT", "listen"),), "once",
        "where the app's outbound calls arrive", "listen", extra={"default": DEFAULT_LISTEN},
    ),
    Statement(
        "admin", "admin", frozenset({"top"}), (Form(None, "admin HOST:PORT", "admin"),), "once",
        "the admin endpoints", "admin", extra={"default": DEFAULT_ADMIN},
    ),
    Statement(
        "defaults", "defaults", frozenset({"top"}), (Form(None, "defaults { POLICY... }", "defaults"),), "once",
        "policy statements every service starts from",
    ),
    Statement(
        "policy", "policy", frozenset({"top"}), (Form(None, "policy NAME { POLICY... }", "policy"),), "block",
        "a named, reusable set of policy statements",
    ),
    Statement(
        "service", "service", frozenset({"top"}), (Form(None, "service NAME { SERVICE... }", "service"),), "block",
        "an outbound dependency", "services",
    ),
    Statement(
        "resolver", "resolver", frozenset({"top"}), (Form(None, "resolver HOST:PORT[, HOST:PORT...]", "resolver"),),
        "once", "the DNS servers that `resolve` asks", "resolver",
    ),
    Statement(
        "store", "store", frozenset({"top"}), (Form(None, "store URL", "store"),), "once",
        "the shared store for `shared` limits", "store",
    ),
    # the supervised app (section 6)
    Statement(
        "run", "run", frozenset({"app"}), (Form(None, 'run "COMMAND"', "run"),), "once",
        "the app's command, supervised", "supervise",
    ),
    Statement(
        "restart", "restart", frozenset({"app"}), (Form(None, "restart backoff D..D", "restart"),), "once",
        "the backoff between restarts of the app", "supervise",
        extra={"base": plan_default(SuperviseSpec, "restart_base"), "max": plan_default(SuperviseSpec, "restart_max")},
    ),
    # policy statements (section 4)
    Statement(
        "timeout", "timeout", POLICY_BLOCKS, (Form(None, "timeout D", "timeout"),), "replace",
        "deadline for the whole call, retries and hedges included", "timeout",
        extra={"default": BUILTIN_TIMEOUT},
    ),
    Statement(
        "retry",
        "retry",
        POLICY_BLOCKS,
        (
            Form(
                None,
                "retry N",
                "retry",
                (
                    _o("on", "on COND, ...", default=DEFAULT_RETRY_ON),
                    _o("backoff", "backoff D..D | backoff D"),
                    _o(
                        "jitter",
                        "jitter full|equal|decorrelated|none",
                        default=plan_default(BackoffSpec, "jitter"),
                    ),
                    _o("per-try", "per-try D"),
                    _o(
                        "budget",
                        "budget P% [min R]",
                        default=plan_default(BudgetSpec, "min_per_second"),
                        envoy=Envoy(
                            "approximate",
                            "retries after an answer are budgeted as riprap does, in each Envoy worker; resends "
                            "after a connect failure or a reset, and hedge copies, are capped only by Envoy's "
                            "in-flight retry budget (P% of requests in flight, at least `min` at once)",
                        ),
                    ),
                    _o("methods", "methods M, ..."),
                ),
                Envoy(
                    "approximate",
                    "Envoy's `reset` condition also covers a per-try timeout; with a `per-try` time or a "
                    "hedge, Envoy waits between attempts itself: a fully jittered backoff, and a Retry-After "
                    "rounded up to whole seconds (plus up to half of it); under `reset` or `timeout`, an "
                    "answer head over 1 MiB or 4096 headers is retried like a reset (riprap: a 502, never "
                    "retried)",
                ),
            ),
        ),
        "replace",
        "up to N retries after the first try",
        "retry",
    ),
    Statement(
        "hedge",
        "hedge",
        POLICY_BLOCKS,
        (
            Form(
                "after",
                "hedge after D",
                "hedge_after",
                (_o("max", "max N", default=plan_default(HedgeSpec, "max_extra")),),
                Envoy(
                    "approximate",
                    "Envoy hedges on the per-try timeout: the copy is sent when a try has waited D, "
                    "and copies count against the retries",
                ),
            ),
            Form(
                "at",
                "hedge at pNN",
                "hedge_at",
                (
                    _o("min", "min D", default=plan_default(HedgeSpec, "min_delay")),
                    _o("max", "max N", default=plan_default(HedgeSpec, "max_extra")),
                ),
                Envoy(
                    "approximate",
                    "the Lua filter sets the hedge delay from the observed latency of whole calls "
                    "(not attempts), per Envoy worker",
                ),
            ),
        ),
        "replace",
        "extra copies of a slow call",
        "hedge",
    ),
    Statement(
        "breaker",
        "breaker",
        POLICY_BLOCKS,
        (
            Form("failures", "breaker failures N", "breaker_failures", _BREAKER_COMMON, _BREAKER_ENVOY),
            Form(
                "failure-rate",
                "breaker failure-rate P%",
                "breaker_rate",
                (
                    _o("window", "window N", default=plan_default(BreakerSpec, "window")),
                    _o("min", "min M", "min_calls", plan_default(BreakerSpec, "min_calls")),
                    *_BREAKER_COMMON,
                    _o("slow", "slow D"),
                ),
                _BREAKER_ENVOY,
            ),
        ),
        "replace",
        "fail fast while the service is failing",
        "breaker",
    ),
    Statement(
        "limit",
        "limit",
        POLICY_BLOCKS,
        (
            Form(
                None,
                "limit R",
                "limit",
                (
                    _o("burst", "burst B"),
                    _o(
                        "per-header",
                        "per header NAME",
                        "per_header",
                        envoy=Envoy(
                            "approximate",
                            "Envoy keeps each value whole (not a fixed-size digest) among its bounded buckets",
                        ),
                    ),
                    _o(
                        "shared",
                        "shared",
                        envoy=Envoy(
                            "extension",
                            "Envoy's global rate limit filter asks riprap's rate limit service on loopback, "
                            "which keeps the bucket in the store",
                        ),
                    ),
                ),
                Envoy(
                    "approximate",
                    "a reload that changes any service's local limit starts every local bucket full again "
                    "(Envoy's local rate limit filter is configured as one whole); other reloads keep them",
                ),
            ),
        ),
        "replace",
        "token bucket on calls to the service",
        "limit",
    ),
    Statement(
        "concurrency",
        "concurrency",
        POLICY_BLOCKS,
        (
            Form(
                None,
                "concurrency N",
                "concurrency",
                (
                    _o(
                        "queue",
                        "queue Q",
                        default=plan_default(ConcurrencySpec, "queue"),
                        envoy=Envoy(
                            "approximate",
                            "the queue is Envoy's pending-request queue: a call waiting for a new upstream "
                            "connection to open also takes a place in it",
                        ),
                    ),
                    _o(
                        "queue-timeout",
                        "queue-timeout D",
                        default=plan_default(ConcurrencySpec, "queue_timeout"),
                        envoy=Envoy(
                            "approximate",
                            "a queued call waits until a slot frees or its timeout, not at most `queue-timeout` "
                            "(Envoy's pending requests have no wait bound of their own)",
                        ),
                    ),
                ),
            ),
        ),
        "replace",
        "at most N calls in flight",
        "concurrency",
    ),
    Statement(
        "fallback",
        "fallback",
        POLICY_BLOCKS,
        (
            Form("json", "fallback status CODE json VALUE", "fallback_json"),
            Form("text", 'fallback status CODE text "..."', "fallback_text"),
            Form("file", 'fallback status CODE file "PATH"', "fallback_file"),
            Form(
                "service",
                "fallback service NAME",
                "fallback_service",
                envoy=Envoy(
                    "extension",
                    "the Lua filter resends the call through Envoy's own listener to the other service, "
                    "whose whole policy applies",
                ),
            ),
            Form(
                "stale",
                "fallback stale D",
                "fallback_stale",
                envoy=Envoy("extension", "the last good answers are kept by the Lua filter, per Envoy worker"),
            ),
        ),
        "accumulate",
        "what answers a call that failed",
        "fallbacks",
    ),
    Statement(
        "chaos",
        "chaos",
        POLICY_BLOCKS,
        (
            Form(
                "abort",
                "chaos abort P%",
                "chaos_abort",
                (_o("status", "status CODE", "chaos_status", 503),),
                envoy=_CHAOS_ENVOY,
            ),
            Form("delay", "chaos delay P% D", "chaos_delay", envoy=_CHAOS_ENVOY),
        ),
        "accumulate",
        "fault injection (with --chaos)",
        "chaos",
    ),
    Statement(
        "tls",
        "tls",
        POLICY_BLOCKS,
        (
            Form(
                None,
                "tls",
                "tls",
                (
                    _o("ca", 'ca "PATH"', "tls_ca"),
                    _o("cert", 'cert "PATH"', "tls_cert"),
                    _o("key", 'key "PATH"', "tls_key"),
                    _o("sni", "sni NAME", "tls_sni"),
                    _o("verify", "verify on|off", "tls_verify", "on" if plan_default(TlsSpec, "verify") else "off"),
                ),
            ),
        ),
        "replace",
        "how https:// endpoints are called",
        "tls",
    ),
    # service statements (section 5)
    Statement(
        "use", "use", frozenset({"service"}), (Form(None, "use NAME", "use"),), "accumulate",
        "apply a named policy",
    ),
    Statement(
        "host", "host", frozenset({"service"}), (Form(None, "host NAME[, NAME...]", "host"),), "accumulate",
        "more host names that route to this service", "hosts",
    ),
    Statement(
        "endpoint",
        "endpoint",
        ENDPOINT_BLOCKS,
        (
            Form(
                None,
                "endpoint URL",
                "endpoint",
                (_o("weight", "weight W", default=plan_default(EndpointSpec, "weight")), _ENDPOINT_RESOLVE),
            ),
        ),
        "list",
        "a primary replica (tier 0)",
        "endpoints",
    ),
    Statement(
        "failover",
        "failover",
        ENDPOINT_BLOCKS,
        (
            Form(
                None,
                "failover URL",
                "failover",
                (
                    _o("weight", "weight W", default=plan_default(EndpointSpec, "weight")),
                    _o("tier", "tier T", default=1),
                    _ENDPOINT_RESOLVE,
                ),
            ),
        ),
        "list",
        "a backup replica (tier 1 by default)",
        "endpoints",
    ),
    Statement(
        "balance", "balance", ENDPOINT_BLOCKS, (Form(None, "balance round-robin|least-request|random", "balance"),),
        "replace", "how endpoints within a tier are chosen", "balance",
        extra={"default": plan_default(ServicePlan, "balance")},
    ),
    Statement(
        "health",
        "health",
        frozenset({"service", "shard", "app"}),
        (
            Form(
                None,
                "health [METHOD] PATH",
                "health",
                _HEALTH_OPTIONS,
                envoy=Envoy(
                    "approximate",
                    "Envoy counts an endpoint healthy only after its first passing check (riprap starts it healthy)",
                ),
            ),
        ),
        "replace",
        "active health checks on every endpoint (in an app block: of the app)",
        "health",
        app_options=("method", "every", "timeout", "fall"),
        extra={"app-every": plan_default(AppHealthSpec, "interval"), "app-timeout": plan_default(AppHealthSpec, "timeout"),
               "app-fall": plan_default(AppHealthSpec, "fall")},
    ),
    Statement(
        "outlier",
        "outlier",
        ENDPOINT_BLOCKS,
        (
            Form(
                None,
                "outlier failures N",
                "outlier",
                (
                    _o("eject", "eject D", default=plan_default(OutlierSpec, "eject")),
                    _o("max", "max P%", "max_pct", plan_default(OutlierSpec, "max_fraction")),
                ),
                envoy=Envoy(
                    "approximate",
                    "Envoy lowers an endpoint's ejection count by one for every sweep (D/5, at most 1 s) "
                    "it stays in, so a later ejection can be shorter than D times the ejections so far",
                ),
            ),
        ),
        "replace",
        "passive ejection of failing endpoints",
        "outlier",
    ),
    Statement(
        "shard-by",
        "shard by",
        frozenset({"service"}),
        (
            Form("header", "shard by header NAME", "shard_by", envoy=_SHARD_ENVOY),
            Form("query", "shard by query NAME", "shard_by", envoy=_SHARD_ENVOY),
            Form("cookie", "shard by cookie NAME", "shard_by", envoy=_SHARD_ENVOY),
            Form("path-segment", "shard by path-segment N", "shard_by_segment", envoy=_SHARD_ENVOY),
        ),
        "once",
        "the key the service is sharded on",
        "sharding",
    ),
    Statement(
        "shard",
        "shard",
        frozenset({"service"}),
        (Form(None, "shard NAME { ... }", "shard", envoy=_SHARD_ENVOY),),
        "block",
        "one shard of a sharded service",
        "shards",
    ),
    Statement(
        "shard-default",
        "shard default",
        frozenset({"service"}),
        (Form(None, "shard default NAME", "shard_default", envoy=_SHARD_ENVOY),),
        "once",
        "where requests without a key go",
        "sharding",
    ),
)

STATEMENTS: Mapping[str, Statement] = {s.kind: s for s in _TABLE}
BLOCKS: tuple[str, ...] = ("top", "defaults", "policy", "service", "shard", "app")

# what the rest of dsl derives --------------------------------------------------------------------

# every statement's first word, for the syntax-error vocabulary
DIRECTIVES: tuple[str, ...] = tuple(dict.fromkeys(s.keyword for s in _TABLE))
# block -> the statements allowed in it
ALLOWED: Mapping[str, frozenset[str]] = {
    b: frozenset(s.kind for s in _TABLE if b in s.blocks) for b in BLOCKS
}
# directives where a later line replaces an earlier one (policy layering and RP304)
REPLACING: frozenset[str] = frozenset(s.kind for s in _TABLE if s.merge == "replace")
ACCUMULATING: frozenset[str] = frozenset(
    s.kind for s in _TABLE if s.merge == "accumulate" and POLICY_BLOCKS <= s.blocks
)
# (kind, form) -> its option keys, in canonical order
OPTIONS: Mapping[tuple[str, str | None], tuple[str, ...]] = {
    (s.kind, f.name): f.keys for s in _TABLE for f in s.forms
}
# kind -> the canonical order of its options (over all its forms)
OPTION_ORDER: Mapping[str, tuple[str, ...]] = {
    s.kind: tuple(dict.fromkeys(k for f in s.forms for k in f.keys)) for s in _TABLE
}
# grammar rule -> (kind, form), for the statements the transformer builds generically
RULES: Mapping[str, tuple[str, str | None]] = {
    f.rule: (s.kind, f.name) for s in _TABLE for f in s.forms if f.rule != "shard_by"
}
# grammar option rule -> option key
OPTION_RULES: Mapping[str, str] = {
    o.rule: o.key for s in _TABLE for f in s.forms for o in f.options if o.rule != "NAME"
}


def default(kind: str, key: str, form: str | None = None) -> Any:
    """The default of option `key` of a statement (from dsl/plan.py), or of `extra[key]`."""
    stmt = STATEMENTS[kind]
    if key in stmt.extra:
        return stmt.extra[key]
    forms = [stmt.form(form)] if form is not None or len(stmt.forms) == 1 else list(stmt.forms)
    for f in forms:
        for opt in f.options:
            if opt.key == key:
                return opt.default
    raise KeyError(f"{stmt.words} has no default for {key}")


def realisation(engine: str, kind: str, form: str | None = None, option: str | None = None) -> Envoy:
    """How `engine` runs a statement's form (or one of its options)."""
    if engine == "python":
        return NATIVE
    if engine != "envoy":
        raise ValueError(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    f = STATEMENTS[kind].form(form)
    if option is not None:
        opt = f.option(option)
        return opt.envoy if opt.envoy is not None else f.envoy
    return f.envoy


@dataclass(frozen=True)
class Use:
    """A statement a resolved scope uses (`option`: one of its options that an engine may
    realise differently from the statement itself)."""

    kind: str
    form: str | None = None
    option: str | None = None

    @property
    def text(self) -> str:
        """The statement as people write it: `hedge at`, `fallback stale`, `retry ... budget`."""
        stmt = STATEMENTS[self.kind]
        words = stmt.words
        if self.form is not None:
            words = f"{words} status ... {self.form}" if self.kind == "fallback" and self.form in ("json", "text", "file") else f"{words} {self.form}"
        return f"{words} ... {self.option}" if self.option else words

    def realisation(self, engine: str) -> Envoy:
        return realisation(engine, self.kind, self.form, self.option)
