"""What the portal tells a node about a container (its tenant's id range) and learns back (how it ended)."""

from __future__ import annotations

import time
from typing import Any

from compute.spec import ID_RANGE_MIN, ID_RANGE_SIZE
from portal.audit.models import Event
from portal.cloud.models import Instance
from portal.cloud.services import build_spec
from portal.cloud.tasks import apply_node_report
from portal.tenancy.models import Tenant
from tests.portal.conftest import FakeNodes, World, heartbeat
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


def test_an_exit_seen_on_the_node_keeps_its_reason(world: World) -> None:
    """The node reports how a workload ended (code or signal, last output): the instance shows it."""
    inst = world.instance_a  # active/running on shared-1 in the fixture
    reason = "killed by SIGKILL (exit code 137); last output: serving"
    item = {
        "instance_id": str(inst.pk),
        "kind": "vm",
        "power_state": "shutdown",
        "exit_code": 137,
        "message": reason,
    }
    apply_node_report(heartbeat("shared-1", inventory=[item]))
    inst.refresh_from_db()
    assert (inst.power_state, inst.vm_state, inst.status_reason) == ("shutdown", "stopped", reason)
    event = Event.objects.get(action="reconcile.power_state", object_id=str(inst.pk))
    assert event.message.endswith(reason)
    # running again: the old reason goes
    item |= {"power_state": "running", "exit_code": None, "message": ""}
    apply_node_report(heartbeat("shared-1", inventory=[item], sent_at=time.time() + 1))
    inst.refresh_from_db()
    assert (inst.power_state, inst.status_reason) == ("running", "")


def test_restart_policy_reaches_the_node_and_restarts_and_crash_loops_come_back(
    world: World, nodes: FakeNodes
) -> None:
    _dedicate_node_a(world)
    bad = world.client("a_member").post(
        "/api/v1/instances/",
        {"tenant": "acme", "name": "x", "image": "sample:1", "flavor": world.flavor_public.pk,
         "restart_policy": "sometimes"},
        format="json",
    )  # fmt: skip
    assert bad.status_code == 400 and "on-failure[:N]" in bad.json()["errors"]["restart_policy"][0]
    c = _launch_with(world, restart_policy="on-failure:3")
    assert c["restart_policy"] == "on-failure:3" and c["restarts"] == 0
    inst = Instance.objects.get(pk=c["id"])
    assert build_spec(inst).restart_policy == "on-failure:3"
    assert nodes.run() == 1
    item = {"instance_id": c["id"], "kind": "container", "power_state": "running", "restarts": 2}
    apply_node_report(heartbeat("node-a", inventory=[item]))
    inst.refresh_from_db()
    assert inst.restarts == 2 and inst.vm_state == "active"
    assert Event.objects.filter(action="instance.restarted", object_id=c["id"]).exists()
    reason = (
        "crash loop: gave up after 3 restarts; exited with code 3; last output: crashloop: exiting with 3"
    )
    item |= {"power_state": "crashed", "restarts": 3, "gave_up": True, "exit_code": 3, "message": reason}
    apply_node_report(heartbeat("node-a", inventory=[item], sent_at=time.time() + 1))
    inst.refresh_from_db()
    assert (inst.vm_state, inst.power_state, inst.restarts) == ("error", "crashed", 3)
    assert inst.status_reason == reason
    shown = world.client("a_member").get(f"/api/v1/instances/{c['id']}/").json()
    assert (shown["vm_state"], shown["restarts"], shown["status_reason"]) == ("error", 3, reason)


def _launch_with(world: World, **extra: Any) -> Any:
    r = world.client("a_member").post(
        "/api/v1/instances/",
        {"tenant": "acme", "name": "app", "image": "sample:1", "flavor": world.flavor_public.pk, **extra},
        format="json",
    )
    assert r.status_code == 202, r.json()
    return r.json()
