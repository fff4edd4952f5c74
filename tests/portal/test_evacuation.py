"""Node loss against fake nodes: evacuate a down node, drain a live one, and the lost node's return.

The nodes are ``NodeService`` over fake drivers (``FakeNodes``), fed by the
portal's real messages.  A node that is "down" simply does not get its
messages: they wait in ``held`` (as they would in its Redis queue) and are
delivered when it comes back.  Topology: ``shared-1`` (the world's shared
node), ``ded-a1`` and ``ded-a2`` dedicated to acme, ``ded-b`` dedicated to
bobco.
"""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from compute.spec import Action, Kind, Observation, PowerState, to_json
from portal.audit.models import Event
from portal.cloud import placement, services
from portal.cloud.models import ComputeNode, Evacuation, Instance
from portal.cloud.tasks import apply_node_report, apply_observation, sweep
from portal.errors import Conflict
from portal.storage.models import Volume
from portal.tenancy.models import Quota, Tenant
from tests.portal.conftest import FakeNodes, World, heartbeat


class Cluster:
    """FakeNodes with nodes that can be down: their messages are held until they return."""

    def __init__(self, world: World, nodes: FakeNodes) -> None:
        self.world, self.nodes = world, nodes
        self.down: set[str] = set()
        self.held: list[tuple[str, str, list[Any]]] = []

    def beat(self, *names: str) -> None:
        for name in names:
            self.nodes.service(f"node.{name}").report()

    def run(self) -> None:
        """Deliver what is pending to the nodes that are up (again until nothing is left)."""
        while self.nodes.sent:
            queue, task, args = self.nodes.sent.pop(0)
            if queue.removeprefix("node.") in self.down:
                self.held.append((queue, task, args))
            else:
                self.nodes.service(queue).handle(task, *args)

    def workloads(self, name: str) -> set[str]:
        svc = self.nodes.service(f"node.{name}")
        return {iid for d in svc._drivers.values() for iid in d.workloads}

    def lose(self, name: str) -> None:
        """The node stops beating for longer than three periods; the sweeper marks it down if it was up."""
        self.down.add(name)
        was = ComputeNode.objects.get(name=name).status
        old = timezone.now() - dt.timedelta(minutes=5)
        ComputeNode.objects.filter(name=name).update(last_heartbeat=old)
        sweep()
        assert ComputeNode.objects.get(name=name).status == ("down" if was == "up" else was)

    def come_back(self, name: str, messages_first: bool) -> None:
        """The node's worker starts again: it beats and consumes what waited in its queue."""
        self.down.discard(name)
        held, self.held = (
            [m for m in self.held if m[0] == f"node.{name}"],
            [m for m in self.held if m[0] != f"node.{name}"],
        )
        if not messages_first:
            self.beat(name)
        self.nodes.sent[:0] = held
        self.run()
        self.beat(name)
        self.run()

    def launch(self, who: str, tenant: str, name: str, kind: str, image: str = "sample:1") -> dict[str, Any]:
        r = self.world.client(who).post(
            "/api/v1/instances/",
            {
                "tenant": tenant,
                "name": name,
                "image": image,
                "flavor": self.world.flavor_public.pk,
                "kind": kind,
            },
            format="json",
        )
        assert r.status_code == 202, r.json()
        self.run()
        inst = Instance.objects.get(pk=r.json()["id"])
        assert (inst.vm_state, inst.task_state) == ("active", None), inst.status_reason
        return r.json()  # type: ignore[no-any-return]


@pytest.fixture
def cluster(world: World, nodes: FakeNodes, node_uploads: list[str]) -> Cluster:
    return make_cluster(world, nodes)


def make_cluster(world: World, nodes: FakeNodes) -> Cluster:
    """Four nodes up: shared-1, ded-a1 and ded-a2 dedicated to acme, ded-b to bobco."""
    acme, bob = world.a, world.b
    ComputeNode.objects.filter(name="node-a").delete()  # the world's own dedicated node (never up)
    c = Cluster(world, nodes)
    c.beat("shared-1", "ded-a1", "ded-a2", "ded-b")
    for name, owner in (("ded-a1", acme), ("ded-a2", acme), ("ded-b", bob)):
        ComputeNode.objects.filter(name=name).update(tenancy="dedicated", owner=owner)
    assert set(ComputeNode.objects.filter(status="up").values_list("name", flat=True)) == {
        "shared-1",
        "ded-a1",
        "ded-a2",
        "ded-b",
    }
    return c


