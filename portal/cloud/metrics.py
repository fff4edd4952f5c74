"""Instance statistics and console tails, kept in the cache (Redis in deployments).

Statistics arrive with every heartbeat: each running workload's CPU time and
memory.  The last ``KEEP`` samples per instance are kept, so the UI and
``GET /api/v1/instances/{id}/stats/`` can show recent use; CPU use is the
CPU-time delta between samples (100 % = one CPU busy).  Nothing here is
billing-grade: cgroup CPU time is what the kernel accounts to the container
or QEMU process, and history older than the cache entry is gone.

Console tails are fetched on demand: a read asks the node (at most once per
``CONSOLE_REFRESH`` seconds per instance) and answers with the newest tail it
has; the node's reply (``portal.console``) replaces it.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

from django.core.cache import cache

log = logging.getLogger(__name__)

KEEP = 60
TTL = 3600
CONSOLE_REFRESH = 2.0


def _samples_key(instance_id: str) -> str:
    return f"samples:{instance_id}"


def record(instance_id: str, at: float, cpu_time_ns: int, memory_bytes: int) -> None:
    """Append one sample (from a heartbeat); older beats delivered late are ignored."""
    record_many(at, [(instance_id, cpu_time_ns, memory_bytes)])


def record_many(
    at: float, samples: list[tuple[str, int, int]], host: tuple[str, dict[str, Any]] | None = None
) -> None:
    """Append one heartbeat's samples, ``(instance_id, cpu_time_ns, memory_bytes)`` each, and keep
    the node's host load (``(node, compute.spec.HostLoad as a dict)``) if the beat carried one.

    Two cache round trips per heartbeat (``get_many``, ``set_many``), not two per instance:
    at 40 instances a node, one round trip each was most of a heartbeat's cost and capped the
    control worker well below 100 beats a second (docs/benchmarks.md, "Control plane at scale").

    A cache that cannot be reached costs these samples, not the heartbeat: the stats are
    recent history for graphs, and a beat that raised here would not refresh its node, which the
    sweeper would then mark down (a separate ``SKYPORT_CACHE_URL`` that is away).
    """
    changed: dict[str, Any] = {}
    if host is not None:
        changed[_host_key(host[0])] = {**host[1], "at": at}
    keys = {iid: _samples_key(iid) for iid, _, _ in samples}
    try:
        stored: dict[str, list[list[float]]] = cache.get_many(list(keys.values())) if keys else {}
        for iid, cpu_time_ns, memory_bytes in samples:
            points = stored.get(keys[iid]) or []
            if points and at <= points[-1][0]:
                continue
            points.append([at, float(cpu_time_ns), float(memory_bytes)])
            changed[keys[iid]] = points[-KEEP:]
        if changed:
            cache.set_many(changed, TTL)
    except Exception as exc:  # the cache's client raises its own errors (redis.ConnectionError ...)
        log.warning("instance stats of this heartbeat not kept: the cache failed: %s", exc)


def forget(instance_id: str) -> None:
    cache.delete_many([_samples_key(instance_id), f"console:{instance_id}"])


def samples(instance_id: str) -> list[dict[str, Any]]:
    """Samples oldest first: time, memory bytes and CPU use (percent of one CPU) since the previous one."""
    points: list[list[float]] = cache.get(_samples_key(instance_id)) or []
    out = []
    for prev, cur in itertools.pairwise(points):
        dt = cur[0] - prev[0]
        used = cur[1] - prev[1]
        cpu = max(0.0, used / (dt * 1e9) * 100) if dt > 0 and used >= 0 else 0.0
        out.append({"at": cur[0], "cpu_percent": round(cpu, 2), "memory_bytes": int(cur[2])})
    return out


def console(instance_id: str) -> dict[str, Any] | None:
    """The newest console tail the node sent: ``{"text", "at", "node"}``, or None."""
    value = cache.get(f"console:{instance_id}")
    return value if isinstance(value, dict) else None


def store_console(instance_id: str, node: str, text: str, at: float) -> None:
    cache.set(f"console:{instance_id}", {"text": text, "at": at, "node": node}, TTL)


def should_refresh_console(instance_id: str) -> bool:
    """True for at most one caller per CONSOLE_REFRESH seconds per instance."""
    return bool(cache.add(f"console-req:{instance_id}", time.time(), CONSOLE_REFRESH))


def first_console_request(instance_id: str) -> float:
    """When the portal first asked for this instance's console (kept for an hour): the page says
    "no answer yet" after a while instead of "asking…" forever."""
    key = f"console-first-req:{instance_id}"
    now = time.time()
    cache.add(key, now, TTL)
    value = cache.get(key)
    return float(value) if isinstance(value, int | float) else now


def _host_key(node: str) -> str:
    return f"host:{node}"


def host(node: str) -> dict[str, Any] | None:
    """The node's host load from its newest heartbeat, with ``at`` (epoch seconds), or None."""
    value = cache.get(_host_key(node))
    return value if isinstance(value, dict) else None
