"""`riprap explain`: each service's resolved policy in plain words, with its worst case.

Everything printed comes from the compiled plan (so it is what the sidecar enforces,
after defaults and `use`), in the order the policies wrap a call. The worst-case
numbers come from dsl/worstcase.py, the one place that math lives.
"""

from __future__ import annotations

from dsl.plan import EndpointSpec, Plan, ServicePlan, ShardPlan
from dsl.units import CompiledUnit
from dsl.worstcase import breakdown, fmt_seconds

_ORDER_WORDS = {
    "fallback": "fallback",
    "limit": "rate limit",
    "concurrency": "concurrency cap",
    "timeout": "timeout",
    "retry": "retry",
    "hedge": "hedge",
    "breaker": "breaker",
    "chaos": "chaos",
    "balance": "endpoint choice",
}


def _pct(x: float) -> str:
    return f"{x * 100:g}%"


def _rate(per_second: float) -> str:
    if per_second >= 1 or per_second == 0:
        return f"{per_second:g}/s"
    if per_second * 60 >= 1:
        return f"{per_second * 60:g}/m"
    return f"{per_second * 3600:g}/h"


def shown_store(url: str | None) -> str:
    """A store URL for people: its password hidden."""
    if url is None:
        return "(none)"
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, userinfo = head.partition("://")
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{tail}" if ":" in userinfo else url


