"""Usage pages: the tenant's usage and dashboard chart, printable statements, the operators' page."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from portal.metering.models import PriceSheet
from tests.metering.conftest import Clock
from tests.metering.test_api import T0, _run
from tests.portal.conftest import World
from tests.web.helpers import client


@pytest.fixture
def metered(world: World, settings: Any, clock: Clock) -> World:
    settings.SKYPORT_HEARTBEAT_SECONDS = 3600
    PriceSheet.objects.create(
        effective_from=dt.date(2026, 1, 1), memory_gib_hour=Decimal("0.08"), vcpu_hour=Decimal("0.005")
    )
    _run(world, 48)
    clock.set(T0 + dt.timedelta(days=2))
    return world


def test_usage_page_and_dashboard_show_the_month_and_its_chart(metered: World) -> None:
    c = metered.client("a_viewer")
    page = c.get("/usage/").content.decode()
    assert "<svg" in page and "0.72 EUR" in page and "web-1" in page
    assert "forecast for the month: 11.16 EUR" in page  # 0.72 in 2 of 31 days
    assert 'href="/usage/acme/2026-03/"' in page
    dash = c.get("/").content.decode()
    assert "Cost this month" in dash and "<rect" in dash


def test_statement_is_printable_and_404_for_other_tenants(metered: World) -> None:
    r = metered.client("a_viewer").get("/usage/acme/2026-03/")
    assert r.status_code == 200
    text = r.content.decode()
    assert "Statement for March 2026" in text and "Total due: <strong>0.72 EUR</strong>" in text
    assert "month in progress" in text and "@media print" in text
    for who, path in (
        ("b_admin", "/usage/acme/2026-03/"),
        ("a_viewer", "/usage/bobco/2026-03/"),
        ("a_viewer", "/usage/nobody/2026-03/"),
        ("a_viewer", "/usage/acme/2026-13/"),
    ):
        assert metered.client(who).get(path).status_code == 404, (who, path)


def test_operator_page_lists_tenants_and_takes_new_prices(metered: World) -> None:
    assert client(metered, "a_admin").get("/ops/usage/").status_code == 403
    op = client(metered, "operator")
    page = op.get("/ops/usage/").content.decode()
    assert "acme" in page and "0.72" in page
    form = {
        "effective_from": "2026-04-01",
        "currency": "EUR",
        "memory_gib_hour": "0.1",
        "memory_basis": "actual",
        "vcpu_hour": "0",
        "disk_gb_month": "0.5",
        "address_month": "2",
        "note": "spring",
    }
    assert op.post("/ops/usage/", form).status_code == 303
    assert PriceSheet.objects.get(effective_from="2026-04-01").memory_basis == "actual"
    r = op.post("/ops/usage/", form | {"effective_from": "2026-05-01", "vcpu_hour": "-1"})
    assert r.status_code == 400 and "A price cannot be negative." in r.content.decode()
    refused = client(metered, "a_admin").post("/ops/usage/", form | {"effective_from": "2026-06-01"})
    assert refused.status_code == 403 and PriceSheet.objects.count() == 2
