"""The month rollup: month rows equal their days and hours, and reports from mixed rollups equal hour sums."""

from __future__ import annotations

import datetime as dt
import itertools
import random
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portal.cloud.models import Instance
from portal.metering import reports, resources, sampling
from portal.metering.intervals import Quantities
from portal.metering.models import QUANTITIES, PriceSheet, ResourceEvent, UsageDay, UsageHour, UsageMonth
from tests.portal.conftest import World

T0 = dt.datetime(2026, 1, 10, 7, tzinfo=dt.UTC)
T1 = dt.datetime(2026, 4, 20, 13, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def _sums(model: Any, date_field: str, month_of: Any) -> dict[tuple[str, str, dt.date], Quantities]:
    out: dict[tuple[str, str, dt.date], Quantities] = {}
    for row in model.objects.values("instance_id", "subject", date_field, *QUANTITIES):
        key = (str(row.pop("instance_id")), row.pop("subject"), month_of(row.pop(date_field)))
        out.setdefault(key, Quantities()).add(Quantities(**row))
    return out


def _month(value: dt.date | dt.datetime) -> dt.date:
    return (value.date() if isinstance(value, dt.datetime) else value).replace(day=1)


def _rows_agree() -> dict[tuple[str, str, dt.date], Quantities]:
    """Every subject's month rows are the sums of its day rows and of its hour rows, month by month."""
    months = _sums(UsageMonth, "month", _month)
    assert months == _sums(UsageDay, "day", _month)
    assert months == _sums(UsageHour, "hour", _month)
    return months


def _seed(world: World, rng: random.Random, settings: Any) -> Instance:
    """Three months of samples (with gaps) of a VM, a volume resized twice and deleted, a published port."""
    settings.SKYPORT_HEARTBEAT_SECONDS = 3600
    settings.SKYPORT_METERING_GAP_BEATS = 5  # samples more than 5 h apart leave a gap
    PriceSheet.objects.create(effective_from=dt.date(2026, 1, 1), memory_gib_hour="0.01", vcpu_hour="0.02")
    # a new sheet in the middle of a month: month rows must not be read across it
    PriceSheet.objects.create(
        effective_from=dt.date(2026, 2, 17),
        memory_gib_hour="0.013",
        vcpu_hour="0.03",
        disk_gb_month="0.1",
        address_month="1.5",
    )
    inst = Instance.objects.get(pk=world.instance_a.pk)
    at, beats = T0, []
    while at < T1:
        beats.append((at, rng.random() < 0.8))
        at += dt.timedelta(minutes=rng.choice([7, 50, 170, 290, 400, 1500]), milliseconds=rng.randrange(1000))
    rng.shuffle(beats)  # arrival order does not matter (rebuilds between neighbours)
    for when, running in beats:
        sampling.add_sample(
            inst, when, when, "heartbeat", "shared-1", running=running, memory_bytes=rng.randrange(1, 2**30)
        )
    volume = resources.volume_subject(uuid.uuid4())
    for when, size in (
        (T0 + dt.timedelta(days=3, minutes=17), 10),
        (dt.datetime(2026, 2, 28, 23, 59, tzinfo=dt.UTC), 25),
    ):
        resources.record(volume, inst.tenant_id, "volume", size, at=when)
    resources.record(volume, inst.tenant_id, "volume", 0, at=dt.datetime(2026, 4, 2, 0, 30, tzinfo=dt.UTC))
    port = resources.port_subject(7)
    resources.record(port, inst.tenant_id, inst.kind, 1, instance_id=inst.pk, at=T0 + dt.timedelta(days=20))
    resources.record(port, inst.tenant_id, inst.kind, 0, instance_id=inst.pk, at=T1 - dt.timedelta(days=2))
    return inst


def test_month_rows_follow_days_and_hours_and_recompute_gives_them_again(world: World, settings: Any) -> None:
    inst = _seed(world, random.Random(16), settings)
    months = _rows_agree()
    assert {m for _, _, m in months} == {dt.date(2026, m, 1) for m in (1, 2, 3, 4)}
    assert len({s for _, s, _ in months}) == 3  # the instance's own, the volume, the port
    before = sorted(UsageMonth.objects.values_list("subject", "month", *QUANTITIES))
    sampling.recompute([inst])
    resources.recompute(set(ResourceEvent.objects.values_list("subject", flat=True)), now=T1)
    sampling.recompute([inst])  # twice: idempotent
    _rows_agree()
    assert sorted(UsageMonth.objects.values_list("subject", "month", *QUANTITIES)) == before
    # a late sample inside March rebuilds that month's row, and only from the day rows
    sampling.add_sample(
        inst, dt.datetime(2026, 3, 15, 12, 1, tzinfo=dt.UTC), T1, "heartbeat", "n", running=True
    )
    _rows_agree()


def _hours_only(start: dt.datetime, end: dt.datetime, months: bool = True) -> Any:
    yield "hour", start, end


def _same(a: reports.Report, b: reports.Report) -> None:
    assert [line.key for line in a.lines] == [line.key for line in b.lines]
    for x, y in zip([*a.lines, a.total], [*b.lines, b.total], strict=True):
        assert x.quantities == y.quantities, x.key
        # each piece is priced on its own: Decimal division may differ far below a cent
        for field in ("memory", "vcpu", "disk", "addresses"):
            assert abs(getattr(x.cost, field) - getattr(y.cost, field)) < Decimal("1e-12"), (x.key, field)
        assert x.as_dict() == y.as_dict()


def test_reports_from_month_day_and_hour_rows_equal_reports_from_hour_rows(
    world: World, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random ranges (many on month and day edges, across the mid-month price change): the same report."""
    _seed(world, random.Random(61), settings)
    rng = random.Random(7)
    edges = [dt.datetime(2026, m, d, tzinfo=dt.UTC) for m in (1, 2, 3, 4, 5) for d in (1, 2, 17, 28)]
    hours = int((T1 - T0) / HOUR) + 48
    cases = []
    for _ in range(60):
        a, b = sorted(
            rng.choice(edges) + HOUR * rng.choice([0, 0, 1, -1, 23])
            if rng.random() < 0.5
            else T0 - 24 * HOUR + HOUR * rng.randrange(hours)
            for _ in range(2)
        )
        if a < b:
            cases.append((a, b, rng.choice(reports.GROUPS)))
    cases += [
        (dt.datetime(2025, 12, 1, tzinfo=dt.UTC), dt.datetime(2026, 6, 1, tzinfo=dt.UTC), g)
        for g in reports.GROUPS
    ]
    tenant = world.instance_a.tenant_id
    mixed = [reports.build(tenant, a, b, g) for a, b, g in cases]
    used = sum(1 for a, b, _ in cases for level, _, _ in reports._segments(a, b) if level == "month")
    assert used > 10  # the month rows were read
    monkeypatch.setattr(reports, "_segments", _hours_only)
    for (a, b, g), report in zip(cases, mixed, strict=True):
        _same(report, reports.build(tenant, a, b, g))
        # and the total is the plain sum of the hour rows
        rows = UsageHour.objects.filter(tenant_id=tenant, hour__gte=report.start, hour__lt=report.end)
        assert report.total.quantities == sampling.totals(rows.values(*QUANTITIES))


_hour = st.integers(0, 24 * 800).map(lambda h: dt.datetime(2025, 11, 1, tzinfo=dt.UTC) + h * HOUR)


@given(a=_hour, b=_hour, months=st.booleans())
def test_segments_tile_the_range_with_whole_days_and_months(
    a: dt.datetime, b: dt.datetime, months: bool
) -> None:
    start, end = min(a, b), max(a, b) + HOUR
    pieces = list(reports._segments(start, end, months))
    assert pieces[0][1] == start and pieces[-1][2] == end
    assert all(p[2] == q[1] for p, q in itertools.pairwise(pieces))
    for level, lo, hi in pieces:
        assert lo < hi
        if level != "hour":
            assert lo.hour == 0 and hi.hour == 0
        if level == "month":
            assert months and lo.day == 1 and hi.day == 1
    assert [p[0] for p in pieces].count("month") <= 1
