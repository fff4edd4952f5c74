"""Raw samples are pruned after SKYPORT_METERING_SAMPLE_DAYS; the hour, day and month rows stay exact.

What must hold after a prune: the rows are what they were; each instance keeps its newest sample
before the prune's mark; a late sample just after the mark rebuilds its hours as if nothing had
been pruned (the rebuild does not reach back into the pruned hours, whose samples are gone);
recompute keeps the pruned hours as they are; a sample that arrives more than the retention after
it was taken is refused.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any

from django.conf import settings as django_settings
from django.test import override_settings
from django.utils import timezone

from compute.spec import NodeReport, from_json
from portal.cloud.models import Instance
from portal.metering import sampling, tasks
from portal.metering.intervals import Point, Quantities, floor_hour, hourly
from portal.metering.models import QUANTITIES, RollupMark, UsageDay, UsageHour, UsageMonth, UsageSample
from tests.portal.conftest import World, heartbeat

STEP = dt.timedelta(minutes=20)


def _rows(inst: Instance) -> dict[str, dict[Any, Quantities]]:
    out: dict[str, dict[Any, Quantities]] = {}
    for model, period in ((UsageHour, "hour"), (UsageDay, "day"), (UsageMonth, "month")):
        got = model.objects.filter(instance=inst, subject="").values(period, *QUANTITIES)
        out[period] = {r.pop(period): Quantities(**r) for r in got}
    return out


def _sums(hours: dict[dt.datetime, Quantities]) -> tuple[dict[Any, Quantities], dict[Any, Quantities]]:
    days: dict[Any, Quantities] = defaultdict(Quantities)
    months: dict[Any, Quantities] = defaultdict(Quantities)
    for hour, q in hours.items():
        days[hour.date()].add(q)
        months[hour.date().replace(day=1)].add(q)
    return dict(days), dict(months)


def _add(inst: Instance, at: dt.datetime, n: int, received: dt.datetime | None = None) -> bool:
    return sampling.add_sample(
        inst,
        at,
        received or at,
        "heartbeat",
        "shared-1",
        running=n % 3 != 0,
        memory_bytes=(n % 7 + 1) << 24,
        cpu_time_ns=n * 10**9,
    )


def _point(at: dt.datetime, n: int) -> Point:
    return Point(at, n % 3 != 0, 1, 256, 3, memory_bytes=(n % 7 + 1) << 24, cpu_time_ns=n * 10**9)


@override_settings(
    SKYPORT_HEARTBEAT_SECONDS=600, SKYPORT_METERING_GAP_BEATS=3, SKYPORT_METERING_SAMPLE_DAYS=1
)
def test_prune_keeps_the_rows_and_the_newest_sample_and_later_samples_stay_exact(world: World) -> None:
    inst = Instance.objects.get(pk=world.instance_a.pk)
    inst.vcpus, inst.ram_mb, inst.disk_gb = 1, 256, 3
    inst.save(update_fields=["vcpus", "ram_mb", "disk_gb"])
    for model in (UsageSample, UsageHour, UsageDay, UsageMonth):
        model.objects.filter(instance=inst).delete()
    now = timezone.now()
    start = floor_hour(now) - dt.timedelta(days=3) + dt.timedelta(minutes=7)
    points = []
    at, n = start, 0
    while at < now - dt.timedelta(hours=1):
        assert _add(inst, at, n)
        points.append(_point(at, n))
        at, n = at + STEP, n + 1
    before = _rows(inst)
    assert before["hour"] == hourly(points, sampling.gap_ms())

    mark = floor_hour(now - dt.timedelta(days=1))
    old = [p for p in points if p.at < mark]
    assert sampling.prune(now, batch=7) == len(old) - 1
    assert RollupMark.objects.get(pk=1).pruned_until == mark
    kept = list(UsageSample.objects.filter(instance=inst, at__lt=mark).values_list("at", flat=True))
    assert kept == [old[-1].at], (
        "the newest sample before the mark stays: the interval across it starts there"
    )
    assert UsageSample.objects.filter(instance=inst).count() == len(points) - len(old) + 1
    assert _rows(inst) == before, "pruning samples changes no hour, day or month row"
    assert sampling.prune(now) == 0, "a second prune finds nothing"

    # A late sample 5 minutes after the mark: its previous sample is the one kept before it, and
    # the rebuild starts at the mark, not at that sample's hour (whose other samples are gone).
    late = mark + dt.timedelta(minutes=5, milliseconds=1)
    assert _add(inst, late, 1000, received=late + dt.timedelta(hours=1))
    points = sorted([*points, _point(late, 1000)], key=lambda p: p.at)
    expected = hourly(points, sampling.gap_ms())
    got = _rows(inst)
    assert got["hour"] == expected
    assert (got["day"], got["month"]) == _sums(expected)

    # recompute keeps the hours before the mark (it has not their samples) and agrees on the rest
    sampling.recompute([inst])
    assert _rows(inst) == got

    # a sample that reached the portal more than the retention after it was taken is refused
    assert not _add(inst, now - dt.timedelta(days=1, hours=2), 1001, received=now)
    assert _rows(inst) == got
    item = {"instance_id": str(inst.pk), "kind": "vm", "power_state": "running", "memory_bytes": 1 << 20}
    stale = from_json(
        NodeReport, heartbeat("shared-1", inventory=[item], sent_at=(now - dt.timedelta(days=2)).timestamp())
    )
    assert sampling.record_report(stale, now) == 0
    assert UsageSample.objects.filter(instance=inst).count() == len(points) - len(old) + 1


@override_settings(SKYPORT_METERING_SAMPLE_DAYS=1)
def test_prune_ends_when_more_samples_than_a_batch_share_one_time(world: World) -> None:
    """Three instances beat in the same millisecond and the batch is two: every window still moves on."""
    first = Instance.objects.get(pk=world.instance_a.pk)
    insts = [first]
    for n in (2, 3):
        twin = Instance.objects.get(pk=first.pk)
        twin.pk, twin.name = None, f"same-ms-{n}"
        twin.save()
        insts.append(twin)
    UsageSample.objects.filter(instance__in=insts).delete()
    now = timezone.now()
    times = [floor_hour(now) - dt.timedelta(days=2) + k * STEP for k in range(6)]
    for at in times:
        for inst in insts:
            assert sampling.add_sample(inst, at, at, "heartbeat", "shared-1", running=True)
    assert sampling.prune(now, batch=2) == 3 * (len(times) - 1)
    left = UsageSample.objects.filter(instance__in=insts).values_list("instance_id", "at")
    assert sorted(left) == sorted((inst.pk, times[-1]) for inst in insts)


def test_the_beat_prunes_every_hour_by_default(world: World) -> None:
    entry = django_settings.CELERY_BEAT_SCHEDULE["metering-prune"]
    assert entry["task"] == "portal.metering.prune"
    assert django_settings.SKYPORT_METERING_SAMPLE_DAYS == 40
    assert tasks.prune() == 0  # nothing older than 40 days here
    assert RollupMark.objects.get(pk=1).pruned_until == floor_hour(timezone.now() - dt.timedelta(days=40))
