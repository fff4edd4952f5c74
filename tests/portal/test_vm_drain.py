"""A drain's cold migration of a VM, step by step, against fake nodes (portal/cloud/vm_migration.py).

The nodes are ``NodeService`` over fake drivers fed by the portal's real
messages (``Cluster`` of test_evacuation); the disk is a real qcow2 (the fake
driver's export) PUT to the portal's real upload endpoint and imported for
real (``node_uploads``).  Each test follows one order of steps or one failure.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.utils import timezone

from compute import fetch
from compute.drivers.base import DriverError
from compute.spec import Kind
from portal.audit.models import Event
from portal.cloud import services
from portal.cloud.models import ComputeNode, Evacuation, Instance
from portal.cloud.tasks import sweep
from portal.images.models import Image
from portal.storage.models import Volume
from tests.portal.conftest import FakeNodes, World
from tests.portal.test_evacuation import Cluster, _only_up, _restore, make_cluster

VM = "compute.instance.action"


@pytest.fixture
def cluster(world: World, nodes: FakeNodes, node_uploads: list[str]) -> Cluster:
    return make_cluster(world, nodes)


def _vm_on_a1(c: Cluster) -> dict[str, Any]:
    was = _only_up("ded-a1")
    vm = c.launch("a_member", "acme", "vm", "vm", image="tiny:1")
    _restore(was)
    return vm


def _step(c: Cluster) -> list[tuple[str, str]]:
    """Deliver the pending messages one round (not what they cause); returns (queue, task) of each."""
    pending, c.nodes.sent[:] = list(c.nodes.sent), []
    for queue, task, args in pending:
        c.nodes.service(queue).handle(task, *args)
    return [(q, t) for q, t, _ in pending]


def _nic(iid: str) -> tuple[Any, ...]:
    spec = services.build_spec(Instance.objects.get(pk=iid))
    return tuple((n.mac, n.address) for n in spec.networks)


def _migrate_events(iid: str) -> list[str]:
    return list(
        Event.objects.filter(object_id=iid, action="instance.migrate")
        .order_by("created_at", "pk")
        .values_list("message", flat=True)
    )


def _driver(c: Cluster, node: str) -> Any:
    return c.nodes.service(f"node.{node}")._drivers[Kind.VM]


def test_a_running_vm_moves_in_order_and_runs_on_the_target_with_its_address(
    cluster: Cluster, world: World, node_uploads: list[str]
) -> None:
    vm = _vm_on_a1(cluster)
    nic = _nic(vm["id"])
    body = world.client("operator").post("/api/v1/nodes/ded-a1/drain/").json()
    (move,) = [m for m in body["instances"] if m["name"] == "vm"]
    target = move["target"]
    assert move["result"] == "migrating" and target in ("shared-1", "ded-a2"), move
    assert "never forced" in move["reason"]
    inst = Instance.objects.get(pk=vm["id"])
    assert (inst.task_state, inst.node.name) == ("migrating", "ded-a1")
    hidden = Image.objects.get(hidden=True)
    assert hidden.owner == world.a and hidden.status == "queued"
    listed = world.client("a_member").get("/api/v1/images/").json()["results"]
    assert hidden.pk not in {i["id"] for i in listed}, "the move's image is never listed"
    assert world.client("operator").get(f"/api/v1/images/{hidden.pk}/").status_code == 404

    # 1. only the source hears of it: a clean shutdown, never forced
    assert _step(cluster) == [("node.ded-a1", VM)]
    assert _driver(cluster, "ded-a1").workloads[vm["id"]] == "shutdown"
    # 2. it sends its disk (to the hidden image's upload endpoint); nobody else has heard yet
    assert _step(cluster) == [("node.ded-a1", "compute.instance.send_disk")]
    assert node_uploads == [f"/api/v1/blobs/uploads/{hidden.pk}"]
    hidden.refresh_from_db()
    assert hidden.status == "active"
    launch = {
        "tenant": "acme",
        "name": "x",
        "image": str(hidden.pk),
        "flavor": world.flavor_public.pk,
        "kind": "vm",
    }
    refused = world.client("a_member").post("/api/v1/instances/", launch, format="json")
    assert refused.status_code == 400 and "image" in refused.json()["errors"], "never launched"
    # the row names the target now; the source still lists its (stopped) copy: no orphan
    assert Instance.objects.get(pk=vm["id"]).node.name == target
    cluster.beat("ded-a1")
    assert ComputeNode.objects.get(name="ded-a1").orphans == []
    # 3. the target builds it on that disk; the source copy is still there (stopped)
    assert _step(cluster) == [(f"node.{target}", "compute.instance.create")]
    assert _driver(cluster, target).workloads[vm["id"]] == "running"
    assert _driver(cluster, "ded-a1").workloads[vm["id"]] == "shutdown"
    # 4. only now the source copy is destroyed
    assert _step(cluster) == [("node.ded-a1", "compute.instance.delete")]
    assert vm["id"] not in cluster.workloads("ded-a1")
    cluster.run()

    inst = Instance.objects.get(pk=vm["id"])
    assert (inst.node.name, inst.vm_state, inst.task_state, inst.power_state) == (
        target,
        "active",
        None,
        "running",
    )
    assert _nic(vm["id"]) == nic, "same MAC and address"
    assert "migrated from ded-a1" in inst.isolation_reason
    ev = Evacuation.objects.get(instance=inst, source__name="ded-a1")
    assert (ev.step, ev.image, ev.cleaned_at is not None) == ("", None, True)
    assert not Image.objects.filter(hidden=True).exists(), "the hidden image is deleted after the move"
    events = _migrate_events(vm["id"])
    assert len(events) == 5 and "shut down on ded-a1" in events[1] and "sent its disk" in events[2]
    assert f"{target} builds it" in events[3] and "destroying the copy on ded-a1" in events[4]
    cluster.beat("ded-a1", target)
    assert ComputeNode.objects.get(name="ded-a1").orphans == []
    assert Instance.objects.get(pk=vm["id"]).vm_state == "active"


def test_a_stopped_vm_skips_the_shutdown_and_is_stopped_on_the_target(
    cluster: Cluster, world: World, node_uploads: list[str]
) -> None:
    vm = _vm_on_a1(cluster)
    c = world.client("a_member")
    r = c.post(f"/api/v1/instances/{vm['id']}/actions/", {"action": "stop"}, format="json")
    assert r.status_code == 202
    cluster.run()
    world.client("operator").post("/api/v1/nodes/ded-a1/drain/")
    assert _step(cluster) == [("node.ded-a1", "compute.instance.send_disk")]
    cluster.run()
    inst = Instance.objects.get(pk=vm["id"])
    assert inst.node.name != "ded-a1"
    assert (inst.vm_state, inst.task_state, inst.power_state) == ("stopped", None, "shutdown")
    assert _driver(cluster, inst.node.name).workloads[vm["id"]] == "shutdown"
    assert vm["id"] not in cluster.workloads("ded-a1")


def test_a_guest_that_ignores_the_power_button_is_not_forced_and_stays_running(
    cluster: Cluster, world: World, node_uploads: list[str]
) -> None:
    vm = _vm_on_a1(cluster)
    _driver(cluster, "ded-a1").ignores_shutdown.add(vm["id"])
    world.client("operator").post("/api/v1/nodes/ded-a1/drain/")
    cluster.run()
    inst = Instance.objects.get(pk=vm["id"])
    assert (inst.node.name, inst.vm_state, inst.task_state, inst.power_state) == (
        "ded-a1",
        "active",
        None,
        "running",
    )
    assert _driver(cluster, "ded-a1").workloads[vm["id"]] == "running"
    assert "could not shut it down cleanly" in inst.status_reason and "never forced off" in inst.status_reason
    assert node_uploads == [] and not Image.objects.filter(hidden=True).exists()
    assert Evacuation.objects.get(instance=inst).cleaned_at is not None
    assert not any(vm["id"] in cluster.workloads(n) for n in ("shared-1", "ded-a2"))


def test_a_failed_upload_leaves_the_vm_on_its_source_started_again(
    cluster: Cluster, world: World, node_uploads: list[str], monkeypatch: Any
) -> None:
    vm = _vm_on_a1(cluster)

    def broken(url: str, token: str, path: Any, timeout: float = 0) -> None:
        raise fetch.FetchError(f"PUT {url}: HTTP 507 no space")

    monkeypatch.setattr(fetch, "upload", broken)
    world.client("operator").post("/api/v1/nodes/ded-a1/drain/")
    cluster.run()
    inst = Instance.objects.get(pk=vm["id"])
    assert (inst.node.name, inst.vm_state, inst.task_state, inst.power_state) == (
        "ded-a1",
        "active",
        None,
        "running",
    )
    assert _driver(cluster, "ded-a1").workloads[vm["id"]] == "running", "restarted as it was"
    assert not Image.objects.filter(hidden=True).exists()
    why = _migrate_events(vm["id"])[-1]  # the start's observation cleared the row's reason; not the event
    assert "could not send its disk" in why and "HTTP 507" in why and "stays on ded-a1" in why


def test_a_failed_create_on_the_target_puts_it_back_and_cleans_the_target(
    cluster: Cluster, world: World, node_uploads: list[str], monkeypatch: Any
) -> None:
    vm = _vm_on_a1(cluster)
    body = world.client("operator").post("/api/v1/nodes/ded-a1/drain/").json()
    target = next(m["target"] for m in body["instances"] if m["name"] == "vm")
    driver = _driver(cluster, target)

    def refuse(spec: Any) -> Any:
        driver.workloads[spec.instance_id] = "shutdown"  # a partial copy the driver left
        raise DriverError("the blob does not match its digest")

    monkeypatch.setattr(driver, "spawn", refuse)
    cluster.run()
    inst = Instance.objects.get(pk=vm["id"])
    assert (inst.node.name, inst.vm_state, inst.task_state, inst.power_state) == (
        "ded-a1",
        "active",
        None,
        "running",
    )
    assert f"{target} could not build it" in _migrate_events(vm["id"])[-1]
    assert _driver(cluster, "ded-a1").workloads[vm["id"]] == "running"
    assert vm["id"] not in cluster.workloads(target), "the target's copy is destroyed"
    assert not Evacuation.objects.filter(cleaned_at__isnull=True).exists()
    assert not Image.objects.filter(hidden=True).exists()


def test_a_vm_with_a_volume_stays_with_the_reason(cluster: Cluster, world: World) -> None:
    vm = _vm_on_a1(cluster)
    node = ComputeNode.objects.get(name="ded-a1")
    Volume.objects.create(
        tenant=world.a, name="data", size_gb=1, node=node, status="in-use", instance_id=vm["id"], target="vdc"
    )
    body = world.client("operator").post("/api/v1/nodes/ded-a1/drain/").json()
    (move,) = [m for m in body["instances"] if m["name"] == "vm"]
    assert move["result"] == "stays" and "volume(s) data attached" in move["reason"]
    assert "local storage" in move["reason"]
    assert cluster.nodes.sent == [] and not Image.objects.filter(hidden=True).exists()
    inst = Instance.objects.get(pk=vm["id"])
    assert (inst.node.name, inst.vm_state, inst.task_state) == ("ded-a1", "active", None)


def test_a_step_past_its_deadline_puts_it_back_on_the_source(
    cluster: Cluster, world: World, node_uploads: list[str]
) -> None:
    vm = _vm_on_a1(cluster)
    world.client("operator").post("/api/v1/nodes/ded-a1/drain/")
    _step(cluster)  # shut down; the send_disk message is lost with the node's worker
    cluster.nodes.sent.clear()
    Instance.objects.filter(pk=vm["id"]).update(task_deadline=timezone.now() - dt.timedelta(seconds=1))
    assert sweep()["stuck"] == 1
    cluster.run()
    inst = Instance.objects.get(pk=vm["id"])
    assert (inst.node.name, inst.vm_state, inst.power_state) == ("ded-a1", "active", "running")
    assert "did not report the sending step in time" in _migrate_events(vm["id"])[-1]
    assert not Image.objects.filter(hidden=True).exists()