def _only_up(*names: str) -> dict[str, str]:
    """Disable every other up node for the next launches; returns what to restore."""
    was = dict(ComputeNode.objects.exclude(name__in=names).values_list("name", "status"))
    ComputeNode.objects.exclude(name__in=names).update(status="disabled")
    return was


def _restore(was: dict[str, str]) -> None:
    for name, status in was.items():
        ComputeNode.objects.filter(name=name).update(status=status)


def _on_a1(c: Cluster) -> tuple[dict[str, Any], dict[str, Any]]:
    """acme's container and VM, both on ded-a1."""
    was = _only_up("ded-a1")
    box = c.launch("a_member", "acme", "box", "container")
    vm = c.launch("a_member", "acme", "vm", "vm", image="tiny:1")
    _restore(was)
    assert box["node"] == vm["node"] == "ded-a1"
    return box, vm


def _invariant_holds() -> None:
    """No node runs containers of a tenant it is not dedicated to, nor another tenant's VM beside them."""
    for node in ComputeNode.objects.select_related("owner"):
        live = Instance.objects.live().filter(node=node)
        for inst in live.filter(kind="container"):
            assert node.owner_id == inst.tenant_id, f"{inst.name} on {node.name}"
        if live.filter(kind="container").exists():
            assert not live.exclude(tenant_id=node.owner_id).exists(), node.name


def test_evacuate_rebuilds_on_other_nodes_keeping_isolation(cluster: Cluster, world: World) -> None:
    box, vm = _on_a1(cluster)
    bob_box = cluster.launch("b_member", "bobco", "bob-box", "container")
    assert bob_box["node"] == "ded-b"
    usage_before = placement.usage(world.a.pk)
    address = Instance.objects.get(pk=box["id"]).addresses
    cluster.lose("ded-a1")

    r = world.client("operator").post("/api/v1/nodes/ded-a1/evacuate/")
    assert r.status_code == 202, r.json()
    body = r.json()
    assert "lost" in body["data_loss"] and body["counts"] == {"rebuilding": 2}
    moves = {m["name"]: m for m in body["instances"]}
    assert moves["box"]["target"] == "ded-a2", "a container only to a node dedicated to its tenant"
    assert moves["vm"]["target"] in {"shared-1", "ded-a2"}, "a VM to a shared node or its tenant's"
    cluster.run()

    for iid, target in ((box["id"], "ded-a2"), (vm["id"], moves["vm"]["target"])):
        inst = Instance.objects.get(pk=iid)
        assert (inst.node.name, inst.vm_state, inst.task_state, inst.power_state) == (
            target,
            "active",
            None,
            "running",
        )
        assert iid in cluster.workloads(target)
        assert "moved from ded-a1" in inst.isolation_reason
    assert Instance.objects.get(pk=box["id"]).addresses == address, "same address and MAC"
    assert placement.usage(world.a.pk) == usage_before, "a move adds nothing to the quota usage"
    assert Instance.objects.get(pk=bob_box["id"]).node.name == "ded-b"
    _invariant_holds()
    for iid in (box["id"], vm["id"]):
        actions = set(Event.objects.filter(object_id=iid).values_list("action", flat=True))
        assert {"instance.evacuate", "node.create"} <= actions
    assert Event.objects.filter(action="computenode.evacuate", object_id=str(
        ComputeNode.objects.get(name="ded-a1").pk
    )).exists()  # fmt: skip


def test_no_node_can_take_it_goes_to_error_with_the_reason(cluster: Cluster, world: World) -> None:
    box, _vm = _on_a1(cluster)
    ComputeNode.objects.filter(name="ded-a2").update(status="disabled")  # acme's only other dedicated node
    cluster.lose("ded-a1")
    body = world.client("operator").post("/api/v1/nodes/ded-a1/evacuate/").json()
    moves = {m["name"]: m for m in body["instances"]}
    assert moves["box"]["result"] == "error"
    assert moves["box"]["reason"].startswith("no node can take it: ")
    assert "ded-b: dedicated to bobco" in moves["box"]["reason"], "operators see each node and why"
    inst = Instance.objects.get(pk=box["id"])
    assert inst.vm_state == "error" and inst.node.name == "ded-a1"
    assert "no node can take it: " in inst.status_reason and "bobco" not in inst.status_reason
    assert moves["vm"]["result"] == "rebuilding" and moves["vm"]["target"] == "shared-1"
    cluster.run()
    _invariant_holds()
    tenant_view = world.client("a_member").get(f"/api/v1/instances/{box['id']}/").json()
    assert tenant_view["vm_state"] == "error" and "no node can take it" in tenant_view["status_reason"]