def policy_lines(p: ServicePlan | ShardPlan, store: str | None = None) -> dict[str, str]:
    """Directive -> sentence, for the policies of a service or shard (`store`: the plan's)."""
    out: dict[str, str] = {}
    out["timeout"] = f"{fmt_seconds(p.timeout)} for the whole call, retries and hedges included"
    r = p.retry
    if r is None:
        out["retry"] = "none"
    else:
        words = [f"up to {r.retries} ({r.retries + 1} attempts) on {', '.join(r.on)}"]
        if r.backoff is None:
            words.append("no backoff (retry at once)")
        elif r.backoff.kind == "constant":
            words.append(f"backoff {fmt_seconds(r.backoff.base)} each time, {r.backoff.jitter} jitter")
        else:
            words.append(
                f"backoff from {fmt_seconds(r.backoff.base)} doubling up to {fmt_seconds(r.backoff.max)}, "
                f"{r.backoff.jitter} jitter"
            )
        if r.per_try_timeout is not None:
            words.append(f"each try at most {fmt_seconds(r.per_try_timeout)}")
        if r.budget is not None:
            words.append(
                f"budget: retries at most {_pct(r.budget.ratio)} of calls over {fmt_seconds(r.budget.window)}, "
                f"at least {_rate(r.budget.min_per_second)}"
            )
        else:
            words.append("no retry budget")
        words.append(
            f"only {', '.join(r.methods)} or requests with an Idempotency-Key are retried "
            "(any method after a connect-failure)"
        )
        out["retry"] = "; ".join(words)
    h = p.hedge
    if h is None:
        out["hedge"] = "none"
    else:
        copies = f"up to {h.max_extra} extra cop{'y' if h.max_extra == 1 else 'ies'}"
        if h.delay is not None:
            out["hedge"] = f"{copies} when no answer after {fmt_seconds(h.delay)} (idempotent requests only)"
        else:
            out["hedge"] = (
                f"{copies} when no answer after the observed p{(h.percentile or 0) * 100:g} latency "
                f"(never below {fmt_seconds(h.min_delay)}; {fmt_seconds(h.initial_delay)} until "
                f"{h.warmup_calls} calls were seen; idempotent requests only)"
            )
    b = p.breaker
    if b is None:
        out["breaker"] = "none"
    else:
        if b.kind == "consecutive":
            opens = f"opens after {b.failures} consecutive failures"
        else:
            opens = (
                f"opens when failures reach {_pct(b.rate or 0)} of the last {b.window} calls "
                f"(once {b.min_calls} were seen)"
            )
            if b.slow is not None:
                opens += f", a call slower than {fmt_seconds(b.slow)} counting as a failure"
        out["breaker"] = (
            f"{opens}; open {fmt_seconds(b.open)} (doubling on each reopen up to {fmt_seconds(b.max_open)}), "
            f"then {b.probes} probe call{'s' if b.probes != 1 else ''}"
        )
    lim = p.limit
    out["limit"] = (
        "none"
        if lim is None
        else f"{_rate(lim.rate)}, burst {lim.burst:g}"
        + (f", one bucket per '{lim.per_header}' header value" if lim.per_header else "")
        + (
            f"; fleet-wide: one bucket shared by every sidecar of this app, kept in the store {shown_store(store)}"
            " (while the store does not answer, each sidecar enforces its share locally)"
            if lim.shared
            else ""
        )
        + "; over the limit: 429 with Retry-After"
    )
    c = p.concurrency
    out["concurrency"] = (
        "none"
        if c is None
        else f"at most {c.max} calls in flight"
        + (f", {c.queue} more wait up to {fmt_seconds(c.queue_timeout)}" if c.queue else "")
        + "; the rest get 503 at once"
    )
    out["balance"] = p.balance
    tiers: dict[int, list[str]] = {}
    for e in p.endpoints:
        notes = [f"weight {e.weight}"] if e.weight != 1 else []
        if e.resolve is not None:
            notes.append(f"resolved in DNS every {fmt_seconds(e.resolve)}, each address an endpoint")
        tiers.setdefault(e.tier, []).append(e.url + (f" ({'; '.join(notes)})" if notes else ""))
    if tiers:
        out["endpoints"] = "; ".join(
            ("primary: " if t == 0 else f"failover tier {t}: ") + ", ".join(urls)
            for t, urls in sorted(tiers.items())
        )
    hl = p.health
    if hl is not None:
        out["health"] = (
            f"{hl.method} {hl.path} every {fmt_seconds(hl.interval)}, timeout {fmt_seconds(hl.timeout)}; "
            f"down after {hl.fall} failures, up after {hl.rise} successes; expects {', '.join(hl.expect)}"
        )
    t = p.tls
    if t is not None:
        parts = [f"trust the CA certificates in {t.ca}" if t.ca else "trust the system's CA certificates"]
        if t.cert:
            parts.append(f"present the client certificate {t.cert} with key {t.key} (mutual TLS)")
        parts.append(f"send SNI {t.sni} and check the certificate against it" if t.sni else "SNI: the endpoint's host name")
        if not t.verify:
            parts = [p_ for p_ in parts if not p_.startswith("trust")]
            parts.append("certificates are NOT verified (verify off)")
        out["tls"] = "https endpoints: " + "; ".join(parts)
    o = p.outlier
    if o is not None:
        out["outlier"] = (
            f"eject an endpoint after {o.failures} consecutive failures for {fmt_seconds(o.eject)} "
            f"times the number of ejections, at most {_pct(o.max_fraction)} of a tier at once"
        )
    chain = []
    for i, f in enumerate(p.fallbacks, 1):
        if f.kind == "static":
            # one line per statement: a body's own line breaks (a file's last newline) are
            # shown as `\n`, the way a JSON string would
            body = (f.body or "").replace("\r", "\\r").replace("\n", "\\n")
            shown = body if len(body) <= 60 else body[:57] + "..."
            src = f" from {f.file}" if f.file else ""
            chain.append(f"{i}. answer {f.status} {f.content_type}{src}: {shown}")
        elif f.kind == "service":
            chain.append(f"{i}. resend to service '{f.service}'")
        else:
            chain.append(f"{i}. the last good answer if younger than {fmt_seconds(f.max_age or 0)}")
    out["fallback"] = "; ".join(chain) if chain else "none (the failure is returned)"
    faults = []
    for ch in p.chaos:
        if ch.kind == "abort":
            faults.append(f"abort {_pct(ch.probability)} of calls with {ch.status}")
        else:
            faults.append(f"delay {_pct(ch.probability)} of calls by {fmt_seconds(ch.delay or 0)}")
    if faults:
        out["chaos"] = "; ".join(faults) + " (only with --chaos)"
    return out


