"""Usage reports: quantities and costs of one tenant over a time range, grouped.

Why this shape: whole UTC months are read from the month rollup (one row per
instance and month), the whole days around them from the day rollup and
only the partial days at the edges from the hour rows, so a year costs about
12 month rows, up to 60 day rows and 46 hour rows per instance whatever the
heartbeat period.  By day, months are not used (a month row cannot say which
day its usage was on); a price sheet starting mid-month splits the range
first, so no row is read across a price change.
Prices are applied per price period (``rating.Sheets.periods``) on sums the
database computed, so the amount of a group never depends on how many rows
it had.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from django.apps import apps
from django.db.models import QuerySet

from portal.cloud.models import Instance
from portal.metering import rating
from portal.metering.intervals import HOUR, Quantities, floor_hour
from portal.metering.models import QUANTITIES, UsageDay, UsageHour, UsageKind, UsageMonth
from portal.metering.sampling import rolled_until, sum_fields

GROUPS = ("instance", "kind", "day", "month")
#: the row field a group is keyed by (day and month: the row's date).  By instance, a port's rows
#: fold into their instance's line (they carry it); a volume's have no instance: see build()
_GROUP_FIELDS = {"instance": "instance_id", "kind": "kind", "tenant": "tenant_id"}
DAY = dt.timedelta(days=1)
#: subjects of resource rows (portal.metering.resources)
VOLUME = "volume:"


@dataclasses.dataclass
class Line:
    """One group of a report."""

    key: str
    label: str
    kind: str = ""
    quantities: Quantities = dataclasses.field(default_factory=Quantities)
    cost: rating.Cost = dataclasses.field(default_factory=rating.Cost)

    def as_dict(self) -> dict[str, Any]:
        q = self.quantities
        return {
            "key": self.key,
            "name": self.label,
            "kind": self.kind,
            "running_hours": _hours(q.running_ms),
            "covered_hours": _hours(q.covered_ms),
            "gap_hours": _hours(q.gap_ms),
            "vcpu_hours": _hours(q.vcpu_ms),
            "memory_gib_hours": _hours(Decimal(q.ram_mib_ms) / 1024),
            "used_memory_gib_hours": _hours(Decimal(q.memory_mib_ms) / 1024),
            "disk_gb_months": str((Decimal(q.disk_gb_ms) / rating.MONTH_MS).quantize(Decimal("0.000001"))),
            "address_months": str((Decimal(q.address_ms) / rating.MONTH_MS).quantize(Decimal("0.000001"))),
            "cpu_seconds": str(Decimal(q.cpu_ms) / 1000),
            "cost_memory": str(rating.cents(self.cost.memory)),
            "cost_vcpu": str(rating.cents(self.cost.vcpu)),
            "cost_disk": str(rating.cents(self.cost.disk)),
            "cost_addresses": str(rating.cents(self.cost.addresses)),
            "cost": str(rating.cents(self.cost.total)),
        }


def _hours(value_ms: int | Decimal) -> str:
    return str((Decimal(value_ms) / rating.HOUR_MS).quantize(Decimal("0.000001")))


@dataclasses.dataclass
class Report:
    tenant_id: int | None
    start: dt.datetime
    end: dt.datetime
    group_by: str
    currency: str
    lines: list[Line]
    total: Line


def _segments(
    start: dt.datetime, end: dt.datetime, months: bool = True
) -> Iterator[tuple[str, dt.datetime, dt.datetime]]:
    """``(level, lo, hi)`` pieces of ``[start, end)`` (whole hours), level ``hour``, ``day`` or ``month``.

    Whole UTC months (when ``months``) come from month rows, the whole days
    around them from day rows, the partial days at the edges from hour rows.
    """
    first_midnight = start.replace(hour=0) + (DAY if start.hour else dt.timedelta())
    last_midnight = end.replace(hour=0)
    if first_midnight >= last_midnight:
        yield "hour", start, end
        return
    if start < first_midnight:
        yield "hour", start, first_midnight
    first_month = first_midnight if first_midnight.day == 1 else _next_month(first_midnight)
    last_month = last_midnight.replace(day=1)
    if months and first_month < last_month:
        if first_midnight < first_month:
            yield "day", first_midnight, first_month
        yield "month", first_month, last_month
        if last_month < last_midnight:
            yield "day", last_month, last_midnight
    else:
        yield "day", first_midnight, last_midnight
    if last_midnight < end:
        yield "hour", last_midnight, end


def _rolled_segments(
    start: dt.datetime, end: dt.datetime, rolled: dt.datetime | None, months: bool = True
) -> Iterator[tuple[str, dt.datetime, dt.datetime]]:
    """:func:`_segments` of the part of ``[start, end)`` before the roll's mark, hours after it.

    The instances' day and month rows hold the hours before the mark only
    (``RollupMark``); the last hours, which beats still add to, come from hour rows.
    """
    cut = start if rolled is None else min(max(start, floor_hour(rolled)), end)
    pieces = list(_segments(start, cut, months)) if start < cut else []
    if cut < end:
        if pieces and pieces[-1][0] == "hour":  # the partial day before the mark: one hour read
            pieces[-1] = ("hour", pieces[-1][1], end)
        else:
            pieces.append(("hour", cut, end))
    yield from pieces


def _next_month(at: dt.datetime) -> dt.datetime:
    return at.replace(year=at.year + at.month // 12, month=at.month % 12 + 1, day=1)


def _rows(level: str, tenant_id: int | None, lo: dt.datetime, hi: dt.datetime, by: str, **only: Any) -> Any:
    rows: QuerySet[Any]
    if level == "hour":
        rows = UsageHour.objects.filter(hour__gte=lo, hour__lt=hi, **only)
    elif level == "day":
        rows = UsageDay.objects.filter(day__gte=lo.date(), day__lt=hi.date(), **only)
    else:
        rows = UsageMonth.objects.filter(month__gte=lo.date(), month__lt=hi.date(), **only)
    if tenant_id is not None:
        rows = rows.filter(tenant_id=tenant_id)
    return rows.values(by).annotate(**sum_fields()).order_by()


def build(tenant_id: int | None, start: dt.datetime, end: dt.datetime, group_by: str) -> Report:
    """The tenant's usage in ``[start, end)`` (widened to whole hours), grouped by ``group_by``.

    ``tenant_id=None`` with ``group_by="tenant"`` reports every tenant (the operators' page).
    """
    start = floor_hour(start.astimezone(dt.UTC))
    end = end.astimezone(dt.UTC)
    end = floor_hour(end) + (HOUR if end != floor_hour(end) else dt.timedelta())
    sheets = rating.Sheets()
    lines: dict[str, Line] = {}
    rolled = rolled_until()
    # a price period starts on any day: split the range by periods first, then into rollup levels;
    # by day, month rows cannot say which day their usage was on
    for p_first, p_last, sheet in sheets.periods(start.date(), (end - HOUR).date()):
        p_lo = max(start, dt.datetime.combine(p_first, dt.time(), tzinfo=dt.UTC))
        p_hi = min(end, dt.datetime.combine(p_last, dt.time(), tzinfo=dt.UTC) + DAY)
        for level, lo, hi in _rolled_segments(p_lo, p_hi, rolled, months=group_by != "day"):
            by = _GROUP_FIELDS.get(group_by, level)
            rows = list(_rows(level, tenant_id, lo, hi, by))
            if group_by == "instance" and any(row["instance_id"] is None for row in rows):
                # the volumes' rows were one group without instance: read them by volume, from
                # their own small index (grouping every row by subject too costs ~25 % more)
                rows = [row for row in rows if row["instance_id"] is not None]
                rows += _rows(level, tenant_id, lo, hi, "subject", instance__isnull=True)
            for row in rows:
                q = Quantities(**{k: row[k] or 0 for k in QUANTITIES})
                key = _key(group_by, row)
                line = lines.setdefault(key, Line(key, key))
                line.quantities.add(q)
                line.cost.add(rating.price(q, sheet))
    if group_by == "instance":
        _label(lines)
    elif group_by == "kind":
        for line in lines.values():
            line.kind = line.key
    total = Line("total", "Total")
    for line in lines.values():
        total.quantities.add(line.quantities)
        total.cost.add(line.cost)
    ordered = sorted(lines.values(), key=lambda x: x.key)
    return Report(tenant_id, start, end, group_by, sheets.currency, ordered, total)


def _label(lines: dict[str, Line]) -> None:
    """Names and kinds of the instance and volume lines (one query each)."""
    volume_ids = [k.removeprefix(VOLUME) for k in lines if k.startswith(VOLUME)]
    found = {
        str(pk): (name, kind)
        for pk, name, kind in Instance.objects.filter(
            pk__in=[k for k in lines if not k.startswith(VOLUME)]
        ).values_list("pk", "name", "kind")
    }
    if volume_ids:
        volumes = apps.get_model("storage", "Volume").objects.filter(pk__in=volume_ids)
        found |= {
            VOLUME + str(pk): (name, UsageKind.VOLUME) for pk, name in volumes.values_list("pk", "name")
        }
    for line in lines.values():
        line.label, line.kind = found.get(line.key, (line.key, ""))


def _key(group_by: str, row: dict[str, Any]) -> str:
    """The line a row adds to (by instance: a volume's rows come grouped by subject)."""
    if "subject" in row:
        return str(row["subject"])
    if group_by in _GROUP_FIELDS:
        return str(row[_GROUP_FIELDS[group_by]])
    value = row["day"] if "day" in row else row["month"] if "month" in row else row["hour"]
    if group_by == "day":
        return (value.date() if isinstance(value, dt.datetime) else value).isoformat()
    if group_by == "month":
        return (value.date() if isinstance(value, dt.datetime) else value).isoformat()[:7]
    return str(value)


def month_cost(tenant_id: int, now: dt.datetime) -> tuple[Decimal, Decimal, str]:
    """The tenant's cost so far this month and its linear forecast (unrounded), and the currency."""
    start, _ = rating.month_bounds(now.date())
    report = build(tenant_id, start, now, "kind")
    so_far = report.total.cost.total
    return so_far, rating.forecast(so_far, now), report.currency