def test_a_full_quota_does_not_block_and_is_not_exceeded(cluster: Cluster, world: World) -> None:
    _box, _vm = _on_a1(cluster)
    used = placement.usage(world.a.pk)
    Quota.objects.filter(tenant=world.a).update(**{k: used[k] for k in Quota.LIMITS})
    cluster.lose("ded-a1")
    body = world.client("operator").post("/api/v1/nodes/ded-a1/evacuate/").json()
    assert body["counts"] == {"rebuilding": 2}
    cluster.run()
    assert placement.usage(world.a.pk) == used
    # and the tenant still cannot exceed it
    r = world.client("a_member").post(
        "/api/v1/instances/",
        {"tenant": "acme", "name": "more", "image": "tiny:1", "flavor": world.flavor_public.pk, "kind": "vm"},
        format="json",
    )
    assert r.status_code == 409 and r.json()["code"] == "quota_exceeded"


def test_capacity_is_respected(cluster: Cluster, world: World) -> None:
    _box, _vm = _on_a1(cluster)
    # ded-a2 has room for nothing more; the container has nowhere else to go
    ComputeNode.objects.filter(name="ded-a2").update(ram_allocation_ratio=0.000001)
    cluster.lose("ded-a1")
    body = world.client("operator").post("/api/v1/nodes/ded-a1/evacuate/").json()
    moves = {m["name"]: m for m in body["instances"]}
    assert moves["box"]["result"] == "error" and "ded-a2: not enough RAM" in moves["box"]["reason"]
    assert moves["vm"]["target"] == "shared-1"


def test_a_live_node_is_refused_and_only_operators_may_evacuate(cluster: Cluster, world: World) -> None:
    box, _vm = _on_a1(cluster)
    r = world.client("operator").post("/api/v1/nodes/ded-a1/evacuate/")
    assert r.status_code == 409
    assert "ded-a1 is up" in r.json()["message"] and "twice" in r.json()["message"]
    # disabled (drained) but still heartbeating: its workloads run, still refused
    ComputeNode.objects.filter(name="ded-a1").update(status="disabled")
    r = world.client("operator").post("/api/v1/nodes/ded-a1/evacuate/")
    assert r.status_code == 409 and "disabled" in r.json()["message"]
    cluster.lose("ded-a2")
    for who in ("a_admin", "a_member", "b_admin"):
        assert world.client(who).post("/api/v1/nodes/ded-a2/evacuate/").status_code == 403
        assert world.client(who).post("/api/v1/nodes/ded-a1/drain/").status_code == 403
    assert Instance.objects.get(pk=box["id"]).node.name == "ded-a1"
    assert not Evacuation.objects.exists()


