"""What the portal tells a node about a container beyond placement: its tenant's id range."""

from __future__ import annotations

from compute.spec import ID_RANGE_MIN, ID_RANGE_SIZE
from portal.cloud.models import Instance
from portal.cloud.services import build_spec
from portal.tenancy.models import Tenant
from tests.portal.conftest import FakeNodes, World
from tests.portal.test_flow import _dedicate_node_a, _launch


def test_a_container_spec_carries_its_tenants_id_range(world: World, nodes: FakeNodes) -> None:
    _dedicate_node_a(world)
    c = _launch(world, "a_member", "acme", "app")
    c2 = _launch(world, "a_member", "acme", "app2")
    v = _launch(world, "b_member", "bobco", "app")
    acme = Tenant.objects.get(slug="acme")
    spec = build_spec(Instance.objects.get(pk=c["id"]))
    assert spec.kind == "container"
    assert spec.id_base == acme.id_base == ID_RANGE_MIN + acme.pk * ID_RANGE_SIZE
    # Stable per tenant: every container of acme gets the same range.
    assert build_spec(Instance.objects.get(pk=c2["id"])).id_base == spec.id_base
    assert build_spec(Instance.objects.get(pk=v["id"])).id_base == 0  # a VM has no user namespace
    assert Tenant.objects.get(slug="bobco").id_base != acme.id_base
