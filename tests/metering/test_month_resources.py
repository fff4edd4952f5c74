"""Acceptance: volumes and published ports through a simulated month, billed exactly.

Same pattern as test_month.py (time injected, hourly heartbeats of the fake
shared node, the gap is 3 beats), and beat's metering tick every hour. March
2026, prices: 0.08 per GiB-hour (128 MiB = 0.01 per hour), 0.005 per
vCPU-hour, 0.73 per GB-month (0.001 per GB-hour), 7.30 per published
port-month (0.01 per port-hour):

- a VM (1 vCPU, 128 MiB, 1 GB) is launched at 00:30 on the 1st and deleted
  at 12:00 on the 30th; the node is silent on the 20th from 10:00 to 22:00
  (12 h of gap for the VM, nothing for the volumes and ports, which the
  portal knows without the node): running and covered 707.5 - 12 = 695.5 h
  -> memory 6.955 + vCPU 3.4775 + root disk 0.6955 = 11.128;
- port tcp/80 published on the 2nd at 08:00, unpublished on the 12th at
  20:00 (252 h); port tcp/443 published on the 20th at 06:00 and gone with
  the VM on the 30th at 12:00 (246 h): 498 port-hours -> 4.98 on the VM's line;
- volume "data" (10 GB) created on the 5th at 10:15, attached on the 6th at
  09:00, detached on the 9th at 18:00 (neither changes its cost), extended
  to 25 GB on the 10th at 06:45, deleted on the 25th at 12:30: 10 GB x
  116.5 h + 25 GB x 365.75 h = 10,308.75 GB-hours -> 10.30875; every
  request is delivered to the node twice (duplicate observations);
- volume "keep" (5 GB) created on the 28th at 00:00 and never deleted: 96 h
  to the end of the month, carried by the tick -> 0.48.

Total 11.128 + 4.98 + 10.30875 + 0.48 = 26.89675.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from decimal import Decimal
from typing import Any

import pytest
from django.core.management import call_command

from portal.cloud.models import Instance
from portal.cloud.tasks import apply_node_report
from portal.metering import reports, resources
from portal.metering.models import PriceSheet, ResourceEvent, UsageDay, UsageHour
from portal.storage.models import Volume
from tests.hostcaps import require_binary
from tests.metering.conftest import Clock
from tests.metering.test_month import START, _launch, at, beat_of
from tests.portal.conftest import FakeNodes, World

H = 3_600_000
VOLUMES = "/api/v1/volumes/"
PORTS = "/api/v1/published-ports/"


@pytest.fixture(autouse=True)
def _qemu_img() -> None:
    require_binary("qemu-img")  # the fake node's NodeService makes real qcow2 volume files


def _rows() -> list[tuple[Any, ...]]:
    fields = ("subject", "instance_id", "kind", "hour", "covered_ms", "disk_gb_ms", "address_ms", "gap_ms")
    return sorted(UsageHour.objects.values_list(*fields)) + sorted(
        UsageDay.objects.values_list(*fields[:3], "day", *fields[4:])
    )


def test_volumes_and_ports_through_a_month(
    world: World, nodes: FakeNodes, clock: Clock, settings: Any
) -> None:
    settings.SKYPORT_HEARTBEAT_SECONDS = 3600
    settings.SKYPORT_METERING_GAP_BEATS = 3
    PriceSheet.objects.create(
        effective_from=dt.date(2026, 1, 1),
        memory_gib_hour=Decimal("0.08"),
        vcpu_hour=Decimal("0.005"),
        disk_gb_month=Decimal("0.73"),
        address_month=Decimal("7.30"),
    )
    call_command("node", "external-address", "shared-1", "198.18.129.1", "--ports", "20000-20009")
    c = world.client("a_member")
    clock.set(at(1, 0, 30))
    vm = _launch(world, "vm", "tiny:1")
    nodes.run()
    assert Instance.objects.get(pk=vm).node.name == "shared-1"
    shared = nodes.service("node.shared-1")
    ids: dict[str, Any] = {}

    def step(when: dt.datetime) -> None:
        clock.set(when)
        c = world.client("a_member")  # a fresh sign-in: simulated days outlast a session
        if when == at(2, 8):
            r = c.post(PORTS, {"instance": vm, "protocol": "tcp", "port": 80}, format="json")
            assert r.status_code == 201, r.json()
            ids["p80"] = r.json()["id"]
        if when == at(12, 20):
            assert c.delete(f"{PORTS}{ids['p80']}/").status_code == 204
        if when == at(20, 6):
            r = c.post(PORTS, {"instance": vm, "protocol": "tcp", "port": 443}, format="json")
            assert r.status_code == 201, r.json()
        if when == at(5, 10, 15):
            r = c.post(VOLUMES, {"name": "data", "size_gb": 10, "node": "shared-1"}, format="json")
            assert r.status_code == 202, r.json()
            ids["data"] = r.json()["id"]
        if when == at(6, 9):
            r = c.post(f"{VOLUMES}{ids['data']}/attach/", {"instance": vm}, format="json")
            assert r.status_code == 202, r.json()
        if when == at(9, 18):
            assert c.post(f"{VOLUMES}{ids['data']}/detach/").status_code == 202
        if when == at(10, 6, 45):
            r = c.post(f"{VOLUMES}{ids['data']}/extend/", {"size_gb": 25}, format="json")
            assert r.status_code == 202, r.json()
        if when == at(25, 12, 30):
            assert c.delete(f"{VOLUMES}{ids['data']}/").status_code == 202
        if when == at(28, 0):
            r = c.post(VOLUMES, {"name": "keep", "size_gb": 5, "node": "shared-1"}, format="json")
            assert r.status_code == 202, r.json()
            ids["keep"] = r.json()["id"]
        if when == at(30, 12):
            assert c.delete(f"/api/v1/instances/{vm}/").status_code == 202
        nodes.run(redeliver=True)  # every request reaches the node twice: duplicate observations

    off_beat = [at(5, 10, 15), at(10, 6, 45), at(25, 12, 30)]
    hour = START + dt.timedelta(hours=1)
    while hour <= at(32, 0):
        for when in [t for t in off_beat if hour - dt.timedelta(hours=1) < t < hour]:
            step(when)
        clock.set(hour)
        day = (hour - START).days + 1
        if not (day == 20 and 10 < hour.hour < 22):
            apply_node_report(beat_of(shared))
        step(hour)
        resources.tick()  # beat's metering task
        hour += dt.timedelta(hours=1)

    data = Volume.objects.get(pk=ids["data"])
    assert (data.status, data.size_gb, Volume.objects.get(pk=ids["keep"]).status) == (
        "deleted",
        25,
        "available",
    )
    # the raw facts: one event per change, the duplicate observations added none
    assert list(
        ResourceEvent.objects.filter(subject=f"volume:{ids['data']}").values_list("at", "amount")
    ) == [(at(5, 10, 15), 10), (at(10, 6, 45), 25), (at(25, 12, 30), 0)]
    assert ResourceEvent.objects.filter(kind="vm", amount=1).count() == 2
    assert ResourceEvent.objects.filter(kind="vm", amount=0).count() == 2

    march = UsageHour.objects.filter(hour__lt=at(32, 0))
    data_rows = march.filter(subject=f"volume:{ids['data']}")
    assert sum(r.disk_gb_ms for r in data_rows) == 1030875 * H // 100
    assert sum(r.covered_ms for r in data_rows) == 48225 * H // 100
    assert {r.instance_id for r in data_rows} == {None}
    assert sum(r.disk_gb_ms for r in march.filter(subject=f"volume:{ids['keep']}")) == 480 * H
    ports = march.filter(subject__startswith="port:")
    assert sum(r.address_ms for r in ports) == 498 * H
    assert {str(r.instance_id) for r in ports} == {vm}
    own = march.filter(subject="", instance_id=vm)
    assert sum(r.running_ms for r in own) == 6955 * H // 10
    assert sum(r.gap_ms for r in own) == 12 * H
    assert sum(r.disk_gb_ms for r in own) == 6955 * H // 10

    by_instance = reports.build(world.a.pk, START, at(32, 0), "instance")
    lines = {line.label: line for line in by_instance.lines}
    assert set(lines) == {"vm", "data", "keep"}
    assert (lines["vm"].kind, lines["data"].kind, lines["data"].key) == (
        "vm",
        "volume",
        f"volume:{ids['data']}",
    )
    assert lines["vm"].cost.addresses == Decimal("4.98")
    assert lines["vm"].cost.total == Decimal("16.108")
    assert lines["data"].cost.disk == lines["data"].cost.total == Decimal("10.30875")
    assert lines["keep"].cost.total == Decimal("0.48")
    assert by_instance.total.cost.total == Decimal("26.89675")
    by_kind = {
        line.key: line.cost.total for line in reports.build(world.a.pk, START, at(32, 0), "kind").lines
    }
    assert by_kind == {"vm": Decimal("16.108"), "volume": Decimal("10.78875")}
    for group in ("day", "month"):
        assert reports.build(world.a.pk, START, at(32, 0), group).total.cost.total == Decimal("26.89675")
    # a range that cuts hours: the 10th from 06:00 to 08:00 holds 45 min of 10 GB and 75 of 25 GB
    part = reports.build(world.a.pk, at(10, 6), at(10, 8), "instance")
    (cut,) = [line for line in part.lines if line.kind == "volume"]
    assert cut.quantities.disk_gb_ms == (10 * 45 + 25 * 75) * 60_000

    # duplicates and re-runs change nothing: the same change again, the tick again
    before = _rows()
    assert not resources.record(f"volume:{ids['data']}", world.a.pk, "volume", 10, at=at(5, 10, 15))
    assert resources.tick() == 1  # only the open volume's current hour is rewritten
    assert _rows() == before
    # recomputation from the raw samples and events gives the same rows
    call_command("recompute_usage")
    assert _rows() == before
    UsageHour.objects.all().delete()
    UsageDay.objects.all().delete()
    call_command("recompute_usage", "--tenant", "acme")
    assert _rows() == before

    # the API, CSV and statement show them; another tenant gets 404
    c = world.client("a_member")
    q = {"tenant": "acme", "from": START.isoformat(), "to": at(32, 0).isoformat()}
    body = c.get("/api/v1/usage/", q | {"group_by": "instance"}).json()
    assert {(x["name"], x["kind"], x["cost"]) for x in body["lines"]} == {
        ("vm", "vm", "16.11"),
        ("data", "volume", "10.31"),
        ("keep", "volume", "0.48"),
    }
    assert body["total"]["cost"] == "26.90" and body["total"]["address_months"] == str(
        (Decimal(498) / 730).quantize(Decimal("0.000001"))
    )
    rows = list(csv.DictReader(io.StringIO(c.get("/api/v1/usage/", q | {"format": "csv"}).content.decode())))
    assert (rows[0]["name"], rows[0]["kind"]) == ("vm", "vm")  # volume keys sort after uuids
    assert sorted((r["name"], r["kind"], r["cost"]) for r in rows[1:]) == [
        ("Total", "", "26.90"),
        ("data", "volume", "10.31"),
        ("keep", "volume", "0.48"),
    ]
    page = c.get("/usage/acme/2026-03/")
    assert page.status_code == 200
    assert b'data <span class="muted">(volume)</span>' in page.content and b"26.90" in page.content
    other = world.client("b_member")
    assert other.get("/api/v1/usage/", q).status_code == 404
    assert other.get("/usage/acme/2026-03/").status_code == 404