def test_returning_node_destroys_moved_copies_and_keeps_the_rest(cluster: Cluster, world: World) -> None:
    box, vm = _on_a1(cluster)
    was = _only_up("ded-a1")
    stuck = cluster.launch("a_member", "acme", "stuck", "container")
    _restore(was)
    cluster.lose("ded-a1")
    # the stuck container cannot move: acme's other dedicated node is disabled for it
    ComputeNode.objects.filter(name="ded-a2").update(status="disabled")
    body = world.client("operator").post("/api/v1/nodes/ded-a1/evacuate/").json()
    moves = {m["name"]: m for m in body["instances"]}
    assert moves["vm"]["result"] == "rebuilding"
    assert moves["box"]["result"] == moves["stuck"]["result"] == "error"
    cluster.run()
    vm_node = Instance.objects.get(pk=vm["id"]).node.name
    assert vm_node == "shared-1" and vm["id"] in cluster.workloads("shared-1")
    assert cluster.workloads("ded-a1") == {box["id"], vm["id"], stuck["id"]}, "the lost node still has all"

    # ded-a1 returns: its first heartbeat comes before it reads its queue (the destroy waits there)
    cluster.come_back("ded-a1", messages_first=False)
    assert vm["id"] not in cluster.workloads("ded-a1"), "the moved VM's copy is destroyed"
    assert vm["id"] in cluster.workloads("shared-1"), "never the other way round"
    assert {box["id"], stuck["id"]} <= cluster.workloads("ded-a1"), "what was not moved is kept"
    moved = Instance.objects.get(pk=vm["id"])
    assert (moved.node.name, moved.vm_state, moved.power_state) == ("shared-1", "active", "running")
    for iid in (box["id"], stuck["id"]):  # reconcile sees them running on their own node again
        inst = Instance.objects.get(pk=iid)
        assert (inst.node.name, inst.vm_state, inst.power_state) == ("ded-a1", "active", "running")
    ev = Evacuation.objects.get(instance_id=vm["id"])
    assert ev.cleaned_at is not None and ev.source.name == "ded-a1" and ev.target.name == "shared-1"
    assert ComputeNode.objects.get(name="ded-a1").orphans == []
    # a heartbeat taken before the destroy's observation, processed after it, still lists the copy
    taken = ev.cleaned_at - dt.timedelta(seconds=0.5)
    ComputeNode.objects.filter(name="ded-a1").update(last_heartbeat=taken - dt.timedelta(seconds=1))
    late = {"instance_id": vm["id"], "kind": "vm", "power_state": "shutdown"}
    apply_node_report(heartbeat("ded-a1", inventory=[late], sent_at=taken.timestamp()))
    assert ComputeNode.objects.get(name="ded-a1").orphans == [], "no orphan from a late heartbeat"
    apply_node_report(heartbeat("ded-a1", inventory=[late]))  # taken after: a real leftover
    assert [o["instance_id"] for o in ComputeNode.objects.get(name="ded-a1").orphans] == [vm["id"]]
    actions = set(Event.objects.filter(object_id=vm["id"]).values_list("action", flat=True))
    assert "evacuation.cleaned" in actions


def test_reconcile_resends_the_destroy_and_never_reports_the_copy_as_orphan(
    cluster: Cluster, world: World
) -> None:
    box, vm = _on_a1(cluster)
    cluster.lose("ded-a1")
    world.client("operator").post("/api/v1/nodes/ded-a1/evacuate/")
    cluster.run()
    cluster.held.clear()  # the queued destroys are lost (e.g. the broker lost them)
    cluster.down.discard("ded-a1")
    cluster.beat("ded-a1")
    assert ComputeNode.objects.get(name="ded-a1").orphans == []
    assert not [m for m in cluster.nodes.sent if m[0] == "node.ded-a1"], "sent recently: not again yet"
    Evacuation.objects.update(destroy_sent_at=timezone.now() - dt.timedelta(minutes=5))
    cluster.beat("ded-a1")
    resent = [m for m in cluster.nodes.sent if m[0] == "node.ded-a1"]
    assert sorted(m[2][0]["instance_id"] for m in resent) == sorted([box["id"], vm["id"]])
    cluster.run()
    cluster.beat("ded-a1")
    assert cluster.workloads("ded-a1") == set()
    assert not Evacuation.objects.filter(cleaned_at__isnull=True).exists()
    assert {box["id"], vm["id"]} <= cluster.workloads("ded-a2") | cluster.workloads("shared-1")


def test_an_observation_from_the_old_node_never_changes_the_row(cluster: Cluster, world: World) -> None:
    _box, vm = _on_a1(cluster)
    cluster.lose("ded-a1")
    world.client("operator").post("/api/v1/nodes/ded-a1/evacuate/")
    cluster.run()
    late = Observation(vm["id"], "ded-a1", Action.STOP, "a-stop-sent-before", True, PowerState.SHUTDOWN)
    assert apply_observation(to_json(late)) == "other-node"
    inst = Instance.objects.get(pk=vm["id"])
    assert (inst.vm_state, inst.power_state) == ("active", "running")
    assert Event.objects.filter(object_id=vm["id"], action="node.stop.ignored").exists()


def test_volumes_and_snapshots_left_on_the_lost_node_are_marked(cluster: Cluster, world: World) -> None:
    _box, vm = _on_a1(cluster)
    node = ComputeNode.objects.get(name="ded-a1")
    vol = Volume.objects.create(
        tenant=world.a, name="data", size_gb=1, node=node, status="in-use", instance_id=vm["id"], target="vdc"
    )
    cluster.lose("ded-a1")
    body = world.client("operator").post("/api/v1/nodes/ded-a1/evacuate/").json()
    assert [v["id"] for v in body["volumes"]] == [str(vol.pk)]
    vol.refresh_from_db()
    assert (vol.status, vol.instance_id, vol.target) == ("error", None, "")
    assert "local storage" in vol.status_reason and "ded-a1" in vol.status_reason
    assert "Volumes are files on ded-a1" in body["data_loss"]


