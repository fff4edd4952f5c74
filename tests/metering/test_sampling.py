"""Samples to hours: the interval rules, and exactness under any order and duplication (hypothesis)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.test import override_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portal.cloud.models import Instance
from portal.metering import sampling
from portal.metering.intervals import Point, Quantities, hourly
from portal.metering.models import QUANTITIES, UsageDay, UsageHour, UsageSample
from tests.portal.conftest import World

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
H = 3_600_000
GAP = 15_000  # 3 beats of 5 s


def p(seconds: float, running: bool = True, **kw: Any) -> Point:
    return Point(
        T0 + dt.timedelta(seconds=seconds), running, kw.pop("vcpus", 2), kw.pop("ram_mb", 512), 10, **kw
    )


def total(hours: dict[dt.datetime, Quantities]) -> Quantities:
    out = Quantities()
    for q in hours.values():
        out.add(q)
    return out


def test_running_time_follows_the_earlier_sample_and_splits_at_hours() -> None:
    pts = [p(3590), p(3595, running=False), p(3605, running=False), p(3610)]
    hours = hourly(pts, GAP)
    assert hours[T0].running_ms == 5000 and hours[T0].covered_ms == 10_000
    assert hours[T0 + dt.timedelta(hours=1)].covered_ms == 10_000
    assert hours[T0 + dt.timedelta(hours=1)].running_ms == 0
    assert total(hours).vcpu_ms == 2 * 5000 and total(hours).ram_mib_ms == 512 * 5000
    assert total(hours).disk_gb_ms == 10 * 20_000  # disk counts while stopped


def test_a_long_silence_is_a_gap_and_a_short_one_is_not() -> None:
    assert total(hourly([p(0), p(15)], GAP)).gap_ms == 0
    t = total(hourly([p(0), p(15.001)], GAP))
    assert (t.gap_ms, t.covered_ms, t.running_ms, t.disk_gb_ms) == (15_001, 0, 0, 0)


def test_nothing_counts_after_delete_and_cpu_counters_may_restart() -> None:
    pts = [
        p(0, cpu_time_ns=1_000_000_000),
        p(5, cpu_time_ns=3_000_000_000),
        p(10, cpu_time_ns=500_000_000),  # the workload restarted: its counter began again
        p(12, running=False, deleted=True),
        p(14),
    ]
    t = total(hourly(pts, GAP))
    assert t.cpu_ms == 2000 + 500
    assert t.covered_ms == 12_000


def test_clipping_keeps_only_the_window() -> None:
    pts = [p(0), p(10), p(3600 * 2 + 10)]
    hours = hourly(pts, 10 * H, T0 + dt.timedelta(hours=1), T0 + dt.timedelta(hours=2))
    assert list(hours) == [T0 + dt.timedelta(hours=1)] and hours[T0 + dt.timedelta(hours=1)].covered_ms == H


# ------------------------------------------------------------------ property tests

_beats = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=4 * 3600 * 1000),  # ms after T0, four hours
        st.booleans(),  # running
        st.integers(min_value=0, max_value=4 << 30),  # memory
    ),
    min_size=1,
    max_size=25,
    unique_by=lambda b: b[0],
)


def _points(beats: list[tuple[int, bool, int]]) -> list[Point]:
    return [
        Point(T0 + dt.timedelta(milliseconds=t), r, 1, 256, 3, memory_bytes=m, cpu_time_ns=t * 1000)
        for t, r, m in beats
    ]


@given(beats=_beats, data=st.data())
def test_any_order_and_duplication_gives_the_same_hours(
    beats: list[tuple[int, bool, int]], data: Any
) -> None:
    points = _points(beats)
    shuffled = data.draw(st.permutations(points + data.draw(st.lists(st.sampled_from(points), max_size=10))))
    assert hourly(shuffled, 60_000) == hourly(points, 60_000)


# Settings per example through override_settings, which each example leaves again: pytest-django's
# ``settings`` fixture nests one override per assignment until the test ends, and the hundreds
# of examples of a shrink then exceed the recursion limit reading a setting.
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(beats=_beats, data=st.data())
@override_settings(
    SKYPORT_HEARTBEAT_SECONDS=20, SKYPORT_METERING_GAP_BEATS=3, SKYPORT_METERING_BEAT_SECONDS=0
)
def test_incremental_rows_equal_recomputation_for_any_arrival_order(
    world: World, beats: list[tuple[int, bool, int]], data: Any
) -> None:
    """Samples stored one by one, shuffled and repeated: the pure function's hours, and recompute's."""
    inst = Instance.objects.get(pk=world.instance_a.pk)
    inst.vcpus, inst.ram_mb, inst.disk_gb = 1, 256, 3
    UsageSample.objects.filter(instance=inst).delete()
    UsageHour.objects.filter(instance=inst).delete()
    UsageDay.objects.filter(instance=inst).delete()
    points = _points(beats)
    arrivals = data.draw(st.permutations(points + data.draw(st.lists(st.sampled_from(points), max_size=10))))
    for pt in arrivals:
        sampling.add_sample(
            inst,
            pt.at,
            pt.at,
            "heartbeat",
            "shared-1",
            running=pt.running,
            memory_bytes=pt.memory_bytes,
            cpu_time_ns=pt.cpu_time_ns,
        )
    assert UsageSample.objects.filter(instance=inst).count() == len(points)

    def stored() -> dict[dt.datetime, Quantities]:
        rows = UsageHour.objects.filter(instance=inst).values("hour", *QUANTITIES)
        return {r.pop("hour"): Quantities(**r) for r in rows}

    expected = hourly(points, 60_000)
    assert stored() == expected
    sampling.recompute([inst])
    assert stored() == expected
    day = UsageDay.objects.get(instance=inst) if expected else None
    if day is not None:
        assert Quantities(**{k: getattr(day, k) for k in QUANTITIES}) == total(expected)


@override_settings(SKYPORT_METERING_BEAT_SECONDS=0)  # every beat (test_beat_sampling.py: a minute)
def test_a_node_clock_ahead_is_bounded_by_the_portal_receive_time(world: World) -> None:
    """Clock skew: a beat stamped an hour in the future is a sample at the time the portal got it."""
    import time

    from django.utils import timezone

    from portal.cloud.tasks import apply_node_report
    from tests.portal.conftest import heartbeat

    inst = world.instance_a
    item = {"instance_id": str(inst.pk), "kind": "vm", "power_state": "running", "memory_bytes": 1 << 20}
    before = timezone.now()
    apply_node_report(heartbeat("shared-1", inventory=[item], sent_at=time.time() + 3600))
    apply_node_report(heartbeat("shared-1", inventory=[item], sent_at=time.time() + 3600.5))
    samples = list(UsageSample.objects.filter(instance=inst).order_by("at"))
    assert len(samples) == 2
    assert all(before - dt.timedelta(seconds=1) <= s.at <= s.received_at <= timezone.now() for s in samples)
    assert all(s.at.microsecond % 1000 == 0 for s in samples)  # whole milliseconds


_node_beats = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=5 * 3600 * 1000),  # ms after the base, five hours
        st.sets(st.integers(min_value=0, max_value=2)),  # which of the three the node lists running
        st.integers(min_value=0, max_value=4 << 30),  # memory
    ),
    min_size=1,
    max_size=20,
    unique_by=lambda b: b[0],
)
_observations = st.lists(
    st.tuples(st.integers(min_value=0, max_value=5 * 3600 * 1000), st.integers(0, 2), st.booleans()),
    max_size=5,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(beats=_node_beats, observations=_observations, data=st.data())
@override_settings(SKYPORT_HEARTBEAT_SECONDS=600, SKYPORT_METERING_GAP_BEATS=3)  # some have 30 min gaps
def test_a_nodes_beats_in_any_order_give_the_rows_a_rebuild_gives(
    world: World,
    beats: list[tuple[int, set[int], int]],
    observations: list[tuple[int, int, bool]],
    data: Any,
) -> None:
    """record_report adds each beat's new intervals to the rows in bulk; late beats, duplicates and
    observations between beats take the rebuilding way.  Either way the hour, day and month rows of
    the node's three instances are what recompute builds from the samples, and what the pure
    function gives."""
    from django.utils import timezone

    from compute.spec import NodeReport, from_json
    from portal.metering.intervals import floor_hour
    from portal.metering.models import RollupMark, UsageMonth
    from tests.portal.conftest import heartbeat

    base = floor_hour(timezone.now()) - dt.timedelta(hours=6) + dt.timedelta(minutes=50)
    # the roll's mark in the middle of the beats: the hours after it reach the day and month
    # rows at the roll (below), those before it at once (a fixed place, not the clock's)
    RollupMark.objects.update_or_create(pk=1, defaults={"until": base + dt.timedelta(hours=2, minutes=10)})
    first = Instance.objects.get(pk=world.instance_a.pk)
    insts = [first]
    for n in (2, 3):
        twin = Instance.objects.filter(name=f"web-{n}").first()
        if twin is None:
            twin = Instance.objects.get(pk=first.pk)
            twin.pk, twin.name, twin.vcpus, twin.ram_mb = None, f"web-{n}", n, 256 * n
            twin.save()
        insts.append(twin)
    Instance.objects.filter(pk__in=[i.pk for i in insts]).update(created_at=base - dt.timedelta(hours=1))
    for model in (UsageSample, UsageHour, UsageDay, UsageMonth):
        model.objects.filter(instance__in=insts).delete()

    events: list[tuple[str, int, Any, Any]] = [("beat", t, up, mem) for t, up, mem in beats]
    events += [("obs", t, i, running) for t, i, running in observations]
    arrivals = data.draw(st.permutations(events + data.draw(st.lists(st.sampled_from(events), max_size=6))))
    for what, t, who, value in arrivals:
        at = base + dt.timedelta(milliseconds=t)
        if what == "beat":
            inventory = [
                {
                    "instance_id": str(insts[i].pk),
                    "kind": "vm",
                    "power_state": "running",
                    "memory_bytes": value,
                    "cpu_time_ns": t * 1000 * (i + 1),
                }
                for i in sorted(who)
            ]
            report = from_json(NodeReport, heartbeat("shared-1", inventory=inventory, sent_at=at.timestamp()))
            sampling.record_report(report, timezone.now())
        else:
            sampling.add_sample(insts[who], at, timezone.now(), "observation", "shared-1", running=value)

    def rows() -> dict[str, dict[tuple[Any, Any], Quantities]]:
        out: dict[str, dict[tuple[Any, Any], Quantities]] = {}
        for model, period in ((UsageHour, "hour"), (UsageDay, "day"), (UsageMonth, "month")):
            got = model.objects.filter(instance__in=insts, subject="")
            got = got.values("instance_id", period, *QUANTITIES)
            out[period] = {(r.pop("instance_id"), r.pop(period)): Quantities(**r) for r in got}
        return out

    sampling.roll(timezone.now() + dt.timedelta(hours=1))  # every hour the beats wrote has closed
    stored = rows()
    for inst in insts:
        points = [sampling._point(s) for s in UsageSample.objects.filter(instance=inst)]
        mine = {h: q for (pk, h), q in stored["hour"].items() if pk == inst.pk}
        assert mine == hourly(points, sampling.gap_ms())
    sampling.recompute(insts)
    assert rows() == stored


def test_a_beat_costs_the_same_queries_for_3_instances_as_for_30(world: World) -> None:
    """The control plane's limit at scale was one query set per instance per beat (bench/scale.py)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from compute.spec import NodeReport, from_json
    from portal.metering.models import UsageMonth
    from tests.portal.conftest import heartbeat

    first = Instance.objects.get(pk=world.instance_a.pk)
    start = timezone.now() - dt.timedelta(hours=2)

    def beats(count: int) -> list[int]:
        mine = list(Instance.objects.filter(node__name="shared-1"))
        for n in range(len(mine), count):
            twin = Instance.objects.get(pk=first.pk)
            twin.pk, twin.name = None, f"many-{n}"
            twin.save()
        Instance.objects.filter(node__name="shared-1").update(created_at=start - dt.timedelta(minutes=1))
        UsageSample.objects.all().delete()
        UsageHour.objects.all().delete()
        UsageDay.objects.all().delete()
        UsageMonth.objects.all().delete()
        items = [
            {"instance_id": str(i.pk), "kind": "vm", "power_state": "running", "memory_bytes": 1 << 26}
            for i in Instance.objects.filter(node__name="shared-1")
        ]
        counts = []
        for k in range(4):  # 40 min apart, across an hour boundary
            sent = (start + dt.timedelta(minutes=40 * k)).timestamp()
            report = from_json(NodeReport, heartbeat("shared-1", inventory=items, sent_at=sent))
            with CaptureQueriesContext(connection) as q:
                assert sampling.record_report(report, timezone.now()) == count
            counts.append(len(q.captured_queries))
        assert UsageHour.objects.filter(instance__node__name="shared-1").count() >= count * 2
        return counts

    few, many = beats(3), beats(30)
    assert few == many, (few, many)
    assert max(many) <= 20, many
