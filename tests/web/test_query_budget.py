"""Query budgets: the main pages and the API's instance list/detail run a fixed number of SQL queries.

The count must not grow with the number of instances (an N+1 shows up here
first), and stays within a budget that a change has to raise on purpose.
The header's tenant list is read once per request.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from portal.cloud.models import Instance
from portal.metering.models import UsageDay, UsageHour
from tests.portal.conftest import World
from tests.web.helpers import client

#: path (with {id} for an instance) -> the most queries it may run
PAGES = {
    "/": 14,  # the cost chart: price sheets, the roll's mark, day rows, hour rows of today
    "/instances/": 6,
    "/instances/rows/": 6,
    "/instances/{id}/": 10,  # + the snapshots the revert form offers; its network: groups, ports, pools, NICs
    "/instances/{id}/status/": 5,  # + the snapshots behind the out-of-band revert button
    "/ops/instances/": 8,
    "/ops/nodes/": 7,
    "/ops/drift/": 7,
    "/ops/nodes/shared-1/": 8,
    "/events/": 6,
    "/security-groups/": 7,  # groups, their rules, their live instances
    "/usage/": 14,  # the cost chart and the report: each reads the roll's mark
    "/usage/acme/{month}/": 15,  # by instance and by day: each report reads the roll's mark
    "/ops/usage/": 11,  # + the roll's mark
    "/tasks/": 8,
    "/tasks/panel/": 7,
}
API = {
    "/api/v1/instances/": 5,
    "/api/v1/instances/{id}/": 4,
    "/api/v1/usage/?tenant=acme&group_by=instance": 13,  # the report and the month so far: the mark each
}


def _usage(instance: Instance) -> None:
    """An hour and a day of metered usage this month, so the usage pages have a line per instance."""
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    fields = {"tenant_id": instance.tenant_id, "kind": instance.kind, "running_ms": 3_600_000}
    UsageHour.objects.create(instance=instance, hour=hour, **fields)
    UsageDay.objects.create(instance=instance, day=hour.date(), **fields)


def _more_instances(world: World, n: int) -> None:
    base = world.instance_a
    for i in range(n):
        extra = Instance.objects.create(
            tenant=base.tenant,
            name=f"extra-{i}",
            kind=base.kind,
            isolation_reason="vm: test",
            image=base.image,
            flavor=base.flavor,
            network=base.network,
            vcpus=1,
            ram_mb=128,
            disk_gb=1,
            created_by=base.created_by,
            vm_state="active",
            power_state="running",
            node=base.node,
        )
        _usage(extra)


def _count(c: Any, path: str) -> tuple[int, list[str]]:
    with CaptureQueriesContext(connection) as ctx:
        r = c.get(path)
    assert r.status_code == 200, (path, r.status_code)
    return len(ctx.captured_queries), [q["sql"] for q in ctx.captured_queries]


@pytest.mark.parametrize(("path", "budget"), [*PAGES.items(), *API.items()])
def test_query_count_is_bounded_and_independent_of_the_instances(
    world: World, path: str, budget: int
) -> None:
    who = "operator" if path.startswith("/ops/") else "a_admin"
    if who == "operator":
        from portal.tenancy.models import Membership

        Membership.objects.create(user=world.users["operator"], tenant=world.a, role="admin")
    c = client(world, who)
    url = path.format(id=world.instance_a.pk, month=f"{timezone.now():%Y-%m}")
    _usage(world.instance_a)
    c.get(url)  # warm the session and caches
    few, _ = _count(c, url)
    _more_instances(world, 6)
    many, sql = _count(c, url)
    assert many == few, f"{url}: {few} queries with 1 instance, {many} with 7"
    assert many <= budget, f"{url}: {many} queries, budget {budget}:\n" + "\n".join(sql)


def test_the_header_reads_the_tenant_list_once(world: World) -> None:
    c = client(world, "a_admin")
    c.get("/instances/")
    _, sql = _count(c, "/instances/")
    tenant_lists = [q for q in sql if 'FROM "tenancy_tenant"' in q and "ORDER BY" in q and '"slug" ASC' in q]
    assert len(tenant_lists) == 1, tenant_lists