def test_a_delete_in_flight_on_the_lost_node_is_finished(cluster: Cluster, world: World) -> None:
    box, _vm = _on_a1(cluster)
    cluster.lose("ded-a1")
    assert world.client("a_member").delete(f"/api/v1/instances/{box['id']}/").status_code == 202
    cluster.run()  # held: the node is down
    body = world.client("operator").post("/api/v1/nodes/ded-a1/evacuate/").json()
    moves = {m["name"]: m for m in body["instances"]}
    assert moves["box"]["result"] == "deleted"
    assert Instance.objects.get(pk=box["id"]).vm_state == "deleted"
    cluster.run()
    cluster.come_back("ded-a1", messages_first=True)
    assert box["id"] not in cluster.workloads("ded-a1")
    assert Instance.objects.get(pk=box["id"]).vm_state == "deleted"


def test_drain_moves_containers_cold_and_migrates_vms(cluster: Cluster, world: World) -> None:
    box, vm = _on_a1(cluster)
    r = world.client("operator").post("/api/v1/nodes/ded-a1/drain/")
    assert r.status_code == 202, r.json()
    body = r.json()
    assert body["status"] == "disabled" and ComputeNode.objects.get(name="ded-a1").status == "disabled"
    moves = {m["name"]: m for m in body["instances"]}
    assert (moves["box"]["result"], moves["box"]["target"]) == ("moving", "ded-a2")
    assert moves["vm"]["result"] == "migrating" and moves["vm"]["target"] in ("ded-a2", "shared-1")
    # first step: only the old node hears of either (the container's copy destroyed, the VM shut down)
    assert [(q, t) for q, t, _ in cluster.nodes.sent] == [
        ("node.ded-a1", "compute.instance.delete"),
        ("node.ded-a1", "compute.instance.action"),
    ]
    cluster.run()
    assert box["id"] not in cluster.workloads("ded-a1") and box["id"] in cluster.workloads("ded-a2")
    inst = Instance.objects.get(pk=box["id"])
    assert (inst.node.name, inst.vm_state, inst.task_state) == ("ded-a2", "active", None)
    # the VM went through the portal (tests/portal/test_vm_drain.py follows each step)
    assert vm["id"] not in cluster.workloads("ded-a1")
    assert vm["id"] in cluster.workloads(moves["vm"]["target"])
    assert Instance.objects.get(pk=vm["id"]).node.name == moves["vm"]["target"]
    cluster.beat("ded-a1", "ded-a2")
    assert Instance.objects.get(pk=box["id"]).vm_state == "active"
    assert ComputeNode.objects.get(name="ded-a1").orphans == []
    _invariant_holds()


def test_drain_of_a_silent_node_is_refused(cluster: Cluster, world: World) -> None:
    _on_a1(cluster)
    cluster.lose("ded-a1")
    r = world.client("operator").post("/api/v1/nodes/ded-a1/drain/")
    assert r.status_code == 409 and "evacuate" in r.json()["message"].lower()


def test_drain_keeps_a_container_no_node_can_take(cluster: Cluster, world: World) -> None:
    box, _vm = _on_a1(cluster)
    ComputeNode.objects.filter(name__in=("ded-a2", "shared-1")).update(status="disabled")
    body = world.client("operator").post("/api/v1/nodes/ded-a1/drain/").json()
    moves = {m["name"]: m for m in body["instances"]}
    assert moves["box"]["result"] == "stays" and "no node can take it" in moves["box"]["reason"]
    assert moves["vm"]["result"] == "stays" and "no node can take it" in moves["vm"]["reason"]
    assert "ded-b: " in moves["vm"]["reason"], "operators read each node and why"
    assert cluster.nodes.sent == []
    inst = Instance.objects.get(pk=box["id"])
    assert (inst.node.name, inst.vm_state) == ("ded-a1", "active")
    assert Tenant.objects.get(slug="acme").instances.live().count() == 3  # box, vm, the world's web-1


