"""Beats write hour rows only; the roll sums day and month rows from the hours that closed.

Why: adding each beat's interval to the hour, day and month rows was three row updates per
instance per beat (docs/benchmarks.md, bench/scale.py).  Now a beat after the roll's mark
updates the hour rows alone, reports read the hours after the mark, and ``sampling.roll``
makes the day and month rows what a rebuild from the raw samples gives.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from compute.spec import NodeReport, from_json
from portal.cloud.models import Instance
from portal.metering import reports, sampling
from portal.metering.intervals import HOUR, Quantities, floor_hour
from portal.metering.models import QUANTITIES, RollupMark, UsageDay, UsageHour, UsageMonth, UsageSample
from tests.portal.conftest import World, heartbeat

ROWS = ((UsageHour, "hour"), (UsageDay, "day"), (UsageMonth, "month"))


def _three(world: World, created: dt.datetime) -> list[Instance]:
    first = Instance.objects.get(pk=world.instance_a.pk)
    insts = [first]
    for n in (2, 3):
        twin = Instance.objects.get(pk=first.pk)
        twin.pk, twin.name, twin.vcpus, twin.ram_mb = None, f"roll-{n}", n, 256 * n
        twin.save()
        insts.append(twin)
    Instance.objects.filter(pk__in=[i.pk for i in insts]).update(created_at=created)
    for model in (UsageSample, UsageHour, UsageDay, UsageMonth):
        model.objects.filter(instance__in=insts).delete()
    return insts


def _beat(insts: list[Instance], at: dt.datetime) -> list[str]:
    """One heartbeat of the node at ``at``; returns the SQL it ran."""
    items = [
        {
            "instance_id": str(i.pk),
            "kind": "vm",
            "power_state": "running",
            "memory_bytes": (n + 1) << 26,
            "cpu_time_ns": int(at.timestamp()) * (n + 1),
        }
        for n, i in enumerate(insts)
    ]
    report = from_json(NodeReport, heartbeat("shared-1", inventory=items, sent_at=at.timestamp()))
    with CaptureQueriesContext(connection) as q:
        assert sampling.record_report(report, timezone.now()) == len(insts)
    return [x["sql"] for x in q.captured_queries]


def _rows(insts: list[Instance]) -> dict[str, dict[tuple[Any, Any], Quantities]]:
    out: dict[str, dict[tuple[Any, Any], Quantities]] = {}
    for model, period in ROWS:
        got = model.objects.filter(instance__in=insts, subject="").values("instance_id", period, *QUANTITIES)
        out[period] = {(r.pop("instance_id"), r.pop(period)): Quantities(**r) for r in got}
    return out


def _sum(quantities: Any) -> Quantities:
    out = Quantities()
    for q in quantities:
        out.add(q)
    return out


def _hour_sum(insts: list[Instance], lo: dt.datetime, hi: dt.datetime) -> Quantities:
    out = Quantities()
    for row in UsageHour.objects.filter(instance__in=insts, hour__gte=lo, hour__lt=hi).values(*QUANTITIES):
        out.add(Quantities(**row))
    return out


def test_beats_after_the_mark_write_hour_rows_only_and_the_roll_sums_the_rest(
    world: World, settings: Any
) -> None:
    settings.SKYPORT_HEARTBEAT_SECONDS = 600
    settings.SKYPORT_METERING_GAP_BEATS = 3
    # beats every 10 min from 22:10 two days ago to 02:00 yesterday: across a day boundary
    midnight = floor_hour(timezone.now()).replace(hour=0) - dt.timedelta(days=1)
    base = midnight - dt.timedelta(hours=1, minutes=50)
    mark = midnight - dt.timedelta(hours=1)  # 23:00: the roll had passed 22:xx only
    insts = _three(world, base - dt.timedelta(hours=1))
    RollupMark.objects.update_or_create(pk=1, defaults={"until": mark})

    before_mark: list[list[str]] = []
    after_mark: list[list[str]] = []
    for k in range(24):
        at = base + dt.timedelta(minutes=10 * k)
        (before_mark if at < mark else after_mark).append(_beat(insts, at))
    day_table = UsageDay._meta.db_table
    month_table = UsageMonth._meta.db_table
    for sql in (s for beat in after_mark[1:] for s in beat):  # the first spans the mark
        assert day_table not in sql and month_table not in sql, sql
    assert any(day_table in s for beat in before_mark[1:] for s in beat), "before it: as before"

    # the day and month rows hold the hours before the mark; nothing after it
    stored = _rows(insts)
    before = _hour_sum(insts, base - HOUR, mark)
    assert _sum(stored["day"].values()) == before
    assert _sum(stored["month"].values()) == before

    # a report reads the hours from the mark on: the same totals whatever has been rolled
    start, end = base - dt.timedelta(days=2), floor_hour(timezone.now()) + HOUR
    tenant = world.instance_a.tenant_id

    def report() -> Quantities:
        return reports.build(tenant, start, end, "instance").total.quantities

    everything = _hour_sum(insts, start, end)
    assert everything.covered_ms > 0
    # world's own instances' rows are in the report too: compare what the three add
    UsageHour.objects.exclude(instance__in=insts).delete()
    UsageDay.objects.exclude(instance__in=insts).delete()
    UsageMonth.objects.exclude(instance__in=insts).delete()
    assert report() == everything

    # the roll: day and month rows as a rebuild from the samples makes them
    assert sampling.roll() > 0
    assert sampling.rolled_until() == floor_hour(timezone.now())
    assert report() == everything
    rolled = _rows(insts)
    sampling.recompute(insts)
    assert _rows(insts) == rolled
    assert report() == everything
    assert sampling.roll() == 0, "idempotent: nothing closed since"


def test_without_a_mark_reports_read_hours_and_the_first_roll_sums_every_day(world: World) -> None:
    """No mark (a flushed table): beats add to the hours only; the roll starts at the first hour."""
    RollupMark.objects.all().delete()
    base = floor_hour(timezone.now()) - dt.timedelta(hours=30)
    insts = _three(world, base - HOUR)
    for k in range(8):
        _beat(insts, base + dt.timedelta(hours=4 * k, minutes=1))
    assert not UsageDay.objects.filter(instance__in=insts).exists()
    UsageHour.objects.exclude(instance__in=insts).delete()
    total = reports.build(world.instance_a.tenant_id, base - HOUR, timezone.now(), "kind").total
    assert total.quantities == _hour_sum(insts, base - HOUR, timezone.now() + HOUR)
    sampling.roll()
    rolled = _rows(insts)
    assert rolled["day"] and rolled["month"]
    sampling.recompute(insts)
    assert _rows(insts) == rolled


def test_an_instances_first_sample_rebuilds_nothing_and_the_second_makes_the_interval(
    world: World,
) -> None:
    """A create's observation is its instance's first sample: no interval, so no hour, day or month
    row is read or written (the observation's path, issue 18); the next sample adds the interval."""
    inst = _three(world, floor_hour(timezone.now()) - dt.timedelta(hours=2))[0]
    at = floor_hour(timezone.now()) - dt.timedelta(minutes=30)
    rollups = [m._meta.db_table for m, _ in ROWS]
    with CaptureQueriesContext(connection) as q:
        assert sampling.add_sample(inst, at, at, "observation", "shared-1", running=True)
    assert not [x["sql"] for x in q.captured_queries if any(t in x["sql"] for t in rollups)]
    assert not sampling.add_sample(inst, at, at, "observation", "shared-1", running=True), "stored once"
    later = at + dt.timedelta(seconds=10)
    assert sampling.add_sample(inst, later, later, "heartbeat", "shared-1", running=True)
    assert _hour_sum([inst], at - HOUR, at + HOUR).running_ms == 10_000


def test_a_roll_in_slices_stopped_half_way_and_the_late_beats_between_give_a_rebuilds_rows(
    world: World, settings: Any
) -> None:
    """The roll goes in slices of instances by id, each its own transaction: the beats wait for one
    slice, not for the whole roll.  Between two slices, a late beat adds to the day and month rows
    of the instances already rolled (their rows are summed up to the new mark) and to the hour rows
    alone of the others; a roll stopped half-way is finished by the next.  The rows are then what a
    rebuild from the raw samples gives."""
    settings.SKYPORT_HEARTBEAT_SECONDS = 600
    settings.SKYPORT_METERING_GAP_BEATS = 3
    base = floor_hour(timezone.now()).replace(hour=0) - dt.timedelta(days=1, hours=3)  # 21:00
    insts = _three(world, base - HOUR)
    for model in (UsageSample, UsageHour, UsageDay, UsageMonth):
        model.objects.exclude(instance__in=insts).delete()
    RollupMark.objects.update_or_create(pk=1, defaults={"until": base})
    for k in range(3):  # 21:10, 21:20, 21:30
        _beat(insts, base + dt.timedelta(minutes=10 * (k + 1)))
    goal = base + dt.timedelta(hours=5)  # 02:00 the next day: the roll crosses midnight

    assert sampling.roll(goal + dt.timedelta(minutes=5), slice_size=2, max_slices=1) > 0
    mark = RollupMark.objects.get(pk=1)
    ids = sorted(i.pk for i in insts)
    assert (mark.until, mark.rolling_to, mark.rolled_through) == (base, goal, ids[1])
    assert sampling.rolled_until() == base, "reports read hours from the old mark until the roll ends"
    assert not UsageDay.objects.filter(instance_id=ids[2]).exists(), "the second slice is not rolled yet"

    # late beats, every 10 min from 21:40 to 01:20: before the roll's new mark, after its old one
    for k in range(4, 27):
        _beat(insts, base + dt.timedelta(minutes=10 * k))
    rolled_days = {i: sum(r.running_ms for r in UsageDay.objects.filter(instance_id=i)) for i in ids}
    hours = {i: _hour_sum([Instance(pk=i)], base, goal).running_ms for i in ids}
    assert rolled_days[ids[0]] == hours[ids[0]] and rolled_days[ids[1]] == hours[ids[1]], "added as they came"
    assert rolled_days[ids[2]] == 0, "the instance not rolled yet: hours only"

    assert sampling.roll(goal + dt.timedelta(minutes=5), slice_size=2) > 0  # the next roll finishes it
    mark = RollupMark.objects.get(pk=1)
    assert (mark.until, mark.rolling_to, mark.rolled_through) == (goal, None, None)
    rolled = _rows(insts)
    assert _sum(rolled["day"].values()) == _hour_sum(insts, base, goal) == _sum(rolled["month"].values())
    sampling.recompute(insts)
    assert _rows(insts) == rolled
    assert sampling.roll(goal + dt.timedelta(minutes=5), slice_size=2) == 0, "idempotent"
