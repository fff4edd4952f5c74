"""Volume snapshots through the API against FakeNodes: the real NodeService, real qemu-img and mkfs.ext4.

The rules: list, take, revert and delete with the states of instance
snapshots; a clash is 409, an unknown snapshot 404, another tenant's volume
404, a volume in use (attached to a running instance, attached at all for a
revert, a snapshot request already in flight) 409 — each before anything is
written or sent.  The data is checked too: what was written before the
snapshot is back after the revert.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from portal.storage.models import Volume, VolumeSnapshot
from tests.hostcaps import require_binary
from tests.portal.conftest import FakeNodes, World
from tests.portal.test_container_volumes import _action as _instance_action
from tests.portal.test_container_volumes import _attach, _container, _ext4
from tests.portal.test_flow import _dedicate_node_a
from tests.portal.test_volumes import _file, _vm, _volume

URL = "/api/v1/volumes/"


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_binary("qemu-img")
    require_binary("qemu-io")
    require_binary("mkfs.ext4")
    require_binary("debugfs")


def _snap(world: World, vid: str, name: str, who: str = "a_member") -> Any:
    return world.client(who).post(f"{URL}{vid}/snapshots/", {"name": name}, format="json")


def _list(world: World, vid: str) -> list[dict[str, Any]]:
    r = world.client("a_member").get(f"{URL}{vid}/snapshots/")
    assert r.status_code == 200, r.json()
    return list(r.json())


def _pattern(path: Path, byte: int) -> bool:
    out = subprocess.run(
        ["qemu-io", "-c", f"read -P {byte:#x} 0 1M", str(path)], capture_output=True, text=True
    )
    return out.returncode == 0 and "Pattern verification failed" not in out.stdout + out.stderr


def test_qcow2_volume_snapshot_list_revert_delete(world: World, nodes: FakeNodes, sent: list[Any]) -> None:
    c = world.client("a_member")
    vol = _volume(world, nodes)
    vid, path = vol["id"], _file(nodes, vol["id"])
    subprocess.run(["qemu-io", "-c", "write -P 0xab 0 1M", str(path)], check=True, capture_output=True)
    r = _snap(world, vid, "before")
    assert r.status_code == 202 and r.json()["status"] == "creating", r.json()
    # while the node works: no second request on the volume, nor a volume request
    assert _snap(world, vid, "other").status_code == 409
    r = c.delete(f"{URL}{vid}/")
    assert r.status_code == 409 and "snapshot of volume data is in progress" in r.json()["message"]
    assert c.post(f"{URL}{vid}/extend/", {"size_gb": 2}, format="json").status_code == 409
    nodes.run()
    (before,) = _list(world, vid)
    assert (before["name"], before["status"], before["volume_id"]) == ("before", "available", vid)
    assert 1 << 20 <= before["size_bytes"] < 2 << 20 and before["taken_at"]
    # a clash is 409, bad names 400, and nothing is sent
    n = len(sent)
    r = _snap(world, vid, "before")
    assert r.status_code == 409 and "already has a snapshot 'before'" in r.json()["message"]
    for bad in ("Before", "-x", "a/b", "", "x" * 64):
        assert _snap(world, vid, bad).status_code == 400, bad
    assert c.post(f"{URL}{vid}/snapshots/", {}, format="json").status_code == 400
    # unknown snapshots: 404 naming the ones there are
    r = c.post(f"{URL}{vid}/snapshots/nope/revert/")
    assert r.status_code == 404 and "its snapshots: before" in r.json()["message"]
    assert c.delete(f"{URL}{vid}/snapshots/nope/").status_code == 404
    assert c.get(f"{URL}{vid}/snapshots/nope/").status_code == 404
    assert len(sent) == n
    # change the data, take a second one, revert to the first: the first data is back
    subprocess.run(["qemu-io", "-c", "write -P 0xcd 0 1M", str(path)], check=True, capture_output=True)
    assert _snap(world, vid, "after").status_code == 202
    nodes.run()
    r = c.post(f"{URL}{vid}/snapshots/before/revert/")
    assert r.status_code == 202 and r.json()["status"] == "reverting"
    nodes.run()
    assert _pattern(path, 0xAB)
    assert [(s["name"], s["status"]) for s in _list(world, vid)] == [
        ("before", "available"),
        ("after", "available"),
    ]
    assert c.get(f"{URL}{vid}/").json()["status"] == "available"
    # delete one: deleting until the node reports, then gone
    r = c.delete(f"{URL}{vid}/snapshots/after/")
    assert r.status_code == 202 and r.json()["status"] == "deleting"
    nodes.run()
    assert [s["name"] for s in _list(world, vid)] == ["before"]
    # deleting the volume takes its snapshots with it
    assert c.delete(f"{URL}{vid}/").status_code == 202
    nodes.run()
    assert not VolumeSnapshot.objects.filter(volume_id=vid).exists()


def test_attached_volumes_another_tenant_and_node_failures(
    world: World, nodes: FakeNodes, sent: list[Any]
) -> None:
    c = world.client("a_member")
    vm = _vm(world, nodes, "vm1")
    vol = _volume(world, nodes)
    vid = vol["id"]
    assert _snap(world, vid, "s1").status_code == 202
    nodes.run()
    assert c.post(f"{URL}{vid}/attach/", {"instance": vm["id"]}, format="json").status_code == 202
    nodes.run()
    n = len(sent)
    # attached to a running VM: no snapshot on its own (the instance snapshot includes it), no revert
    r = _snap(world, vid, "s2")
    assert r.status_code == 409 and "snapshot the instance instead" in r.json()["message"], r.json()
    r = c.post(f"{URL}{vid}/snapshots/s1/revert/")
    assert r.status_code == 409 and "reverted only while detached" in r.json()["message"]
    assert c.delete(f"{URL}{vid}/snapshots/s1/").status_code == 409
    assert len(sent) == n and [s["status"] for s in _list(world, vid)] == ["available"]
    # stopped: a snapshot may be taken, still no revert while attached
    _instance_action(world, nodes, vm["id"], "stop")
    assert _snap(world, vid, "s2").status_code == 202
    nodes.run()
    assert [s["name"] for s in _list(world, vid)] == ["s1", "s2"]
    assert c.post(f"{URL}{vid}/snapshots/s1/revert/").status_code == 409
    # another tenant sees none of it
    bob = world.client("b_member")
    assert bob.get(f"{URL}{vid}/snapshots/").status_code == 404
    assert _snap(world, vid, "x", who="b_member").status_code == 404
    assert bob.post(f"{URL}{vid}/snapshots/s1/revert/").status_code == 404
    assert bob.delete(f"{URL}{vid}/snapshots/s1/").status_code == 404
    # the node fails (file gone): the row goes, the volume says why
    assert c.post(f"{URL}{vid}/detach/").status_code == 202
    nodes.run()
    _file(nodes, vid).unlink()
    assert _snap(world, vid, "s3").status_code == 202
    nodes.run()
    assert [s["name"] for s in _list(world, vid)] == ["s1", "s2"]
    got = Volume.objects.get(pk=vid)
    assert got.status == "available" and got.status_reason.startswith("snapshot failed: volume ")


def _debugfs(path: Path, request: str, write: bool = False) -> str:
    argv = ["debugfs", *(["-w"] if write else []), "-R", request, str(path)]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def test_ext4_volume_snapshot_and_revert_with_its_container(
    world: World, nodes: FakeNodes, tmp_path: Path
) -> None:
    c = world.client("a_member")
    _dedicate_node_a(world)
    app = _container(world, nodes, "app")  # stopped
    vol = _ext4(world, nodes)
    vid = vol["id"]
    path = Path(nodes.tmp) / "volumes" / f"{vid}.ext4"
    (tmp_path / "v1").write_text("first\n")
    _debugfs(path, f"write {tmp_path / 'v1'} hello", write=True)
    assert _attach(world, vid, app["id"]).status_code == 202
    nodes.run()
    # attached to a stopped container: a snapshot may be taken
    assert _snap(world, vid, "s1").status_code == 202
    nodes.run()
    (s1,) = _list(world, vid)
    assert s1["status"] == "available" and 0 < s1["size_bytes"] < 64 << 20
    # running: refused, nothing sent
    _instance_action(world, nodes, app["id"], "start")
    r = _snap(world, vid, "s2")
    assert r.status_code == 409 and "stop it first" in r.json()["message"]
    _instance_action(world, nodes, app["id"], "stop")
    assert c.post(f"{URL}{vid}/detach/").status_code == 202
    nodes.run()
    _debugfs(path, "rm hello", write=True)
    assert (
        "File not found"
        in subprocess.run(["debugfs", "-R", "cat hello", str(path)], capture_output=True, text=True).stderr
    )
    assert c.post(f"{URL}{vid}/snapshots/s1/revert/").status_code == 202
    nodes.run()
    assert _debugfs(path, "cat hello") == "first\n"
    assert [s["status"] for s in _list(world, vid)] == ["available"]
