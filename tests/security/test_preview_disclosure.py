"""Tenants learn why nodes were refused, not which nodes, whose, or how loaded (issue 12, item 9).

Before: the preview's ``rejected`` list (API and launch form) and the 409 of
a VM with no room named every other node, the tenant a node is dedicated
to, and the node's capacity and load, to any tenant member.
"""

from __future__ import annotations

from typing import Any

from portal.cloud.models import ComputeNode, Flavor
from tests.portal.conftest import UP_BOTH, World
from tests.web.helpers import client, text

SECRETS = ("bob-node", "bobco", "shared-1", "262144")


def _bob_node() -> None:
    from portal.tenancy.models import Tenant

    ComputeNode.objects.create(
        name="bob-node", queue="node.bob-node", status="up", tenancy="dedicated",
        owner=Tenant.objects.get(slug="bobco"), vcpus=8, ram_mb=8192, disk_gb=100, drivers=UP_BOTH,
    )  # fmt: skip


def _preview(world: World, who: str, **extra: Any) -> Any:
    body = {"tenant": "acme", "name": "p", "image": "tiny:1", "flavor": world.flavor_public.pk, **extra}
    return world.client(who).post("/api/v1/instances/preview/", body, format="json")


def test_tenant_gets_a_summary_operator_the_detail(world: World) -> None:
    _bob_node()
    r = _preview(world, "a_member")
    assert r.status_code == 200, r.json()
    rejected = r.json()["rejected"]
    assert ["1 node", "dedicated to another tenant"] in rejected, rejected
    assert not any(s in str(rejected) for s in SECRETS), rejected
    op = _preview(world, "operator")
    assert ["bob-node", "dedicated to bobco"] in op.json()["rejected"]


def test_capacity_reasons_lose_their_numbers_for_tenants(world: World) -> None:
    _bob_node()
    big = Flavor.objects.create(name="huge", vcpus=1, ram_mb=9000, disk_gb=1)
    ComputeNode.objects.filter(name="node-a").update(status="up", vcpus=8, ram_mb=8192, disk_gb=100,
                                                     drivers=UP_BOTH)  # fmt: skip
    r = _preview(world, "a_member", flavor=big.pk)
    assert r.status_code == 200, r.json()
    rejected = r.json()["rejected"]
    assert ["1 node", "not enough RAM"] in rejected and "9000" not in str(rejected), rejected
    detail = _preview(world, "operator", flavor=big.pk).json()["rejected"]
    assert ["node-a", "not enough RAM (9000 needed of 8192)"] in detail


def test_vm_without_room_is_a_409_without_other_tenants_nodes(world: World) -> None:
    _bob_node()
    huge = Flavor.objects.create(name="huger", vcpus=1, ram_mb=10**6, disk_gb=1)
    for who in ("a_member", "operator"):
        r = _preview(world, who, flavor=huge.pk)
        assert r.status_code == 409
        message = r.json()["message"]
        assert message.startswith("No node can take this VM now (")
        assert "dedicated to another tenant" in message and "not enough RAM" in message
        assert not any(s in message for s in SECRETS), message
    body = {"tenant": "acme", "name": "v", "image": "tiny:1", "flavor": huge.pk}
    r = world.client("a_member").post("/api/v1/instances/", body, format="json")
    assert r.status_code == 409 and not any(s in r.json()["message"] for s in SECRETS)


def test_launch_form_preview_shows_tenants_the_summary(world: World) -> None:
    _bob_node()
    from portal.images.models import Image

    tiny = Image.objects.get(name="tiny").pk
    q = {"name": "", "image": tiny, "flavor": world.flavor_public.pk, "kind": "vm"}
    page = text(client(world, "a_member").get("/instances/new/preview/", q))
    assert "1 node: dedicated to another tenant" in page
    assert "bob-node" not in page and "bobco" not in page
    from portal.tenancy.models import Membership

    Membership.objects.create(user=world.users["operator"], tenant=world.a, role="admin")
    page = text(client(world, "operator").get("/instances/new/preview/", q))
    assert "bob-node: dedicated to bobco" in page