_SHOWN = (
    "endpoints",
    "balance",
    "health",
    "outlier",
    "tls",
    "fallback",
    "limit",
    "concurrency",
    "timeout",
    "retry",
    "hedge",
    "breaker",
    "chaos",
)


def explain_service(svc: ServicePlan, store: str | None = None, engine: str | None = None) -> str:
    """The resolved policy of one service, in words (`store`: the plan's, for shared limits;
    `engine`: also how that engine runs each statement)."""
    lines = [f"service {svc.name}"]
    if svc.hosts:
        lines.append(f"  hosts: {svc.name}, {', '.join(svc.hosts)}")
    lines.append("  order (outermost first): " + " > ".join(_ORDER_WORDS.get(o, o) for o in svc.order))
    words = policy_lines(svc, store)
    for key in _SHOWN:
        if key in words and not (svc.shards and key in ("endpoints", "balance")):
            lines.append(f"  {key}: {words[key]}")
    if svc.sharding is not None:
        sh = svc.sharding
        key = f"path segment {sh.key}" if sh.by == "path-segment" else f"{sh.by} {sh.key}"
        default = f"; without a key: shard {sh.default}" if sh.default else "; without a key: 400"
        lines.append(f"  sharded by {key} (rendezvous hashing){default}")
        for shard in svc.shards:
            lines.append(f"  shard {shard.name}:")
            mine = policy_lines(shard, store)
            for k in _SHOWN:
                if k in mine and (k in ("endpoints", "balance") or mine[k] != words.get(k)):
                    lines.append(f"    {k}: {mine[k]}")
    lines += ["  " + line for line in breakdown(svc).lines()]
    if engine is not None:
        from dsl.engines import engine_lines

        lines += ["  " + line for line in engine_lines(svc, engine)]
    return "\n".join(lines)


def _all_endpoints(svc: ServicePlan) -> list[EndpointSpec]:
    return list(svc.endpoints) + [e for shard in svc.shards for e in shard.endpoints]


def explain_plan(plan: Plan, service: str | None = None, engine: str | None = None) -> str:
    """A whole plan (or one service of it) in words."""
    head = [f"app {plan.app}: listens on {plan.listen}, admin on {plan.admin}"]
    if plan.supervise is not None:
        sup = plan.supervise
        text = f"  runs `{sup.run}`, restarting it with backoff {fmt_seconds(sup.restart_base)}..{fmt_seconds(sup.restart_max)}"
        if sup.health is not None:
            text += (
                f"; health {sup.health.method} {sup.health.url} every {fmt_seconds(sup.health.interval)}, "
                f"restart after {sup.health.fall} failures"
            )
        head.append(text)
    resolved = any(e.resolve is not None for svc in plan.services.values() for e in _all_endpoints(svc))
    if plan.resolver:
        head.append(f"  DNS: resolved endpoints ask {', '.join(plan.resolver)} (UDP, TCP when an answer is truncated)")
    elif resolved:
        head.append("  DNS: resolved endpoints ask the system's resolvers (/etc/resolv.conf)")
    if plan.store is not None:
        head.append(f"  store: {shown_store(plan.store)} holds the shared limits")
    blocks = ["\n".join(head)]
    for name, svc in plan.services.items():
        if service is None or name == service:
            blocks.append(explain_service(svc, plan.store, engine))
    return "\n\n".join(blocks) + "\n"


def explain_unit(unit: CompiledUnit, service: str | None = None, engine: str | None = None) -> str:
    """`explain` for one compiled file (which must have a plan)."""
    if unit.plan is None:
        return f"{unit.path}: does not compile\n"
    return f"# {unit.path}\n" + explain_plan(unit.plan, service, engine)
