"""The compiled plan: fully resolved, unit-converted, JSON-shaped specs.

Specs are plain data (frozen dataclasses); `policies/` builds live objects from them.
Every duration is in seconds (float), every percentage a fraction in 0..1, every rate
per second. `to_dict`/`from_dict` round-trip exactly, and `digest` hashes the canonical
JSON so that two equal plans have the same hash in every process.

The JSON shape is pinned by `plan.schema.json` (`dsl.schema.validate_plan_dict`): the
compiler validates every plan it writes, and `dsl.loader.load_plan_source` every plan
`.json` it reads, before `Plan.from_dict` builds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal, Mapping

PLAN_VERSION = 1
BUILTIN_TIMEOUT = 15.0
DEFAULT_LISTEN = "127.0.0.1:7400"
DEFAULT_ADMIN = "127.0.0.1:7401"
DEFAULT_RETRY_ON = ("connect-failure", "reset", "502", "503", "504")
IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE")
DEFAULT_BODY_BUFFER = 1024 * 1024
DEFAULT_RESOLVE_EVERY = 5.0  # `resolve` without `every`: seconds between DNS lookups

# Where each policy sits around a call, outermost first. The compiler writes this into
# every service plan; the pipeline builds in this order and `explain` prints it.
DEFAULT_ORDER = (
    "fallback",  # answers when everything inside failed
    "limit",  # token bucket: one token per call, not per attempt
    "concurrency",  # bulkhead: one slot per call
    "timeout",  # the whole-call deadline, retries and hedges included
    "retry",  # attempts, backoff, budget
    "hedge",  # extra copies of one attempt
    "breaker",  # fail fast per attempt, scoped to service or shard
    "chaos",  # injected faults, just before the attempt leaves
    "balance",  # tier, health, outlier ejection, endpoint choice
)

JitterKind = Literal["full", "equal", "decorrelated", "none"]
BalanceKind = Literal["round-robin", "least-request", "random"]
ShardKeyKind = Literal["header", "query", "cookie", "path-segment"]


@dataclass(frozen=True)
class BudgetSpec:
    """Retries allowed as a fraction of calls over `window` seconds, never below `min_per_second`."""

    ratio: float
    min_per_second: float = 10.0
    window: float = 10.0


@dataclass(frozen=True)
class BackoffSpec:
    """`exponential`: base doubling up to `max`; `constant`: always `base` (max == base)."""

    kind: Literal["exponential", "constant"]
    base: float
    max: float
    jitter: JitterKind = "full"


@dataclass(frozen=True)
class RetrySpec:
    retries: int
    on: tuple[str, ...] = DEFAULT_RETRY_ON  # "connect-failure" "reset" "timeout" "503" "5xx"
    backoff: BackoffSpec | None = None  # None: retry at once
    per_try_timeout: float | None = None
    budget: BudgetSpec | None = None
    methods: tuple[str, ...] = IDEMPOTENT_METHODS  # methods that may be retried


@dataclass(frozen=True)
class HedgeSpec:
    """Fixed `delay`, or `percentile` (0..1) of observed latency, never below `min_delay`."""

    delay: float | None = None
    percentile: float | None = None
    min_delay: float = 0.010
    initial_delay: float = 0.100  # used until `warmup_calls` latencies were seen
    warmup_calls: int = 20
    max_extra: int = 1


@dataclass(frozen=True)
class BreakerSpec:
    """`consecutive`: opens after `failures` failures in a row; `rate`: at `rate` of the last `window`."""

    kind: Literal["consecutive", "rate"]
    failures: int | None = None
    rate: float | None = None
    window: int = 20
    min_calls: int = 10
    open: float = 30.0
    max_open: float = 300.0  # open time doubles on each reopen up to this (10 x open)
    probes: int = 1
    slow: float | None = None


@dataclass(frozen=True)
class LimitSpec:
    rate: float  # tokens per second
    burst: float  # bucket size
    per_header: str | None = None
    max_keys: int = 10_000  # per-key buckets kept in a bounded LRU
    shared: bool = False  # one bucket for the fleet, kept in the plan's `store`


@dataclass(frozen=True)
class ConcurrencySpec:
    max: int
    queue: int = 0
    queue_timeout: float = 1.0


@dataclass(frozen=True)
class FallbackSpec:
    """One link of a fallback chain.

    `static`: answer `status` with `body` (text) and `content_type`; `file` keeps the
    resolved path of a `file "..."` source so the reloader can watch it.
    `service`: resend the call to service `service`.
    `stale`: the last good answer to the same method and URL, if younger than `max_age`.
    """

    kind: Literal["static", "service", "stale"]
    status: int | None = None
    body: str | None = None
    content_type: str | None = None
    file: str | None = None
    service: str | None = None
    max_age: float | None = None


@dataclass(frozen=True)
class ChaosSpec:
    kind: Literal["abort", "delay"]
    probability: float
    status: int | None = None  # abort
    delay: float | None = None  # delay


@dataclass(frozen=True)
class EndpointSpec:
    url: str
    weight: int = 1
    tier: int = 0  # 0 primary; failover tiers 1, 2, ...
    resolve: float | None = None  # `resolve [every D]`: DNS re-lookup interval; None: not resolved


@dataclass(frozen=True)
class TlsSpec:
    """`tls ...`: how `https://` endpoints are called. Paths are absolute (resolved by the compiler)."""

    ca: str | None = None  # PEM bundle trusted instead of the system store
    cert: str | None = None  # client certificate (mutual TLS), with `key`
    key: str | None = None
    sni: str | None = None  # server name sent and verified; None: the endpoint's host
    verify: bool = True


@dataclass(frozen=True)
class HealthSpec:
    path: str
    method: str = "GET"
    interval: float = 5.0
    timeout: float = 1.0
    fall: int = 3
    rise: int = 2
    expect: tuple[str, ...] = ("2xx",)


@dataclass(frozen=True)
class OutlierSpec:
    failures: int
    eject: float = 30.0
    max_fraction: float = 0.5


@dataclass(frozen=True)
class ShardingSpec:
    by: ShardKeyKind
    key: str  # header/query/cookie name, or the 1-based path segment number as text
    default: str | None = None


@dataclass(frozen=True)
class ShardPlan:
    """One shard, fully resolved: the service's policies with the shard's own on top."""

    name: str
    endpoints: tuple[EndpointSpec, ...]
    balance: BalanceKind = "least-request"
    health: HealthSpec | None = None
    outlier: OutlierSpec | None = None
    timeout: float = BUILTIN_TIMEOUT
    retry: RetrySpec | None = None
    hedge: HedgeSpec | None = None
    breaker: BreakerSpec | None = None
    limit: LimitSpec | None = None
    concurrency: ConcurrencySpec | None = None
    fallbacks: tuple[FallbackSpec, ...] = ()
    chaos: tuple[ChaosSpec, ...] = ()
    tls: TlsSpec | None = None


@dataclass(frozen=True)
class ServicePlan:
    """An outbound dependency. A service has `endpoints` or `shards`, never both."""

    name: str
    hosts: tuple[str, ...] = ()  # host names routed here besides `name`
    endpoints: tuple[EndpointSpec, ...] = ()
    balance: BalanceKind = "least-request"
    health: HealthSpec | None = None
    outlier: OutlierSpec | None = None
    timeout: float = BUILTIN_TIMEOUT
    retry: RetrySpec | None = None
    hedge: HedgeSpec | None = None
    breaker: BreakerSpec | None = None
    limit: LimitSpec | None = None
    concurrency: ConcurrencySpec | None = None
    fallbacks: tuple[FallbackSpec, ...] = ()
    chaos: tuple[ChaosSpec, ...] = ()
    tls: TlsSpec | None = None
    sharding: ShardingSpec | None = None
    shards: tuple[ShardPlan, ...] = ()
    order: tuple[str, ...] = DEFAULT_ORDER
    max_body_buffer: int = DEFAULT_BODY_BUFFER


@dataclass(frozen=True)
class AppHealthSpec:
    url: str
    method: str = "GET"
    interval: float = 5.0
    timeout: float = 1.0
    fall: int = 3


@dataclass(frozen=True)
class SuperviseSpec:
    """`app NAME { run ...; health ...; restart backoff A..B }`: the supervised app."""

    run: str
    health: AppHealthSpec | None = None
    restart_base: float = 1.0
    restart_max: float = 30.0
    healthy_reset: float = 60.0  # backoff resets after this long healthy
    stop_timeout: float = 10.0  # SIGTERM, then SIGKILL after this


@dataclass(frozen=True)
class Plan:
    version: int = PLAN_VERSION
    app: str = "app"
    listen: str = DEFAULT_LISTEN
    admin: str = DEFAULT_ADMIN
    services: Mapping[str, ServicePlan] = field(default_factory=dict)
    supervise: SuperviseSpec | None = None
    resolver: tuple[str, ...] = ()  # `resolver HOST:PORT, ...`; empty: the system's resolv.conf
    store: str | None = None  # `store redis://...`: where `shared` limits live
    source: str | None = None  # the policy file this plan came from (absolute path)
    watch: tuple[str, ...] = ()  # every file the plan depends on (policy, fallback and TLS files)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = _to_jsonable(self)
        return data

    def digest(self) -> str:
        """sha256 of the canonical JSON, without `source` and `watch` (where it came from)."""
        data = self.to_dict()
        data.pop("source", None)
        data.pop("watch", None)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        """Build a plan from its JSON form. Validate with `dsl.schema.validate_plan` first."""
        services = {
            name: _service_from_dict(name, svc) for name, svc in data.get("services", {}).items()
        }
        sup = data.get("supervise")
        return cls(
            version=data.get("version", PLAN_VERSION),
            app=data.get("app", "app"),
            listen=data.get("listen", DEFAULT_LISTEN),
            admin=data.get("admin", DEFAULT_ADMIN),
            services=services,
            supervise=_supervise_from_dict(sup) if sup else None,
            resolver=tuple(data.get("resolver", ())),
            store=data.get("store"),
            source=data.get("source"),
            watch=tuple(data.get("watch", ())),
        )


def _to_jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_to_jsonable(v) for v in value]
    return value


def _build(cls: type, data: Mapping[str, Any] | None, **nested: Any) -> Any:
    """Instantiate a flat spec dataclass, turning JSON lists back into tuples."""
    if data is None:
        return None
    kwargs: dict[str, Any] = {}
    names = {f.name for f in fields(cls)}
    for key, val in data.items():
        if key not in names:
            continue
        if key in nested:
            kwargs[key] = nested[key]
        elif isinstance(val, list):
            kwargs[key] = tuple(val)
        else:
            kwargs[key] = val
    return cls(**kwargs)


def _retry_from_dict(data: Mapping[str, Any] | None) -> RetrySpec | None:
    if data is None:
        return None
    spec: RetrySpec = _build(
        RetrySpec,
        data,
        backoff=_build(BackoffSpec, data.get("backoff")),
        budget=_build(BudgetSpec, data.get("budget")),
    )
    return spec


def _policy_kwargs(data: Mapping[str, Any]) -> dict[str, Any]:
    """The fields shared by services and shards, built from JSON."""
    return {
        "endpoints": tuple(_build(EndpointSpec, e) for e in data.get("endpoints", ())),
        "health": _build(HealthSpec, data.get("health")),
        "outlier": _build(OutlierSpec, data.get("outlier")),
        "retry": _retry_from_dict(data.get("retry")),
        "hedge": _build(HedgeSpec, data.get("hedge")),
        "breaker": _build(BreakerSpec, data.get("breaker")),
        "limit": _build(LimitSpec, data.get("limit")),
        "concurrency": _build(ConcurrencySpec, data.get("concurrency")),
        "fallbacks": tuple(_build(FallbackSpec, f) for f in data.get("fallbacks", ())),
        "chaos": tuple(_build(ChaosSpec, c) for c in data.get("chaos", ())),
        "tls": _build(TlsSpec, data.get("tls")),
    }


def _service_from_dict(name: str, data: Mapping[str, Any]) -> ServicePlan:
    nested = _policy_kwargs(data)
    nested["sharding"] = _build(ShardingSpec, data.get("sharding"))
    nested["shards"] = tuple(
        _build(ShardPlan, s, **_policy_kwargs(s)) for s in data.get("shards", ())
    )
    merged = dict(data)
    merged.setdefault("name", name)
    service: ServicePlan = _build(ServicePlan, merged, **nested)
    return service


def _supervise_from_dict(data: Mapping[str, Any]) -> SuperviseSpec:
    spec: SuperviseSpec = _build(SuperviseSpec, data, health=_build(AppHealthSpec, data.get("health")))
    return spec
