"""From samples to hourly quantities: a pure function, so the rules can be tested alone.

The rules (docs/metering.md):

- Samples of one instance are taken in time order; each one's state holds
  until the next sample (an observation records a start or stop at the
  instant the node saw it).
- Between two samples farther apart than ``gap_ms`` nothing is known: the
  time is a *gap*, counted as such and never billed or interpolated.
- Otherwise the time is *covered*: the root disk counts for all of it,
  compute (vCPUs, allocated and actual memory) only when the earlier sample
  says running.  Nothing counts after a ``deleted`` sample.
- CPU time is the counter's growth between two samples (its new value when
  the counter went back: the workload restarted).

Every quantity is an integer (milliseconds), so the result does not depend
on the order samples arrived in or on how often they were repeated.

Resources the portal itself owns (volumes, published ports) are not sampled:
their :class:`Change` list (began, resized, ended) is exact, and
:func:`resource_hourly` counts each amount from its change to the next one
(the last one until ``until``, "now"), never a gap.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from collections.abc import Iterable

HOUR = dt.timedelta(hours=1)
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Point:
    """One sample as the arithmetic needs it."""

    at: dt.datetime
    running: bool
    vcpus: int
    ram_mb: int
    disk_gb: int
    memory_bytes: int = 0
    cpu_time_ns: int = 0
    deleted: bool = False


@dataclasses.dataclass
class Quantities:
    """What one instance used within one hour (all integers, milliseconds)."""

    covered_ms: int = 0
    running_ms: int = 0
    vcpu_ms: int = 0
    ram_mib_ms: int = 0
    memory_mib_ms: int = 0
    disk_gb_ms: int = 0
    address_ms: int = 0
    cpu_ms: int = 0
    gap_ms: int = 0

    def add(self, other: Quantities) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def __bool__(self) -> bool:
        return any(self.as_dict().values())


def ms(delta: dt.timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def floor_hour(at: dt.datetime) -> dt.datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def _cpu_ms(p: Point, q: Point) -> int:
    if not (p.cpu_time_ns and q.cpu_time_ns):
        return 0
    grown = q.cpu_time_ns - p.cpu_time_ns
    return (grown if grown >= 0 else q.cpu_time_ns) // 1_000_000


def hourly(
    points: Iterable[Point], gap_ms: int, lo: dt.datetime | None = None, hi: dt.datetime | None = None
) -> dict[dt.datetime, Quantities]:
    """Quantities per UTC hour of the intervals between ``points``, clipped to ``[lo, hi)``.

    ``points`` may come in any order and repeat: they are sorted and
    deduplicated by time (the first of equal times wins, as the database's
    unique key keeps the first one stored).
    """
    by_time: dict[dt.datetime, Point] = {}
    for p in points:
        by_time.setdefault(p.at, p)
    ordered = [by_time[t] for t in sorted(by_time)]
    out: dict[dt.datetime, Quantities] = {}
    for p, q in itertools.pairwise(ordered):
        if p.deleted:
            break
        length = ms(q.at - p.at)
        gap = length > gap_ms
        memory_bytes = p.memory_bytes or q.memory_bytes
        cpu = 0 if gap else _cpu_ms(p, q)
        start = max(p.at, lo) if lo else p.at
        end = min(q.at, hi) if hi else q.at
        cursor = start
        while cursor < end:
            hour = floor_hour(cursor)
            stop = min(hour + HOUR, end)
            part = ms(stop - cursor)
            bucket = out.setdefault(hour, Quantities())
            if gap:
                bucket.gap_ms += part
            else:
                bucket.covered_ms += part
                bucket.disk_gb_ms += p.disk_gb * part
                if p.running:
                    bucket.running_ms += part
                    bucket.vcpu_ms += p.vcpus * part
                    bucket.ram_mib_ms += p.ram_mb * part
                    # bytes x ms, then MiB: a 200 KiB container still counts
                    bucket.memory_mib_ms += memory_bytes * part // MIB
            cursor = stop
        # CPU time belongs to the hour the interval ends in (where the counter was read)
        if cpu and (hi is None or q.at < hi) and (lo is None or q.at >= lo):
            out.setdefault(floor_hour(q.at), Quantities()).cpu_ms += cpu
    return {h: v for h, v in out.items() if v}


@dataclasses.dataclass(frozen=True)
class Change:
    """A resource holds ``amount`` (GB of a volume, 1 for a port, 0: gone) from ``at`` on."""

    at: dt.datetime
    amount: int


def _split(start: dt.datetime, end: dt.datetime) -> Iterable[tuple[dt.datetime, int]]:
    """``(hour, ms)`` pieces of ``[start, end)`` cut at UTC hour boundaries."""
    cursor = start
    while cursor < end:
        hour = floor_hour(cursor)
        stop = min(hour + HOUR, end)
        yield hour, ms(stop - cursor)
        cursor = stop


def resource_hourly(
    changes: Iterable[Change],
    field: str,
    until: dt.datetime,
    lo: dt.datetime | None = None,
    hi: dt.datetime | None = None,
    *,
    covered: bool = False,
) -> dict[dt.datetime, Quantities]:
    """``field`` (amount x ms) per UTC hour of a resource's life up to ``until``, clipped to ``[lo, hi)``.

    Changes may come in any order and repeat (deduplicated by time, the
    first wins as the unique key keeps the first stored).  ``covered`` also
    counts the time the resource existed as ``covered_ms`` (a volume's own
    line; a port adds to its instance's line, whose coverage is its samples').
    """
    by_time: dict[dt.datetime, Change] = {}
    for c in changes:
        by_time.setdefault(c.at, c)
    ordered = [by_time[t] for t in sorted(by_time)]
    ends = [c.at for c in ordered[1:]] + [until]
    out: dict[dt.datetime, Quantities] = {}
    for c, next_at in zip(ordered, ends, strict=True):
        if not c.amount:
            continue
        start = max(c.at, lo) if lo else c.at
        end = min(next_at, hi) if hi else next_at
        for hour, part in _split(start, end):
            bucket = out.setdefault(hour, Quantities())
            setattr(bucket, field, getattr(bucket, field) + c.amount * part)
            if covered:
                bucket.covered_ms += part
    return {h: v for h, v in out.items() if v}