def test_the_ops_page_evacuates_with_a_confirmation(cluster: Cluster, world: World) -> None:
    box, vm = _on_a1(cluster)
    op = world.client("operator")
    assert "/ops/nodes/ded-a1/evacuate/" not in op.get("/ops/nodes/ded-a1/").content.decode(), "up: no button"
    r = op.post("/ops/nodes/ded-a1/evacuate/")
    assert r.status_code == 409 and "still run" in r.content.decode()
    cluster.lose("ded-a1")
    assert 'href="/ops/nodes/ded-a1/evacuate/"' in op.get("/ops/nodes/ded-a1/").content.decode()
    assert 'href="/ops/nodes/ded-a1/evacuate/"' in op.get("/ops/nodes/").content.decode()
    page = op.get("/ops/nodes/ded-a1/evacuate/")
    assert page.status_code == 200 and "Evacuate node ded-a1?" in page.content.decode()
    assert "are lost" in page.content.decode()
    assert Instance.objects.get(pk=box["id"]).node.name == "ded-a1", "GET only asks"
    assert world.client("a_admin").post("/ops/nodes/ded-a1/evacuate/").status_code == 403
    r = op.post("/ops/nodes/ded-a1/evacuate/")
    assert r.status_code == 303 and r["Location"] == "/ops/nodes/ded-a1/"
    cluster.run()
    assert Instance.objects.get(pk=box["id"]).node.name == "ded-a2"
    assert Instance.objects.get(pk=vm["id"]).vm_state == "active"
    assert ("computenode.evacuate", 303) in Event.objects.filter(
        path="/ops/nodes/ded-a1/evacuate/"
    ).values_list("action", "status_code")


def test_manage_py_node_evacuate_and_drain(cluster: Cluster, world: World) -> None:
    box, vm = _on_a1(cluster)
    with pytest.raises(CommandError, match="ded-a1 is up"):
        call_command("node", "evacuate", "ded-a1")
    out = io.StringIO()
    call_command("node", "drain", "ded-a1", stdout=out)
    assert "acme/box (container): moving ded-a2" in out.getvalue()
    assert "acme/vm (vm): migrating" in out.getvalue()
    cluster.run()
    cluster.lose("ded-a1")  # drained, then lost: disabled and silent may be evacuated
    out = io.StringIO()
    call_command("node", "evacuate", "ded-a1", stdout=out)
    assert "no instances" in out.getvalue(), "everything had moved off"
    inst = Instance.objects.get(pk=vm["id"])
    assert inst.vm_state == "active" and inst.node.name != "ded-a1"
    assert Instance.objects.get(pk=box["id"]).node.name == "ded-a2"


def test_a_node_lost_during_its_drain_is_evacuated_with_the_waiting_moves(
    cluster: Cluster, world: World
) -> None:
    box, vm = _on_a1(cluster)
    world.client("operator").post("/api/v1/nodes/ded-a1/drain/")
    cluster.lose("ded-a1")  # before it stopped the container
    cluster.run()
    assert Instance.objects.get(pk=box["id"]).task_state == "spawning", "still waiting for ded-a1"
    body = world.client("operator").post("/api/v1/nodes/ded-a1/evacuate/").json()
    moves = {m["name"]: m for m in body["instances"]}
    assert (moves["box"]["result"], moves["box"]["target"]) == ("rebuilding", "ded-a2")
    assert moves["vm"]["result"] == "rebuilding"
    cluster.run()
    for iid in (box["id"], vm["id"]):
        inst = Instance.objects.get(pk=iid)
        assert (inst.vm_state, inst.task_state) == ("active", None) and inst.node.name != "ded-a1"
    cluster.come_back("ded-a1", messages_first=True)
    assert cluster.workloads("ded-a1") == set()
    assert not Evacuation.objects.filter(cleaned_at__isnull=True).exists()


