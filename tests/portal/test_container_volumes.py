"""Container volumes through the API against FakeNodes: the real NodeService makes real ext4 files.

What crun does with them (loop mount, bind mount, owners, size, links) is
tests/compute/test_container_volumes.py; here the portal's rules: formats and
nodes, mount-path validation (400), stopped containers only (409), scoping,
one attachment at a time, survival of the container's deletion.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from portal.cloud.models import Instance
from portal.storage.models import Volume
from tests.hostcaps import require_binary
from tests.portal.conftest import FakeNodes, World
from tests.portal.test_flow import _dedicate_node_a, _launch

URL = "/api/v1/volumes/"


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_binary("mkfs.ext4")
    require_binary("qemu-img")


def _container(world: World, nodes: FakeNodes, name: str, stopped: bool = True) -> dict[str, Any]:
    inst = _launch(world, "a_member", "acme", name, image="busybox:1", kind="container")
    nodes.run()
    if stopped:
        _action(world, nodes, inst["id"], "stop")
    return dict(inst)


def _action(world: World, nodes: FakeNodes, iid: str, action: str) -> None:
    r = world.client("a_member").post(f"/api/v1/instances/{iid}/actions/", {"action": action}, format="json")
    assert r.status_code == 202, r.json()
    nodes.run()


def _ext4(world: World, nodes: FakeNodes, name: str = "data", size_gb: int = 1) -> dict[str, Any]:
    r = world.client("a_member").post(
        URL, {"name": name, "size_gb": size_gb, "format": "ext4"}, format="json"
    )
    assert r.status_code == 202 and r.json()["status"] == "creating", r.json()
    nodes.run()
    return dict(world.client("a_member").get(f"{URL}{r.json()['id']}/").json())


def _attach(world: World, vid: str, iid: str, mount_path: str | None = "/data") -> Any:
    body = {"instance": iid} if mount_path is None else {"instance": iid, "mount_path": mount_path}
    return world.client("a_member").post(f"{URL}{vid}/attach/", body, format="json")


def test_container_volume_attach_detach_survives_delete(world: World, nodes: FakeNodes) -> None:
    _dedicate_node_a(world)
    c = world.client("a_member")
    app, other = _container(world, nodes, "app"), _container(world, nodes, "other")
    vol = _ext4(world, nodes)
    # on the tenant's dedicated node (where its containers run), an ext4 file owned by its range
    assert (vol["status"], vol["format"], vol["node"], vol["attachments"]) == (
        "available",
        "ext4",
        "node-a",
        [],
    )
    path = Path(nodes.tmp) / "volumes" / f"{vol['id']}.ext4"
    out = subprocess.run(["debugfs", "-R", "stat /", str(path)], capture_output=True, text=True, check=True)
    assert f"User: {world.a.id_base}" in out.stdout
    r = _attach(world, vol["id"], app["id"])
    assert r.status_code == 202 and r.json()["status"] == "attaching"
    nodes.run()
    got = c.get(f"{URL}{vol['id']}/").json()
    assert got["status"] == "in-use"
    assert got["attachments"] == [
        {"instance": app["id"], "device": None, "mount_path": "/data", "status": "in-use"}
    ]
    assert nodes.service("node.node-a").report().attachments == ((vol["id"], app["id"]),)
    # one attachment at a time; a second volume may not hide the first
    assert _attach(world, vol["id"], other["id"]).status_code == 409
    vol2 = _ext4(world, nodes, "logs")
    for path_ in ("/data", "/data/sub"):
        r = _attach(world, vol2["id"], app["id"], path_)
        assert r.status_code == 400 and "overlaps volume data at /data" in r.json()["message"], r.json()
    assert _attach(world, vol2["id"], app["id"], "/var/log/app").status_code == 202
    nodes.run()
    # running: no hot detach (409), nothing sent
    _action(world, nodes, app["id"], "start")
    r = c.post(f"{URL}{vol['id']}/detach/")
    assert r.status_code == 409 and "stop it first" in r.json()["message"]
    _action(world, nodes, app["id"], "stop")
    assert c.post(f"{URL}{vol['id']}/detach/").json()["status"] == "detaching"
    nodes.run()
    got = c.get(f"{URL}{vol['id']}/").json()
    assert (got["status"], got["attachments"]) == ("available", [])
    assert Volume.objects.get(pk=vol["id"]).mount_path == ""
    # deleting the container leaves its volume, detached and whole
    assert c.delete(f"/api/v1/instances/{app['id']}/").status_code == 202
    nodes.run()
    got = c.get(f"{URL}{vol2['id']}/").json()
    assert (got["status"], got["attachments"]) == ("available", [])
    assert (Path(nodes.tmp) / "volumes" / f"{vol2['id']}.ext4").is_file()
    # and another container of the tenant takes it
    assert _attach(world, vol2["id"], other["id"], "/srv/logs").status_code == 202
    nodes.run()
    assert c.get(f"{URL}{vol2['id']}/").json()["attachments"][0]["mount_path"] == "/srv/logs"


def test_mount_paths_are_refused_with_400_and_nothing_changes(
    world: World, nodes: FakeNodes, sent: list[Any]
) -> None:
    _dedicate_node_a(world)
    app = _container(world, nodes, "app")
    vol = _ext4(world, nodes)
    for bad, why in (
        (None, "needs a mount_path such as /data"),
        ("", "may not be blank"),
        ("/", "may not be /"),
        ("data", "must be absolute"),
        ("/data/../etc", "may not contain '..'"),
        ("/data/", "is not normalised"),
        ("/proc", "is under /proc"),
        ("/proc/sys", "is under /proc"),
        ("/sys", "is under /sys"),
        ("/dev/shm", "is under /dev"),
        ("/etc", "would hide a system directory"),
        ("/usr", "would hide a system directory"),
        ("/etc/resolv.conf", "would hide a system directory"),
        ("/data,ro", "may not contain control characters, ',' or ':'"),
        ("/a" * 200, "no more than 255 characters"),
        (7, "Not a valid string"),
    ):
        r = _attach(world, vol["id"], app["id"], bad)  # type: ignore[arg-type]
        assert r.status_code == 400, (bad, r.json())
        assert why in str(r.json()), (bad, r.json())
    assert sent == [] and Volume.objects.get(pk=vol["id"]).status == "available"


def test_formats_nodes_states_and_tenants(world: World, nodes: FakeNodes, sent: list[Any]) -> None:
    c = world.client("a_member")
    # no dedicated node up yet: nowhere to put a container volume
    r = c.post(URL, {"name": "x", "size_gb": 1, "format": "ext4"}, format="json")
    assert r.status_code == 409 and "ext4 volumes are for containers" in r.json()["message"]
    r = c.post(URL, {"name": "x", "size_gb": 1, "format": "ext4", "node": "shared-1"}, format="json")
    assert r.status_code == 409 and "not dedicated to tenant acme" in r.json()["message"]
    r = c.post(URL, {"name": "x", "size_gb": 1, "format": "xfs"}, format="json")
    assert r.status_code == 400
    assert sent == [] and Volume.objects.count() == 0
    _dedicate_node_a(world)
    running = _container(world, nodes, "app", stopped=False)
    vol = _ext4(world, nodes)
    # a running container: no hot attach
    r = _attach(world, vol["id"], running["id"])
    assert r.status_code == 409 and "no hot attach" in r.json()["message"]
    _action(world, nodes, running["id"], "stop")
    # a qcow2 volume to a container, an ext4 volume to a VM: wrong format
    disk = c.post(URL, {"name": "disk", "size_gb": 1, "node": "node-a"}, format="json").json()
    nodes.run()
    r = _attach(world, disk["id"], running["id"])
    assert r.status_code == 409 and "containers mount ext4 volumes" in r.json()["message"]
    vm = _launch(world, "a_member", "acme", "vm1", image="tiny:1", kind="vm")
    nodes.run()
    Instance.objects.filter(pk=vm["id"]).update(node=world.node_a)
    r = _attach(world, vol["id"], vm["id"], None)
    assert r.status_code == 409 and "VMs take qcow2 volumes" in r.json()["message"]
    r = _attach(world, disk["id"], vm["id"], "/data")
    assert r.status_code == 400 and "mount_path applies to containers only" in r.json()["message"]
    # another tenant's container is not found; bob does not see acme's volume
    theirs = _launch(world, "b_member", "bobco", "theirs", image="tiny:1", kind="vm")
    Instance.objects.filter(pk=theirs["id"]).update(kind="container", vm_state="stopped", node=world.node_a)
    r = _attach(world, vol["id"], theirs["id"])
    assert r.status_code == 404
    bob = world.client("b_admin")
    assert bob.post(f"{URL}{vol['id']}/attach/", {"instance": theirs["id"]}).status_code == 404
    assert Volume.objects.get(pk=vol["id"]).status == "available"


def test_container_volumes_count_against_the_same_quota(world: World, nodes: FakeNodes) -> None:
    from portal.tenancy.models import Quota

    _dedicate_node_a(world)
    Quota.objects.filter(tenant=world.a).update(volumes=2, volume_gb=3)
    _ext4(world, nodes, "a", 2)
    c = world.client("a_member")
    r = c.post(URL, {"name": "b", "size_gb": 2, "format": "ext4"}, format="json")
    assert r.status_code == 409 and r.json()["code"] == "quota_exceeded"
    assert c.post(URL, {"name": "b", "size_gb": 1, "node": "shared-1"}, format="json").status_code == 202
    r = c.post(URL, {"name": "c", "size_gb": 1, "format": "ext4"}, format="json")
    assert r.status_code == 409 and "Quota exceeded for volumes" in r.json()["message"]


def _create(world: World, name: str, volumes: Any, kind: str = "container", who: str = "a_member") -> Any:
    body = {
        "tenant": "acme" if who.startswith("a_") else "bobco",
        "name": name,
        "image": "busybox:1",
        "flavor": world.flavor_public.pk,
        "kind": kind,
        "volumes": volumes,
    }
    return world.client(who).post("/api/v1/instances/", body, format="json")


def test_volumes_attached_at_create(world: World, nodes: FakeNodes, sent: list[Any]) -> None:
    _dedicate_node_a(world)
    c = world.client("a_member")
    vol, vol2 = _ext4(world, nodes), _ext4(world, nodes, "logs")
    live = Instance.objects.count()
    for bad, status, why in (
        ([{"volume": vol["id"], "mount_path": "/proc"}], 400, "is under /proc"),
        ([{"volume": vol["id"]}], 400, "mount_path"),
        (
            [{"volume": vol["id"], "mount_path": "/a"}, {"volume": vol2["id"], "mount_path": "/a/b"}],
            400,
            "overlap",
        ),
        (
            [{"volume": vol["id"], "mount_path": "/a"}, {"volume": vol["id"], "mount_path": "/b"}],
            400,
            "twice",
        ),
        ([{"volume": "6c5e4ef5-2330-4f56-95a7-7e0c55142669", "mount_path": "/a"}], 404, "No volume"),
    ):
        r = _create(world, "app", bad)
        assert r.status_code == status and why in str(r.json()), (bad, r.json())
    r = _create(world, "app", [{"volume": vol["id"], "mount_path": "/data"}], kind="vm")
    assert r.status_code == 400 and "containers only" in str(r.json())
    assert Instance.objects.count() == live and sent == []
    # created with both volumes: in-use at once, in the spec the node gets
    r = _create(
        world,
        "app",
        [{"volume": vol["id"], "mount_path": "/data"}, {"volume": vol2["id"], "mount_path": "/var/log/app"}],
    )
    assert r.status_code == 202, r.json()
    spec = sent[0][2][0]["spec"]
    assert spec["volumes"] == [
        {"volume_id": vol["id"], "mount_path": "/data"},
        {"volume_id": vol2["id"], "mount_path": "/var/log/app"},
    ]
    nodes.run()
    got = c.get(f"{URL}{vol['id']}/").json()
    assert got["status"] == "in-use" and got["attachments"][0]["mount_path"] == "/data"
    # taken: another create with it is 409 and makes nothing
    r = _create(world, "app2", [{"volume": vol["id"], "mount_path": "/data"}])
    assert r.status_code == 409 and "while it is in-use" in r.json()["message"]
    assert not Instance.objects.filter(name="app2").exists()
    # bob cannot name acme's volume
    r = _create(world, "theirs", [{"volume": vol2["id"], "mount_path": "/data"}], who="b_member")
    assert r.status_code == 404 and "No volume" in r.json()["message"]
    assert not Instance.objects.filter(name="theirs").exists()
    # deleting the container releases both
    app = Instance.objects.get(name="app")
    assert c.delete(f"/api/v1/instances/{app.pk}/").status_code == 202
    nodes.run()
    assert {v.status for v in Volume.objects.filter(pk__in=[vol["id"], vol2["id"]])} == {"available"}


def test_an_attach_the_node_refuses_leaves_the_volume_available(
    world: World, nodes: FakeNodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from compute.drivers.base import DriverError
    from compute.spec import Kind

    _dedicate_node_a(world)
    app = _container(world, nodes, "app")
    vol = _ext4(world, nodes)
    driver = nodes.service("node.node-a").driver(Kind.CONTAINER)

    def refused(*args: Any, **kw: Any) -> str:
        raise DriverError(
            "cannot mount a volume at /evil/x: /evil is a symbolic link in the container's file system"
        )

    monkeypatch.setattr(driver, "attach_volume", refused)
    before = Instance.objects.filter(pk=app["id"]).values("vm_state", "task_state", "power_state").get()
    assert _attach(world, vol["id"], app["id"], "/evil/x").status_code == 202
    nodes.run()
    got = world.client("a_member").get(f"{URL}{vol['id']}/").json()
    assert (got["status"], got["attachments"]) == ("available", [])
    assert got["status_reason"].startswith(
        "attach failed: cannot mount a volume at /evil/x: /evil is a symbolic"
    )
    assert Volume.objects.get(pk=vol["id"]).mount_path == ""
    after = Instance.objects.filter(pk=app["id"]).values("vm_state", "task_state", "power_state").get()
    assert after == before
