"""Snapshots as resources: list, take, revert, delete through the API, settled by the node, reconciled.

The nodes are FakeNodes (the real NodeService over the fake driver), so the
observation that settles a row carries the node's real list of snapshots.
"""

from __future__ import annotations

import time
from typing import Any

from compute.spec import Kind, SnapshotInfo
from portal.cloud.models import Instance
from portal.cloud.tasks import apply_node_report
from portal.storage import snapshots
from portal.storage.models import Snapshot
from tests.portal.conftest import FakeNodes, World, heartbeat
from tests.portal.test_flow import _launch


def _vm(world: World, nodes: FakeNodes) -> tuple[Any, str]:
    inst = _launch(world, "a_member", "acme", "snappy", image="tiny:1")
    nodes.run()
    return inst, f"/api/v1/instances/{inst['id']}/snapshots/"


def test_take_list_revert_delete(world: World, nodes: FakeNodes, sent: list[Any]) -> None:
    inst, url = _vm(world, nodes)
    c = world.client("a_member")
    assert c.get(url).json() == []
    r = c.post(url, {"name": "before-upgrade"}, format="json")
    assert r.status_code == 202 and r.json()["status"] == "creating", r.json()
    assert c.get(f"/api/v1/instances/{inst['id']}/").json()["task_state"] == "snapshotting"
    nodes.run()
    listed = c.get(url).json()
    assert [(s["name"], s["status"]) for s in listed] == [("before-upgrade", "available")]
    assert listed[0]["taken_at"] and listed[0]["instance_id"] == inst["id"]
    assert "size_bytes" in listed[0]
    # the same name again, an unknown one to revert or delete: refused up front, nothing sent
    assert c.post(url, {"name": "before-upgrade"}, format="json").status_code == 409
    assert c.post(url + "nope/revert/", format="json").status_code == 404
    r = c.post(f"/api/v1/instances/{inst['id']}/actions/", {"action": "revert", "params": {"name": "nope"}})
    assert r.status_code == 404
    assert "has no snapshot 'nope'; its snapshots: before-upgrade" in r.json()["message"]
    assert c.delete(url + "nope/").status_code == 404
    assert sent == []
    # revert a listed one
    r = c.post(url + "before-upgrade/revert/", format="json")
    assert r.status_code == 202 and r.json()["status"] == "reverting"
    assert c.get(f"/api/v1/instances/{inst['id']}/").json()["task_state"] == "reverting"
    nodes.run()
    assert c.get(url + "before-upgrade/").json()["status"] == "available"
    # the actions endpoint keeps the rows too
    r = c.post(f"/api/v1/instances/{inst['id']}/actions/", {"action": "snapshot", "params": {"name": "s2"}})
    assert r.status_code == 202
    nodes.run()
    assert [s["name"] for s in c.get(url).json()] == ["before-upgrade", "s2"]
    # delete: deleting until the node reports, then gone from the portal and the node
    r = c.delete(url + "s2/")
    assert r.status_code == 202 and r.json()["status"] == "deleting"
    assert c.get(f"/api/v1/instances/{inst['id']}/").json()["task_state"] == "deleting_snap"
    nodes.run()
    assert [s["name"] for s in c.get(url).json()] == ["before-upgrade"]
    driver = nodes.service("node.shared-1").driver(Kind.VM)
    assert [s.name for s in driver.list_snapshots(inst["id"])] == ["before-upgrade"]
    got = c.get(f"/api/v1/instances/{inst['id']}/").json()
    assert (got["vm_state"], got["task_state"]) == ("active", None)


def test_bad_names_roles_and_other_tenants(world: World, nodes: FakeNodes, sent: list[Any]) -> None:
    _, url = _vm(world, nodes)
    c = world.client("a_member")
    for bad in ({"name": "../x"}, {"name": ""}, {"name": 5}, {}):
        r = c.post(url, bad, format="json")
        assert r.status_code == 400 and r.json()["message"], bad
    assert world.client("a_viewer").get(url).status_code == 200
    assert world.client("a_viewer").post(url, {"name": "v"}, format="json").status_code == 403
    assert world.client("b_admin").get(url).status_code == 404
    assert world.client("b_admin").post(url, {"name": "x"}, format="json").status_code == 404
    assert sent == [] and not Snapshot.objects.exists()