def test_a_stopped_instance_is_stopped_again_after_its_move(cluster: Cluster, world: World) -> None:
    box, vm = _on_a1(cluster)
    c = world.client("a_member")
    assert (
        c.post(f"/api/v1/instances/{vm['id']}/actions/", {"action": "stop"}, format="json").status_code == 202
    )
    cluster.run()
    assert Instance.objects.get(pk=vm["id"]).vm_state == "stopped"
    cluster.lose("ded-a1")
    world.client("operator").post("/api/v1/nodes/ded-a1/evacuate/")
    cluster.run()
    inst = Instance.objects.get(pk=vm["id"])
    assert (inst.vm_state, inst.task_state, inst.power_state) == ("stopped", None, "shutdown")
    assert cluster.nodes.service(f"node.{inst.node.name}")._drivers[Kind.VM].workloads[vm["id"]] == "shutdown"
    assert Instance.objects.get(pk=box["id"]).vm_state == "active", "a running one stays running"
    actions = list(
        Event.objects.filter(object_id=vm["id"]).order_by("created_at").values_list("action", flat=True)
    )
    assert actions[-3:] == ["node.create", "dispatch.stop", "node.stop"]
    assert not Evacuation.objects.filter(then_stop=True).exists()


def test_the_ops_page_drains_and_moves_containers_and_vms(cluster: Cluster, world: World) -> None:
    box, vm = _on_a1(cluster)
    op = world.client("operator")
    assert 'href="/ops/nodes/ded-a1/move/"' in op.get("/ops/nodes/ded-a1/").content.decode()
    page = op.get("/ops/nodes/ded-a1/move/")
    assert page.status_code == 200 and "Move the instances off node ded-a1?" in page.content.decode()
    assert "1 VM is migrated cold" in page.content.decode()
    assert ComputeNode.objects.get(name="ded-a1").status == "up", "GET only asks"
    assert world.client("a_admin").post("/ops/nodes/ded-a1/move/").status_code == 403
    r = op.post("/ops/nodes/ded-a1/move/")
    assert r.status_code == 303 and r["Location"] == "/ops/nodes/ded-a1/"
    cluster.run()
    assert Instance.objects.get(pk=box["id"]).node.name == "ded-a2"
    assert Instance.objects.get(pk=vm["id"]).node.name != "ded-a1"
    followed = op.get("/ops/nodes/ded-a1/").content.decode()
    assert "1 migrating" in followed and "Move instances off" in followed
    cluster.lose("ded-a1")
    r = op.post("/ops/nodes/ded-a1/move/")
    assert r.status_code == 409 and "Evacuate it instead" in r.content.decode()


def test_an_instance_that_cannot_be_rebuilt_fails_alone(
    cluster: Cluster, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    box, vm = _on_a1(cluster)
    real = services.build_spec

    def build_spec(inst: Instance) -> Any:
        if str(inst.pk) == box["id"]:
            raise Conflict("the tenant's id range is used up")
        return real(inst)

    monkeypatch.setattr(services, "build_spec", build_spec)
    cluster.lose("ded-a1")
    body = world.client("operator").post("/api/v1/nodes/ded-a1/evacuate/").json()
    moves = {m["name"]: m for m in body["instances"]}
    assert moves["box"]["result"] == "error" and moves["box"]["reason"].startswith("cannot rebuild it: ")
    assert moves["vm"]["result"] == "rebuilding"
    inst = Instance.objects.get(pk=box["id"])
    assert (inst.node.name, inst.vm_state) == ("ded-a1", "error"), "its move was rolled back"
    assert not Evacuation.objects.filter(instance_id=box["id"]).exists()
    assert box["id"] not in str(cluster.nodes.sent + cluster.held), "nothing was sent for it"
    cluster.run()
    assert Instance.objects.get(pk=vm["id"]).vm_state == "active"


def test_the_ops_evacuate_page(cluster: Cluster, world: World) -> None:
    """/ops/nodes/NAME/evacuate/: a refusal on the nodes page; else the summary, a warning per stuck move."""
    _on_a1(cluster)
    c = world.client("operator")
    r = c.post("/ops/nodes/ded-a1/evacuate/")
    assert r.status_code == 409 and b"ded-a1 is up" in r.content
    ComputeNode.objects.filter(name="ded-a2").update(status="disabled")  # acme's only other dedicated node
    cluster.lose("ded-a1")
    r = c.post("/ops/nodes/ded-a1/evacuate/", follow=True)
    assert r.redirect_chain == [("/ops/nodes/ded-a1/", 303)]
    shown = [str(m) for m in r.context["messages"]]
    assert shown[0].endswith(".") and any(m.startswith("acme/box: no node can take it: ") for m in shown)
    node = ComputeNode.objects.get(name="ded-a1")
    event = Event.objects.filter(action="computenode.evacuate", object_id=str(node.pk)).latest("pk")
    assert event.message and event.message + "." == shown[0]
