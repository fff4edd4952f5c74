"""Acceptance: fake nodes' heartbeats through a simulated month give a hand-computed bill exactly.

Time is injected (``clock``): the portal's ``timezone.now`` and the nodes'
``time.time`` read the same simulated clock, nothing sleeps.  One VM on the
shared node and one container on the tenant's dedicated node run through
March 2026 (744 hours) with hourly heartbeats (the gap is 3 beats = 3 h):

- both are launched at 00:30 on the 1st (the create observations start them);
- every beat of the 7th is delivered twice (duplicates);
- on the 10th the container node's beats of 01:00 and 02:00 are held (a
  control worker restart) and delivered after the 03:00 beat, newest first;
- the VM is stopped on the 15th at 12:30 and started on the 17th at 06:30
  (42 h without compute, still paying for its disk);
- the shared node is silent on the 20th from 10:00 to 22:00: 12 h of gap for
  the VM, never billed, never guessed;
- on the 25th the shared node misses the 05:00 beat only: 2 h between
  samples is within the gap, so it is covered;
- the container is deleted on the 28th at 12:15.

Prices: 0.08 per GiB-hour (128 MiB = 0.01 per hour), 0.005 per vCPU-hour,
0.73 per GB-month (730 h: 0.001 per GB-hour).

VM: covered 744 - 0.5 - 12 = 731.5 h, running 731.5 - 42 = 689.5 h
    -> memory 6.895 + vCPU 3.4475 + disk 0.7315 = 11.074
container: 00:30 on the 1st to 12:15 on the 28th = 659.75 h, all running
    -> memory 6.5975 + vCPU 3.29875 + disk 0.65975 = 10.556
total 21.630.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from django.core.management import call_command

from portal.cloud.models import ComputeNode, Instance
from portal.cloud.tasks import apply_node_report
from portal.metering import reports
from portal.metering.models import PriceSheet, UsageHour, UsageSample
from tests.metering.conftest import Clock
from tests.portal.conftest import UP_BOTH, FakeNodes, World

H = 3_600_000
START = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def at(day: int, hour: int, minute: int = 0) -> dt.datetime:
    return START + dt.timedelta(days=day - 1, hours=hour, minutes=minute)


def _launch(world: World, name: str, image: str) -> str:
    r = world.client("a_member").post(
        "/api/v1/instances/",
        {"tenant": "acme", "name": name, "image": image, "flavor": world.flavor_public.pk},
        format="json",
    )
    assert r.status_code == 202, r.json()
    return str(r.json()["id"])


def _totals(instance_id: str) -> dict[str, int]:
    rows = UsageHour.objects.filter(instance_id=instance_id, hour__lt=at(32, 0))
    keys = ("covered_ms", "running_ms", "vcpu_ms", "ram_mib_ms", "memory_mib_ms", "disk_gb_ms", "gap_ms")
    return {k: sum(getattr(r, k) for r in rows) for k in keys}


def test_a_simulated_month_bills_exactly(world: World, nodes: FakeNodes, clock: Clock, settings: Any) -> None:
    settings.SKYPORT_HEARTBEAT_SECONDS = 3600
    settings.SKYPORT_METERING_GAP_BEATS = 3
    PriceSheet.objects.create(
        effective_from=dt.date(2026, 1, 1),
        memory_gib_hour=Decimal("0.08"),
        vcpu_hour=Decimal("0.005"),
        disk_gb_month=Decimal("0.73"),
    )
    ComputeNode.objects.filter(name="node-a").update(
        status="up", vcpus=8, ram_mb=8192, disk_gb=100, drivers=UP_BOTH
    )
    clock.set(at(1, 0, 30))
    vm = _launch(world, "vm", "tiny:1")
    ct = _launch(world, "ct", "sample:1")
    # two creates, and the default security group's rules sent again to the VM (a new member)
    assert nodes.run() == 3
    assert Instance.objects.get(pk=ct).kind == "container"
    shared, dedicated = nodes.service("node.shared-1"), nodes.service("node.node-a")

    held: list[dict[str, Any]] = []
    hour = START + dt.timedelta(hours=1)
    while hour <= at(32, 0):
        clock.set(hour)
        day = (hour - START).days + 1
        if not ((day == 20 and 10 < hour.hour < 22) or (day == 25 and hour.hour == 5)):
            for _ in range(2 if day == 7 else 1):
                apply_node_report(beat_of(shared))
        beat = beat_of(dedicated)
        if day == 10 and hour.hour in (1, 2):
            held.insert(0, beat)  # the control worker is down: the broker keeps them
        else:
            for _ in range(2 if day == 7 else 1):
                apply_node_report(beat)
            for late in held:  # back up: newest first, after the current one
                apply_node_report(late)
            held.clear()
        if hour == at(15, 12):
            clock.set(at(15, 12, 30))
            _act(world, vm, "stop")
            nodes.run()
        if hour == at(17, 6):
            clock.set(at(17, 6, 30))
            _act(world, vm, "start")
            nodes.run()
        if hour == at(28, 12):
            clock.set(at(28, 12, 15))
            assert world.client("a_member").delete(f"/api/v1/instances/{ct}/").status_code == 202
            nodes.run()
        hour += dt.timedelta(hours=1)

    vm_t, ct_t = _totals(vm), _totals(ct)
    assert vm_t["gap_ms"] == 12 * H
    assert vm_t["covered_ms"] == 7315 * H // 10
    assert vm_t["running_ms"] == 6895 * H // 10
    assert vm_t["ram_mib_ms"] == 128 * 6895 * H // 10
    assert vm_t["memory_mib_ms"] == 48 * 6895 * H // 10  # the fake driver's 48 MiB resident
    assert vm_t["disk_gb_ms"] == 7315 * H // 10
    assert ct_t == {
        "covered_ms": 65975 * H // 100,
        "running_ms": 65975 * H // 100,
        "vcpu_ms": 65975 * H // 100,
        "ram_mib_ms": 128 * 65975 * H // 100,
        "memory_mib_ms": 48 * 65975 * H // 100,
        "disk_gb_ms": 65975 * H // 100,
        "gap_ms": 0,
    }
    # one sample per distinct beat or observation: duplicates and late beats added nothing twice
    # VM: 744 beats - 12 silent + create, stop, start observations; container: beats until the
    # delete (01:00-23:00 on the 1st, 26 whole days, 00:00-12:00 on the 28th) + create and delete
    assert UsageSample.objects.filter(instance_id=vm).count() == 744 - 12 + 3
    assert UsageSample.objects.filter(instance_id=ct).count() == 23 + 26 * 24 + 13 + 2

    report = reports.build(world.a.pk, START, at(32, 0), "kind")
    by_kind = {line.key: line for line in report.lines}
    assert by_kind["vm"].cost.total == Decimal("11.074")
    assert by_kind["container"].cost.total == Decimal("10.556")
    assert report.total.cost.total == Decimal("21.630")
    assert report.total.as_dict()["cost"] == "21.63"

    # recomputation from the raw samples gives the same rows
    before = sorted(
        UsageHour.objects.values_list("instance_id", "hour", "running_ms", "gap_ms", "disk_gb_ms")
    )
    call_command("recompute_usage")
    after = sorted(UsageHour.objects.values_list("instance_id", "hour", "running_ms", "gap_ms", "disk_gb_ms"))
    assert before == after
    assert reports.build(world.a.pk, START, at(32, 0), "day").total.cost.total == Decimal("21.630")


def beat_of(service: Any) -> dict[str, Any]:
    """The node's heartbeat as it would be sent, without delivering it."""
    captured: list[dict[str, Any]] = []
    send = service.send
    service.send = lambda task, payload: captured.append(payload)
    try:
        service.report()
    finally:
        service.send = send
    return captured[0]


def _act(world: World, instance_id: str, action: str) -> None:
    r = world.client("a_member").post(
        f"/api/v1/instances/{instance_id}/actions/", {"action": action}, format="json"
    )
    assert r.status_code == 202, r.json()