def test_a_failed_snapshot_leaves_no_row(world: World, nodes: FakeNodes) -> None:
    inst, url = _vm(world, nodes)
    c = world.client("a_member")
    driver = nodes.service("node.shared-1").driver(Kind.VM)
    driver.workloads.pop(inst["id"])  # the VM vanished from the node
    assert c.post(url, {"name": "s1"}, format="json").status_code == 202
    nodes.run()
    assert c.get(url).json() == []
    assert "snapshot failed" in c.get(f"/api/v1/instances/{inst['id']}/").json()["status_reason"]


def test_reconcile_adopts_what_the_node_has_and_marks_what_it_lost(world: World, nodes: FakeNodes) -> None:
    inst, url = _vm(world, nodes)
    c = world.client("a_member")
    assert c.post(url, {"name": "kept"}, format="json").status_code == 202
    nodes.run()
    Snapshot.objects.create(
        tenant=world.a, instance=Instance.objects.get(pk=inst["id"]), name="lost", status="available"
    )
    item = {
        "instance_id": inst["id"],
        "kind": "vm",
        "power_state": "running",
        "snapshots": [
            {"name": "kept", "created_at": time.time() - 60},
            {"name": "made-by-hand", "created_at": time.time() - 30, "size_bytes": 0},
        ],
    }
    apply_node_report(heartbeat("shared-1", capabilities={"vm": ["snapshots"]}, inventory=[item]))
    rows = {s["name"]: s for s in c.get(url).json()}
    assert rows["kept"]["status"] == "available"
    assert (rows["made-by-hand"]["status"], rows["made-by-hand"]["status_reason"]) == (
        "available",
        "found on the node",
    )
    assert (rows["lost"]["status"], rows["lost"]["status_reason"]) == ("missing", "the node no longer has it")
    # a missing snapshot cannot be reverted to
    assert c.post(url + "lost/revert/").status_code == 409


def test_a_steady_heartbeat_leaves_snapshot_rows_alone(world: World, nodes: FakeNodes) -> None:
    """Reconcile reads the rows in one query and locks and writes only instances out of step."""
    inst, url = _vm(world, nodes)
    c = world.client("a_member")
    assert c.post(url, {"name": "kept"}, format="json").status_code == 202
    nodes.run()
    taken = time.time() - 60
    item = {
        "instance_id": inst["id"],
        "kind": "vm",
        "power_state": "running",
        "snapshots": [{"name": "kept", "created_at": taken, "size_bytes": 7}],
    }
    listed = {inst["id"]: (SnapshotInfo("kept", taken, 7),)}
    assert snapshots.out_of_step(listed) == [inst["id"]], "the node's time and size are not in the row yet"
    now, caps = time.time(), {"vm": ["snapshots"]}
    apply_node_report(heartbeat("shared-1", capabilities=caps, inventory=[item], sent_at=now))
    row = Snapshot.objects.get(name="kept")
    assert row.taken_at is not None
    assert row.size_bytes == 7 and abs(row.taken_at.timestamp() - taken) < 1e-3
    assert snapshots.out_of_step(listed) == []
    apply_node_report(heartbeat("shared-1", capabilities=caps, inventory=[item], sent_at=now + 1))
    assert Snapshot.objects.get(name="kept").updated_at == row.updated_at, "nothing changed, nothing written"
    # a snapshot the node lost is out of step again
    assert snapshots.out_of_step({inst["id"]: ()}) == [inst["id"]]


def test_the_snapshot_endpoints_are_in_the_schema(world: World) -> None:
    schema = world.client("a_member").get("/api/schema/", {"format": "json"}).json()
    paths = schema["paths"]
    assert {"get", "post"} <= set(paths["/api/v1/instances/{id}/snapshots/"])
    assert {"get", "delete"} <= set(paths["/api/v1/instances/{id}/snapshots/{name}/"])
    assert "post" in paths["/api/v1/instances/{id}/snapshots/{name}/revert/"]
