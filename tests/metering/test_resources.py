"""Volumes and published ports to hours: exact spans, any order, ticks at any times (hypothesis)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portal.metering import resources
from portal.metering.intervals import Change, Quantities, resource_hourly
from portal.metering.models import ResourceEvent, UsageDay, UsageHour
from tests.metering.conftest import Clock
from tests.portal.conftest import World

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
H = 3_600_000


def c(minutes: int, amount: int) -> Change:
    return Change(T0 + dt.timedelta(minutes=minutes), amount)


def total(hours: dict[dt.datetime, Quantities]) -> Quantities:
    out = Quantities()
    for q in hours.values():
        out.add(q)
    return out


def test_each_size_counts_from_its_change_to_the_next_and_stops_at_the_end() -> None:
    # 10 GB from 00:30, 25 GB from 02:15, gone at 03:00; "now" is later: nothing after the end
    hours = resource_hourly(
        [c(30, 10), c(135, 25), c(180, 0)], "disk_gb_ms", T0 + dt.timedelta(days=1), covered=True
    )
    assert sorted(hours) == [T0, T0 + dt.timedelta(hours=1), T0 + dt.timedelta(hours=2)]
    assert hours[T0].disk_gb_ms == 10 * H // 2 and hours[T0].covered_ms == H // 2
    assert hours[T0 + dt.timedelta(hours=2)].disk_gb_ms == (10 * 15 + 25 * 45) * 60_000
    assert total(hours).disk_gb_ms == (10 * 105 + 25 * 45) * 60_000
    # an open resource counts up to "now" and no further; a port adds no coverage
    open_port = resource_hourly([c(0, 1)], "address_ms", T0 + dt.timedelta(minutes=90))
    assert total(open_port).address_ms == 90 * 60_000 and total(open_port).covered_ms == 0


_events = st.lists(st.tuples(st.integers(0, 5 * 24 * 60), st.integers(0, 50)), min_size=1, max_size=12)


@given(events=_events, data=st.data())
def test_any_order_and_duplication_and_any_clipping_give_the_same_total(
    events: list[tuple[int, int]], data: st.DataObject
) -> None:
    changes = [c(m, a) for m, a in dict(events).items()]
    until = T0 + dt.timedelta(days=6)
    whole = resource_hourly(changes, "disk_gb_ms", until, covered=True)
    shuffled = data.draw(st.permutations(changes + changes[: data.draw(st.integers(0, len(changes)))]))
    assert resource_hourly(shuffled, "disk_gb_ms", until, covered=True) == whole
    cut = T0 + dt.timedelta(hours=data.draw(st.integers(0, 6 * 24)))
    pieces = resource_hourly(changes, "disk_gb_ms", until, None, cut, covered=True)
    pieces |= resource_hourly(changes, "disk_gb_ms", until, cut, None, covered=True)
    assert pieces == whole


def _rows() -> list[tuple[Any, ...]]:
    hours = UsageHour.objects.values_list("subject", "hour", "disk_gb_ms", "covered_ms")
    days = UsageDay.objects.values_list("subject", "day", "disk_gb_ms", "covered_ms")
    return sorted(hours) + sorted(days)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    steps=st.lists(st.integers(1, 40 * 60), min_size=5, max_size=5),
    ticks=st.lists(st.integers(0, 3), min_size=5, max_size=5),
    end=st.booleans(),
)
def test_records_and_ticks_at_any_times_equal_recomputation(
    world: World, clock: Clock, sizes: list[int], steps: list[int], ticks: list[int], end: bool
) -> None:
    """A volume's changes with ticks (none, one or several) between them: the rows are the recomputation's."""
    ResourceEvent.objects.all().delete()
    UsageHour.objects.all().delete()
    UsageDay.objects.all().delete()
    subject = "volume:00000000-0000-0000-0000-000000000001"
    clock.t = T0.timestamp()  # each example starts over
    amounts = [*sizes, 0] if end else sizes
    for i, amount in enumerate(amounts):
        clock.set(clock.now() + dt.timedelta(minutes=steps[i]))
        assert resources.record(subject, world.a.pk, "volume", amount)
        for _ in range(ticks[i]):
            clock.set(clock.now() + dt.timedelta(minutes=steps[i] // 3))
            resources.tick()
    clock.set(clock.now() + dt.timedelta(minutes=steps[-1]))
    resources.tick()
    incremental = _rows()
    resources.recompute([subject])
    assert _rows() == incremental
    expected = resource_hourly(
        [Change(e.at, e.amount) for e in ResourceEvent.objects.all()], "disk_gb_ms", clock.now(), covered=True
    )
    assert (
        sum(r[2] for r in incremental if len(r) == 4 and isinstance(r[1], dt.datetime))
        == total(expected).disk_gb_ms
    )
