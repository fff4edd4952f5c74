"""Volumes through the API against FakeNodes: the real NodeService makes real qcow2 files (qemu-img).

What the libvirt side does with them (hot attach, a guest writing and another
reading, detach, persistence) is tests/compute/test_vm_volumes.py; here the
portal's rules: quota, tenancy, node, states, the node's observation, survival
of instance deletion, reconcile of a missing file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compute.drivers.base import DriverError
from compute.spec import Kind
from portal.audit.models import Event
from portal.cloud.models import ComputeNode, Instance
from portal.cloud.tasks import apply_node_report
from portal.storage.models import Volume
from portal.tenancy.models import Quota
from tests.hostcaps import require_binary
from tests.portal.conftest import FakeNodes, World, heartbeat
from tests.portal.test_flow import _launch

URL = "/api/v1/volumes/"


@pytest.fixture(autouse=True)
def _qemu_img() -> None:
    require_binary("qemu-img")


def _vm(world: World, nodes: FakeNodes, name: str) -> dict[str, Any]:
    inst = _launch(world, "a_member", "acme", name, image="tiny:1", kind="vm")
    nodes.run()
    return inst


def _volume(world: World, nodes: FakeNodes, name: str = "data", size_gb: int = 1) -> dict[str, Any]:
    r = world.client("a_member").post(
        URL, {"name": name, "size_gb": size_gb, "node": "shared-1"}, format="json"
    )
    assert r.status_code == 202 and r.json()["status"] == "creating", r.json()
    nodes.run()
    return dict(world.client("a_member").get(f"{URL}{r.json()['id']}/").json())


def _file(nodes: FakeNodes, vid: str) -> Path:
    return Path(nodes.tmp) / "volumes" / f"{vid}.qcow2"


def test_create_attach_detach_survive_delete(world: World, nodes: FakeNodes) -> None:
    c = world.client("a_member")
    vm1, vm2 = _vm(world, nodes, "vm1"), _vm(world, nodes, "vm2")
    vol = _volume(world, nodes)
    assert (vol["status"], vol["node"], vol["size_gb"], vol["attachments"]) == (
        "available",
        "shared-1",
        1,
        [],
    )
    assert _file(nodes, vol["id"]).is_file()
    # attach: attaching until the node reports, then in-use on vdc
    r = c.post(f"{URL}{vol['id']}/attach/", {"instance": vm1["id"]}, format="json")
    assert r.status_code == 202 and r.json()["status"] == "attaching"
    nodes.run()
    got = c.get(f"{URL}{vol['id']}/").json()
    assert got["status"] == "in-use"
    assert got["attachments"] == [
        {"instance": vm1["id"], "device": "vdc", "mount_path": None, "status": "in-use"}
    ]
    # attached: not deletable, not attachable elsewhere
    r = c.delete(f"{URL}{vol['id']}/")
    assert r.status_code == 409 and "detach it first" in r.json()["message"]
    assert c.post(f"{URL}{vol['id']}/attach/", {"instance": vm2["id"]}, format="json").status_code == 409
    # detach, attach to the second VM
    assert c.post(f"{URL}{vol['id']}/detach/").json()["status"] == "detaching"
    nodes.run()
    assert c.get(f"{URL}{vol['id']}/").json()["status"] == "available"
    assert c.post(f"{URL}{vol['id']}/attach/", {"instance": vm2["id"]}, format="json").status_code == 202
    nodes.run()
    driver = nodes.service("node.shared-1").driver(Kind.VM)
    assert list(driver.disks[vm2["id"]].values()) == ["vdc"]  # type: ignore[attr-defined]
    # deleting the instance leaves the volume, detached, with its file
    assert c.delete(f"/api/v1/instances/{vm2['id']}/").status_code == 202
    nodes.run()
    got = c.get(f"{URL}{vol['id']}/").json()
    assert (got["status"], got["attachments"]) == ("available", [])
    assert _file(nodes, vol["id"]).is_file()
    # grow it (detached), then delete it: its file goes
    r = c.post(f"{URL}{vol['id']}/extend/", {"size_gb": 2}, format="json")
    assert r.status_code == 202 and r.json()["status"] == "extending"
    nodes.run()
    assert c.get(f"{URL}{vol['id']}/").json()["size_gb"] == 2
    assert c.post(f"{URL}{vol['id']}/extend/", {"size_gb": 1}, format="json").status_code == 409
    assert c.delete(f"{URL}{vol['id']}/").json()["status"] == "deleting"
    nodes.run()
    assert not _file(nodes, vol["id"]).exists()
    assert c.get(URL).json()["count"] == 0
    assert c.get(URL, {"status": "deleted"}).json()["count"] == 1
    actions = set(Event.objects.filter(object_id=vol["id"]).values_list("action", flat=True))
    assert {"volume.create", "node.volume.attach", "node.volume.detach", "node.volume.delete"} <= actions


def test_quota_in_gb_and_count(world: World, nodes: FakeNodes, sent: list[Any]) -> None:
    c = world.client("a_member")
    Quota.objects.filter(tenant=world.a).update(volumes=2, volume_gb=10)
    r = c.post(URL, {"name": "huge", "size_gb": 11, "node": "shared-1"}, format="json")
    assert r.status_code == 409 and r.json()["code"] == "quota_exceeded"
    assert "Quota exceeded for volume_gb: tenant acme uses 0 of 10" in r.json()["message"]
    _volume(world, nodes, "a", 6)
    _volume(world, nodes, "b", 4)
    r = c.post(URL, {"name": "c", "size_gb": 1, "node": "shared-1"}, format="json")
    assert r.status_code == 409 and "Quota exceeded for volumes" in r.json()["message"]
    vol = Volume.objects.get(name="a")
    assert c.post(f"{URL}{vol.pk}/extend/", {"size_gb": 7}, format="json").status_code == 409
    usage = c.get(f"/api/v1/quotas/{Quota.objects.get(tenant=world.a).pk}/").json()["usage"]
    assert (usage["volumes"], usage["volume_gb"]) == (2, 10)
    assert Volume.objects.count() == 2 and sent == []


def test_refusals_change_nothing(world: World, nodes: FakeNodes, sent: list[Any]) -> None:
    c = world.client("a_member")
    vol = _volume(world, nodes)
    for bad in (
        {"name": "x", "size_gb": 0},
        {"name": "x", "size_gb": "1"},
        {"name": "../x", "size_gb": 1},
        {"name": "x", "size_gb": 1, "node": "nowhere"},
        {"size_gb": 1},
    ):
        r = c.post(URL, bad, format="json")
        assert r.status_code == 400 and r.json()["message"], bad
    # another tenant's instance is not found; bob cannot see or touch acme's volume
    theirs = _launch(world, "b_member", "bobco", "theirs", image="tiny:1", kind="vm")
    r = c.post(f"{URL}{vol['id']}/attach/", {"instance": theirs["id"]}, format="json")
    assert r.status_code == 404
    assert world.client("b_admin").get(f"{URL}{vol['id']}/").status_code == 404
    assert world.client("b_admin").delete(f"{URL}{vol['id']}/").status_code == 404
    assert world.client("a_viewer").post(f"{URL}{vol['id']}/detach/").status_code == 403
    # an instance on another node
    ComputeNode.objects.create(name="shared-2", queue="node.shared-2", status="up", drivers={})
    elsewhere = Instance.objects.get(pk=world.instance_a.pk)
    Instance.objects.filter(pk=elsewhere.pk).update(node=ComputeNode.objects.get(name="shared-2"))
    r = c.post(f"{URL}{vol['id']}/attach/", {"instance": str(elsewhere.pk)}, format="json")
    assert r.status_code == 409 and "a volume attaches only on its own node" in r.json()["message"]
    # detaching a volume that is not attached (the boot disk is never a volume)
    r = c.post(f"{URL}{vol['id']}/detach/")
    assert r.status_code == 409 and "is not attached" in r.json()["message"]
    assert [m[1] for m in sent] == ["compute.instance.create"]  # bob's launch, nothing for the volume
    assert Volume.objects.get(pk=vol["id"]).status == "available"


def test_a_failed_attach_leaves_volume_available_and_instance_as_it_was(
    world: World, nodes: FakeNodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = world.client("a_member")
    vm = _vm(world, nodes, "vm1")
    vol = _volume(world, nodes)
    driver = nodes.service("node.shared-1").driver(Kind.VM)

    def broken(*args: Any, **kw: Any) -> str:
        raise DriverError("attaching the volume failed: could not open disk image")

    monkeypatch.setattr(driver, "attach_volume", broken)
    before = Instance.objects.filter(pk=vm["id"]).values("vm_state", "task_state", "power_state").get()
    assert c.post(f"{URL}{vol['id']}/attach/", {"instance": vm["id"]}, format="json").status_code == 202
    nodes.run()
    got = c.get(f"{URL}{vol['id']}/").json()
    assert (got["status"], got["attachments"]) == ("available", [])
    assert got["status_reason"] == "attach failed: attaching the volume failed: could not open disk image"
    assert (
        Instance.objects.filter(pk=vm["id"]).values("vm_state", "task_state", "power_state").get() == before
    )


def test_reconcile_reports_a_missing_volume_file(world: World, nodes: FakeNodes) -> None:
    vol = _volume(world, nodes)
    report = nodes.service("node.shared-1").report()
    assert report.volumes == (vol["id"],)
    _file(nodes, vol["id"]).unlink()
    apply_node_report(heartbeat("shared-1", volumes=[]))
    got = world.client("a_member").get(f"{URL}{vol['id']}/").json()
    assert got["missing_since"] and got["status_reason"] == (
        "volume file missing on node shared-1 (found by reconcile)"
    )
    assert Event.objects.filter(action="reconcile.volume_missing", object_id=vol["id"]).exists()
    apply_node_report(heartbeat("shared-1", volumes=[vol["id"]]))  # back (restored by an operator)
    assert world.client("a_member").get(f"{URL}{vol['id']}/").json()["missing_since"] is None


def test_volumes_are_in_the_schema(world: World) -> None:
    paths = world.client("a_member").get("/api/schema/", {"format": "json"}).json()["paths"]
    assert {"get", "post"} <= set(paths["/api/v1/volumes/"])
    for action in ("attach", "detach", "extend"):
        assert "post" in paths[f"/api/v1/volumes/{{id}}/{action}/"]
