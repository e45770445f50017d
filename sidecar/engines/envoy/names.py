"""Stable Envoy names for riprap's services and shards (envoyrun reads stats by them)."""

from __future__ import annotations

RATELIMIT_CLUSTER = "_riprap_ratelimit"  # service names start with a letter: no clash
SELF_CLUSTER = "_riprap_self"  # Envoy's own listener (`fallback service`, lua/riprap.lua)


def cluster_name(service: str, shard: str | None = None) -> str:
    """`payments`, or `inventory/a` for shard `a` of `inventory` (names cannot contain `/`)."""
    return service if shard is None else f"{service}/{shard}"


__all__ = ["RATELIMIT_CLUSTER", "SELF_CLUSTER", "cluster_name"]
