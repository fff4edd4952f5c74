"""The whole control flow against fake nodes: place, spawn, act, delete, reconcile, sweep."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest
from django.utils import timezone

from portal.audit.models import Event
from portal.cloud.models import ComputeNode, Instance
from portal.cloud.tasks import apply_node_report, sweep
from tests.portal.conftest import UP_BOTH, FakeNodes, World, heartbeat


def _launch(
    world: World, who: str, tenant: str, name: str, image: str = "sample:1", kind: str = "auto"
) -> Any:
    r = world.client(who).post(
        "/api/v1/instances/",
        {"tenant": tenant, "name": name, "image": image, "flavor": world.flavor_public.pk, "kind": kind},
        format="json",
    )
    assert r.status_code == 202, r.json()
    return r.json()


def _dedicate_node_a(world: World) -> None:
    ComputeNode.objects.filter(name="node-a").update(
        status="up", vcpus=8, ram_mb=8192, disk_gb=100, drivers=UP_BOTH
    )


def test_dedicated_tenant_gets_container_shared_tenant_gets_vm(world: World, nodes: FakeNodes) -> None:
    _dedicate_node_a(world)
    c = _launch(world, "a_member", "acme", "app")
    v = _launch(world, "b_member", "bobco", "app")
    assert (c["decided_kind"], c["node"], c["isolation_reason"]) == (
        "container",
        "node-a",
        "container on node-a: dedicated to acme",
    )
    assert (v["decided_kind"], v["node"]) == ("vm", "shared-1")
    assert "no dedicated node" in v["isolation_reason"]
    assert nodes.run() == 2
    for who, inst in (("a_member", c), ("b_member", v)):
        got = world.client(who).get(f"/api/v1/instances/{inst['id']}/").json()
        assert (got["vm_state"], got["task_state"], got["power_state"]) == ("active", None, "running")
    actions = [
        e["action"]
        for e in world.client("a_member").get("/api/v1/events/", {"object_id": c["id"]}).json()["results"]
    ]
    assert actions[::-1] == ["instance.schedule", "instance.create", "node.create"]


def test_actions_claim_and_settle(world: World, nodes: FakeNodes) -> None:
    inst = _launch(world, "a_member", "acme", "vm1", image="tiny:1")
    c = world.client("a_member")
    url = f"/api/v1/instances/{inst['id']}/actions/"
    r = c.post(url, {"action": "stop"}, format="json")
    assert r.status_code == 409 and "busy (spawning)" in r.json()["message"]
    nodes.run()
    r = c.post(url, {"action": "stop", "params": {"timeout": 5}}, format="json")
    assert r.status_code == 202 and r.json()["task_state"] == "stopping"
    assert c.post(url, {"action": "start"}, format="json").status_code == 409
    nodes.run()
    assert c.get(f"/api/v1/instances/{inst['id']}/").json()["vm_state"] == "stopped"
    r = c.post(url, {"action": "reboot"}, format="json")
    assert r.status_code == 409 and "while it is stopped" in r.json()["message"]
    assert c.post(url, {"action": "start"}, format="json").status_code == 202
    nodes.run()
    assert c.post(url, {"action": "snapshot", "params": {"name": "s1"}}, format="json").status_code == 202
    nodes.run()
    for bad in (
        {"action": "explode"},
        {"action": "stop", "params": {"timeout": -1}},
        {"action": "snapshot", "params": {"name": "../x"}},
        {"action": "stop", "params": {"rm": 1}},
    ):
        r = c.post(url, bad, format="json")
        assert r.status_code == 400 and r.json()["message"], bad
    r = c.post(url, {"action": "snapshot"}, format="json")
    assert r.status_code == 409 and "snapshot name" in r.json()["message"]
    viewer = world.client("a_viewer").post(url, {"action": "stop"}, format="json")
    assert viewer.status_code == 403
    assert world.client("b_admin").post(url, {"action": "stop"}, format="json").status_code == 404
    got = c.get(f"/api/v1/instances/{inst['id']}/").json()
    assert (got["vm_state"], got["task_state"], got["power_state"]) == ("active", None, "running")


def test_redelivered_messages_and_duplicate_observations_change_nothing(
    world: World, nodes: FakeNodes
) -> None:
    inst = _launch(world, "a_member", "acme", "twice", image="tiny:1")
    nodes.run(redeliver=True)
    svc = nodes.service("node.shared-1")
    from compute.spec import Kind

    assert list(svc.driver(Kind.VM).workloads) == [inst["id"]]  # type: ignore[attr-defined]
    assert Event.objects.filter(object_id=inst["id"], action="node.create").count() == 1
    world.client("a_member").delete(f"/api/v1/instances/{inst['id']}/")
    nodes.run(redeliver=True)
    assert Instance.objects.get(pk=inst["id"]).vm_state == "deleted"
    assert Event.objects.filter(object_id=inst["id"], action="node.delete").count() == 1
    assert svc.driver(Kind.VM).workloads == {}  # type: ignore[attr-defined]


def test_preview_creates_nothing(world: World, sent: list[Any]) -> None:
    _dedicate_node_a(world)
    before = Instance.objects.count()
    r = world.client("a_member").post(
        "/api/v1/instances/preview/",
        {"tenant": "acme", "name": "p", "image": "sample:1", "flavor": world.flavor_public.pk},
        format="json",
    )
    assert r.status_code == 200, r.json()
    body = r.json()
    assert (body["kind"], body["node"]) == ("container", "node-a")
    assert body["quota"]["containers"] == {"used": 0, "requested": 1, "limit": 10}
    assert Instance.objects.count() == before and sent == []


def test_node_dedication_keeps_the_invariant(world: World, nodes: FakeNodes) -> None:
    op = world.client("operator")
    Instance.objects.filter(pk=world.instance_a.pk).update(vm_state="deleted")  # leave shared-1 to bobco
    _launch(world, "b_member", "bobco", "bvm", image="tiny:1")  # lands on shared-1
    r = op.patch("/api/v1/nodes/shared-1/", {"tenancy": "dedicated", "owner": "acme"}, format="json")
    assert r.status_code == 409 and "bobco" in r.json()["message"]
    r = op.patch("/api/v1/nodes/shared-1/", {"tenancy": "dedicated", "owner": "bobco"}, format="json")
    assert r.status_code == 200 and r.json()["owner"] == "bobco"
    nodes.run()
    c = _launch(world, "b_member", "bobco", "bc", image="busybox:1")
    assert c["decided_kind"] == "container"
    r = op.patch("/api/v1/nodes/shared-1/", {"tenancy": "shared"}, format="json")
    assert r.status_code == 409 and "containers" in r.json()["message"]


def test_reconcile_records_drift_and_orphans(world: World) -> None:
    inst = world.instance_a  # active/running on shared-1 in the fixture
    orphan = {"instance_id": "11111111-2222-3333-4444-555555555555", "kind": "vm", "power_state": "running"}
    report = heartbeat("shared-1", inventory=[orphan])
    apply_node_report(report)
    inst.refresh_from_db()
    assert inst.power_state == "nostate" and "missing on node" in inst.status_reason
    assert inst.missing_since is not None, "drift is a field, not a phrase in the reason"
    assert inst.vm_state == "active", "reconcile records drift; it never deletes"
    node = ComputeNode.objects.get(name="shared-1")
    assert node.orphans == [
        {"instance_id": "11111111-2222-3333-4444-555555555555", "kind": "vm", "power_state": "running"}
    ]
    # the workload reappears stopped: power state follows the node
    report |= {
        "inventory": [{"instance_id": str(inst.pk), "kind": "vm", "power_state": "shutdown"}],
        "sent_at": time.time() + 1,
    }
    apply_node_report(report)
    inst.refresh_from_db()
    assert (inst.power_state, inst.vm_state, inst.missing_since) == ("shutdown", "stopped", None)
    assert ComputeNode.objects.get(name="shared-1").orphans == []
    assert Event.objects.filter(action="reconcile.missing").count() == 1


def test_reconcile_leaves_a_row_changed_after_the_list_was_taken_to_the_next_beat(world: World) -> None:
    """The node lists its workloads, a create's observation lands, then the beat arrives: the list is
    older than the row, so neither "missing" nor "shutdown" is recorded from it; a newer list is."""
    inst = world.instance_a  # active/running on shared-1
    Instance.objects.filter(pk=inst.pk).update(updated_at=timezone.now())  # the observation, just now
    before = time.time() - 5
    stale = heartbeat("shared-1", inventory_at=before, sent_at=time.time())
    apply_node_report(stale)
    shutdown = [{"instance_id": str(inst.pk), "kind": "vm", "power_state": "shutdown"}]
    apply_node_report(heartbeat("shared-1", inventory=shutdown, inventory_at=before, sent_at=time.time()))
    inst.refresh_from_db()
    assert (inst.power_state, inst.status_reason, inst.missing_since) == ("running", "", None)
    assert not Event.objects.filter(action__startswith="reconcile.").exists()
    # the next beat's list is newer than the row: drift is recorded as before
    apply_node_report(heartbeat("shared-1", inventory_at=time.time() + 2, sent_at=time.time() + 2))
    inst.refresh_from_db()
    assert inst.power_state == "nostate" and inst.missing_since is not None


def test_reconcile_does_not_call_instances_of_a_down_driver_missing(world: World) -> None:
    """libvirtd down: the node lists no VMs, but they still run; nothing is marked missing."""
    inst = world.instance_a
    report = heartbeat("shared-1", down={"vm": "libvirtError: cannot connect"})
    apply_node_report(report)
    inst.refresh_from_db()
    assert (inst.power_state, inst.status_reason) == ("running", "")
    assert not Event.objects.filter(action="reconcile.missing").exists()
    assert ComputeNode.objects.get(name="shared-1").drivers["vm"]["ok"] is False


def test_nodes_are_not_blamed_for_beats_the_portal_has_not_read(
    world: World, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    """A control queue longer than one message per node up means the beats may be queued: the
    nodes silent for less than SKYPORT_NODE_DOWN_BACKLOG_SECONDS stay up; longer is down still."""
    from portal.cloud import dispatch

    settings.SKYPORT_NODE_DOWN_BACKLOG_SECONDS = 300
    now = timezone.now()
    nodes = ComputeNode.objects
    nodes.filter(name="shared-1").update(status="up", last_heartbeat=now - dt.timedelta(seconds=60))
    nodes.filter(name="node-a").update(status="up", last_heartbeat=now - dt.timedelta(seconds=900))
    asked: list[str] = []

    def queued(queue: str) -> int | None:
        asked.append(queue)
        return backlog

    monkeypatch.setattr(dispatch, "queued", queued)
    backlog: int | None = 500  # two nodes up, 500 messages waiting: behind
    assert sweep(now) == {"stuck": 0, "down": 1, "deferred": 1}
    assert asked == ["control"]
    assert ComputeNode.objects.get(name="shared-1").status == "up"
    assert ComputeNode.objects.get(name="node-a").status == "down"  # silent 15 min: down anyway

    backlog = 1  # caught up: the silence is the node's
    assert sweep(now) == {"stuck": 0, "down": 1, "deferred": 0}
    assert ComputeNode.objects.get(name="shared-1").status == "down"

    ComputeNode.objects.filter(name="shared-1").update(status="up")
    backlog = None  # the broker cannot say: judged as always
    assert sweep(now) == {"stuck": 0, "down": 1, "deferred": 0}


def test_sweeper_fails_stuck_work_and_marks_silent_nodes_down(world: World) -> None:
    inst = _launch(world, "a_member", "acme", "stuck", image="tiny:1")
    later = timezone.now() + dt.timedelta(hours=1)
    ComputeNode.objects.filter(name="shared-1").update(last_heartbeat=timezone.now())
    assert sweep(later) == {"stuck": 1, "down": 1, "deferred": 0}
    got = Instance.objects.get(pk=inst["id"])
    assert got.vm_state == "error" and got.task_state is None and "timed out" in got.status_reason
    assert ComputeNode.objects.get(name="shared-1").status == "down"
    assert sweep(later) == {"stuck": 0, "down": 0, "deferred": 0}
    r = world.client("a_member").post(
        "/api/v1/instances/",
        {"tenant": "acme", "name": "x", "image": "tiny:1", "flavor": world.flavor_public.pk},
        format="json",
    )
    assert r.status_code == 409 and "node is down" in r.json()["message"]
