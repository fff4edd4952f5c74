"""The usage API and CSV, prices and budgets: roles, cross-tenant 404s, versioned prices, warnings."""

from __future__ import annotations

import csv
import datetime as dt
import io
from decimal import Decimal
from typing import Any

import pytest

from portal.audit.models import Event
from portal.metering import budgets, sampling
from portal.metering.models import Budget, PriceSheet
from tests.metering.conftest import Clock
from tests.portal.conftest import World

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def _run(world: World, hours: int, start: dt.datetime = T0) -> None:
    """instance_a (1 vCPU, 128 MiB, 1 GB) running for ``hours``, sampled every 5 s... every hour with a
    gap wide enough (the samples are what a node would send)."""
    inst = world.instance_a
    for h in range(hours + 1):
        at = start + dt.timedelta(hours=h)
        sampling.add_sample(inst, at, at, "heartbeat", "shared-1", running=True, memory_bytes=64 << 20)


@pytest.fixture
def metered(world: World, settings: Any, clock: Clock) -> World:
    settings.SKYPORT_HEARTBEAT_SECONDS = 3600
    PriceSheet.objects.create(
        effective_from=dt.date(2026, 1, 1), memory_gib_hour=Decimal("0.08"), vcpu_hour=Decimal("0.005")
    )
    # prices double from the 2nd: a report over both days applies each sheet to its own day
    PriceSheet.objects.create(
        effective_from=dt.date(2026, 3, 2), memory_gib_hour=Decimal("0.16"), vcpu_hour=Decimal("0.010")
    )
    _run(world, 48)
    clock.set(T0 + dt.timedelta(days=2))
    return world


def test_viewer_reads_usage_grouped_every_way(metered: World) -> None:
    c = metered.client("a_viewer")
    q = {"tenant": "acme", "from": "2026-03-01T00:00:00Z", "to": "2026-03-03T00:00:00Z"}
    r = c.get("/api/v1/usage/", q | {"group_by": "day"})
    assert r.status_code == 200, r.json()
    body = r.json()
    # day 1: 24 h x (0.01 memory + 0.005 vCPU) = 0.36; day 2 at double prices: 0.72
    assert [(x["key"], x["cost"]) for x in body["lines"]] == [("2026-03-01", "0.36"), ("2026-03-02", "0.72")]
    assert body["total"]["cost"] == "1.08" and body["total"]["running_hours"] == "48.000000"
    assert body["total"]["used_memory_gib_hours"] == "3.000000"  # 64 MiB for 48 h
    assert body["month_so_far"] == "1.08"
    by_instance = c.get("/api/v1/usage/", q | {"group_by": "instance"}).json()["lines"]
    assert [(x["key"], x["name"]) for x in by_instance] == [(str(metered.instance_a.pk), "web-1")]
    assert c.get("/api/v1/usage/", q | {"group_by": "kind"}).json()["lines"][0]["key"] == "vm"
    assert c.get("/api/v1/usage/", q | {"group_by": "month"}).json()["lines"][0]["key"] == "2026-03"
    # a partial range is read from the hours: 06:00 to 18:30 on the 1st -> 13 hours (widened to whole hours)
    r = c.get("/api/v1/usage/", {"from": "2026-03-01T06:00:00Z", "to": "2026-03-01T18:30:00Z"}).json()
    assert r["total"]["running_hours"] == "13.000000" and r["total"]["cost"] == "0.20"


def test_csv_export_by_format_and_by_accept(metered: World) -> None:
    c = metered.client("a_member")
    q = {"tenant": "acme", "from": "2026-03-01T00:00:00Z", "to": "2026-03-03T00:00:00Z", "group_by": "day"}
    for r in (
        c.get("/api/v1/usage/", q | {"format": "csv"}),
        c.get("/api/v1/usage/", q, HTTP_ACCEPT="text/csv"),
    ):
        assert r.status_code == 200 and r["Content-Type"].startswith("text/csv")
        assert "attachment" in r["Content-Disposition"]
        rows = list(csv.DictReader(io.StringIO(r.content.decode())))
        assert [(x["key"], x["cost"]) for x in rows] == [
            ("2026-03-01", "0.36"),
            ("2026-03-02", "0.72"),
            ("total", "1.08"),
        ]


