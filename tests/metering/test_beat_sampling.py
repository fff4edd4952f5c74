"""A node's heartbeats are sampled once a minute, and at once when what runs there changes.

``SKYPORT_METERING_BEAT_SECONDS`` (60): the beats between two sampled ones add rows, not
information (bench/scale.py, docs/metering.md "Beats sampled once a minute").  The hours billed
from the samples kept are exact for them: a period of covered time, no gap.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.core.cache import cache

from compute.spec import NodeReport, from_json
from portal.cloud.models import Instance
from portal.metering import sampling
from portal.metering.models import UsageHour, UsageSample
from tests.portal.conftest import World, heartbeat

T0 = dt.datetime(2026, 3, 1, 10, 0, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def _every_minute(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.SKYPORT_HEARTBEAT_SECONDS = 5
    settings.SKYPORT_METERING_BEAT_SECONDS = 60
    settings.SKYPORT_METERING_GAP_BEATS = 3
    # shared-1's minute starts on the minute here (T0 + 0, 60, 120 ...): its own offset is tested below
    monkeypatch.setattr(sampling, "beat_phase", lambda node, period: 0.0)
    cache.clear()


def beat(seconds: float, running: list[Instance], memory: int = 64 << 20, down: str = "") -> int:
    """The node shared-1's beat at T0 + ``seconds`` listing ``running``; how many samples it stored."""
    items = [
        {"instance_id": str(i.pk), "kind": i.kind, "power_state": "running", "memory_bytes": memory}
        for i in running
    ]
    at = T0 + dt.timedelta(seconds=seconds)
    down_ = {down: "gone"} if down else None
    data = heartbeat("shared-1", inventory=items, sent_at=at.timestamp(), down=down_)
    return sampling.record_report(from_json(NodeReport, data), at)


def times(inst: Instance) -> list[float]:
    return [(s.at - T0).total_seconds() for s in UsageSample.objects.filter(instance=inst).order_by("at")]


def second(world: World) -> Instance:
    inst = Instance.objects.get(pk=world.instance_a.pk)
    inst.pk, inst.name = None, "web-2"
    inst.save()
    return inst


def test_beats_every_5_s_are_sampled_every_minute_and_bill_all_of_it(world: World) -> None:
    one = world.instance_a
    Instance.objects.filter(pk=one.pk).update(created_at=T0 - dt.timedelta(minutes=1))
    stored = [beat(5 * n, [one]) for n in range(37)]  # three minutes of beats
    assert times(one) == [0, 60, 120, 180]
    assert stored == [1 if n % 12 == 0 else 0 for n in range(37)]
    assert sampling.gap_ms() == 75_000  # the period, then three missed beats
    hour = UsageHour.objects.get(instance=one)
    assert (hour.covered_ms, hour.running_ms, hour.gap_ms) == (180_000, 180_000, 0)
    assert hour.memory_mib_ms == 64 * 180_000
    # the same rows as a rebuild from the samples kept
    sampling.recompute([one])
    again = UsageHour.objects.get(instance=one)
    assert (again.covered_ms, again.running_ms, again.memory_mib_ms) == (180_000, 180_000, 64 * 180_000)


def test_a_change_in_what_runs_is_sampled_at_once(world: World) -> None:
    one = world.instance_a
    two = second(world)
    Instance.objects.filter(pk__in=[one.pk, two.pk]).update(created_at=T0 - dt.timedelta(minutes=1))
    assert beat(0, [one, two]) == 2
    assert beat(5, [one, two]) == 0
    assert beat(10, [one]) == 2  # two crashed: the node no longer lists it running
    assert beat(15, [one]) == 0
    assert beat(20, [one], down="vm") == 0  # the VM driver went down: nothing known, nothing sampled
    assert beat(25, [one]) == 2  # back: sampled at once
    assert beat(55, [one]) == 0
    assert beat(60, [one]) == 2  # the node's next minute: its first beat
    assert beat(115, [one]) == 0
    assert times(one) == [0, 10, 25, 60] and times(two) == [0, 10, 25, 60]
    assert [s.running for s in UsageSample.objects.filter(instance=two).order_by("at")] == [
        True,
        False,
        False,
        False,
    ]
    # 0-10 s running, then 15 s unknown (no sample at 20 s, 10 -> 25 s still within the gap),
    # then stopped: a crash is billed to the beat that saw it, not to the next minute
    two_hour = UsageHour.objects.get(instance=two)
    assert (two_hour.running_ms, two_hour.covered_ms, two_hour.gap_ms) == (10_000, 60_000, 0)


def test_a_late_beat_is_not_sampled_and_the_cache_only_saves_work(world: World) -> None:
    one = world.instance_a
    Instance.objects.filter(pk=one.pk).update(created_at=T0 - dt.timedelta(minutes=1))
    assert beat(60, [one]) == 1
    assert beat(55, [one]) == 0  # delivered after the beat of 60 s: its time is covered
    assert beat(50, []) == 1  # a late beat that shows another running set is sampled ...
    assert beat(62, [one]) == 0  # ... and does not move the node's last sampled beat back
    cache.clear()  # the cache lost the node's last sampled beat: the next beat samples
    assert beat(65, [one]) == 1
    assert times(one) == [50, 60, 65]


def test_every_beat_is_sampled_when_the_period_is_a_beat_or_less(world: World, settings: Any) -> None:
    settings.SKYPORT_METERING_BEAT_SECONDS = 0
    one = world.instance_a
    Instance.objects.filter(pk=one.pk).update(created_at=T0 - dt.timedelta(minutes=1))
    assert [beat(s, [one]) for s in (0, 5, 10, 7)] == [1, 1, 1, 1]  # the late one too
    assert sampling.gap_ms() == 15_000


def test_nodes_sample_in_their_own_seconds_of_the_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    """500 nodes started together: each 5 s of the minute holds about a twelfth of their sampled
    beats, not all of them (the herd bench/scale.py saw)."""
    monkeypatch.undo()  # the real beat_phase
    phases = [sampling.beat_phase(f"node{n:04d}", 60) for n in range(500)]
    assert all(0 <= p < 60 for p in phases)
    slots = [sum(1 for p in phases if 5 * k <= p < 5 * (k + 1)) for k in range(12)]
    assert min(slots) >= 20 and max(slots) <= 70, slots  # 41.7 each on average
    assert sampling.beat_phase("node0001", 60) == sampling.beat_phase("node0001", 60)  # stable


def test_a_node_with_its_own_offset_samples_once_a_minute(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sampling, "beat_phase", lambda node, period: 42.0)
    one = world.instance_a
    Instance.objects.filter(pk=one.pk).update(created_at=T0 - dt.timedelta(minutes=1))
    for n in range(37):
        beat(5 * n, [one])
    assert times(one) == [0, 45, 105, 165]  # the first beat, then the first after each xx:42