def test_another_tenants_usage_is_404_and_bad_queries_are_400(metered: World) -> None:
    b = metered.client("b_admin")
    assert b.get("/api/v1/usage/", {"tenant": "acme"}).status_code == 404
    assert b.get("/api/v1/usage/", {"tenant": "nobody"}).status_code == 404
    csv_refusal = b.get("/api/v1/usage/", {"tenant": "acme", "format": "csv"})
    assert csv_refusal.status_code == 404 and csv_refusal["Content-Type"] == "application/json"
    assert b.get("/api/v1/usage/", {"tenant": ""}).status_code == 400
    own = b.get("/api/v1/usage/").json()  # one membership: the tenant may be left out
    assert own["tenant"] == "bobco" and own["total"]["cost"] == "0.00"
    c = metered.client("a_viewer")
    for bad in (
        {"from": "yesterday"},
        {"from": "2026-03-02T00:00:00Z", "to": "2026-03-01T00:00:00Z"},
        {"group_by": "node"},
        {"from": "2020-01-01T00:00:00Z", "to": "2026-03-01T00:00:00Z"},
        {"to": ""},  # given empty: refused, not read as absent
    ):
        r = c.get("/api/v1/usage/", {"tenant": "acme"} | bad)
        assert r.status_code == 400, (bad, r.content)
    assert metered.client("operator").get("/api/v1/usage/", {"tenant": "acme"}).status_code == 200


def test_only_operators_edit_prices(metered: World) -> None:
    sheet = {"effective_from": "2026-04-01", "memory_gib_hour": "0.05", "vcpu_hour": "0.01"}
    assert metered.client("a_admin").post("/api/v1/prices/", sheet, format="json").status_code == 403
    assert metered.client("a_viewer").get("/api/v1/prices/").status_code == 200
    op = metered.client("operator")
    r = op.post("/api/v1/prices/", sheet, format="json")
    assert r.status_code == 201, r.json()
    assert op.post("/api/v1/prices/", sheet | {"memory_gib_hour": "-1"}, format="json").status_code == 400
    pk = r.json()["id"]
    assert metered.client("a_admin").patch(f"/api/v1/prices/{pk}/", {"note": "x"}).status_code == 403
    assert op.patch(f"/api/v1/prices/{pk}/", {"note": "spring"}).status_code == 200


def test_budgets_belong_to_a_tenant_and_warn_at_80_and_100_percent(metered: World, clock: Clock) -> None:
    assert (
        metered.client("a_viewer")
        .post("/api/v1/budgets/", {"tenant": "acme", "monthly_amount": "1.20"}, format="json")
        .status_code
        == 403
    )
    r = metered.client("a_admin").post(
        "/api/v1/budgets/", {"tenant": "acme", "monthly_amount": "1.20"}, format="json"
    )
    assert r.status_code == 201, r.json()
    assert metered.client("b_admin").get(f"/api/v1/budgets/{r.json()['id']}/").status_code == 404
    # 1.08 of 1.20 is 90 %: the 80 % warning, once
    assert budgets.check(clock.now()) == [("acme", 80)]
    assert budgets.check(clock.now()) == []
    _run(metered, 12, T0 + dt.timedelta(days=2))  # 12 more hours at 0.03: 1.44, 120 %
    assert budgets.check(clock.now() + dt.timedelta(hours=12)) == [("acme", 100)]
    events = Event.objects.filter(action__startswith="budget.reached").order_by("id")
    assert [e.action for e in events] == ["budget.reached_80", "budget.reached_100"]
    assert events[1].tenant_id == metered.a.pk and "1.44 EUR of its 1.20 EUR budget" in events[1].message
    assert Budget.objects.get().warned_percent == 100
