"""Backups of a VM's root disk through the API against FakeNodes (portal/storage/backups.py).

The node half is the real ``NodeService.send_disk`` over the fake VM driver
(its export is a real, empty 8 MiB qcow2) PUT to the portal's real
``/api/v1/instances/<id>/backup-content`` (``node_uploads``); the restore is
the volume backups' real one into a qcow2 volume file (``wire``).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path
from typing import Any

from django.test import Client
from django.utils import timezone

from portal.audit.models import Event
from portal.cloud.models import Instance
from portal.cloud.tasks import sweep
from portal.images.models import Blob
from portal.storage import backups
from portal.storage.models import Backup, Volume
from portal.tenancy.models import Quota
from tests.portal.conftest import FakeNodes, World
from tests.portal.test_flow import _dedicate_node_a, _launch
from tests.portal.test_volume_moves import _file, _tools  # noqa: F401 -- _tools: autouse

URL = "/api/v1/instances/"


def _stopped_vm(world: World, nodes: FakeNodes, name: str = "vm1") -> dict[str, Any]:
    vm = _launch(world, "a_member", "acme", name, image="tiny:1", kind="vm")
    nodes.run()
    c = world.client("a_member")
    assert c.post(f"{URL}{vm['id']}/actions/", {"action": "stop"}, format="json").status_code == 202
    nodes.run()
    got = c.get(f"{URL}{vm['id']}/").json()
    assert (got["vm_state"], got["task_state"]) == ("stopped", None), got
    return dict(got)


def _blob_file(store: Path, digest: str) -> Path:
    return store / "blobs" / "sha256" / digest.removeprefix("sha256:")


def test_vm_disk_backup_dedupe_restore_and_delete(
    world: World, split: FakeNodes, wire: Any, node_uploads: list[str], store: Path
) -> None:
    nodes, c = split, world.client("a_member")
    vm = _stopped_vm(world, nodes)
    r = c.post(f"{URL}{vm['id']}/backups/")
    assert r.status_code == 202 and r.json()["status"] == "creating", r.json()
    assert c.get(f"{URL}{vm['id']}/").json()["task_state"] == "backing_up"
    # busy: a start and a second backup wait
    assert c.post(f"{URL}{vm['id']}/actions/", {"action": "start"}, format="json").status_code == 409
    assert c.post(f"{URL}{vm['id']}/backups/").status_code == 409
    nodes.run()
    assert node_uploads == [f"/api/v1/instances/{vm['id']}/backup-content"]
    first = c.get(f"{URL}{vm['id']}/backups/{r.json()['id']}/").json()
    assert (first["status"], first["instance"], first["volume"], first["volume_name"]) == (
        "available",
        vm["id"],
        None,
        "vm1",
    ), first
    assert (first["format"], first["size_gb"]) == ("qcow2", 1)
    assert first["digest"].startswith("sha256:") and first["finished_at"]
    blob = _blob_file(store, first["digest"])
    assert blob.stat().st_size == first["size_bytes"] > 0
    inst = c.get(f"{URL}{vm['id']}/").json()
    assert (inst["vm_state"], inst["task_state"]) == ("stopped", None)
    # the same disk again: one blob for both
    r = c.post(f"{URL}{vm['id']}/backups/")
    nodes.run()
    second = c.get(f"{URL}{vm['id']}/backups/{r.json()['id']}/").json()
    assert second["digest"] == first["digest"] and Blob.objects.count() == 1
    assert [b["id"] for b in c.get(f"{URL}{vm['id']}/backups/").json()] == [second["id"], first["id"]]
    assert Event.objects.filter(action="instance.backup", object_id=vm["id"]).count() >= 4
    # restore into a new qcow2 volume on shared-2: the volume file is the flattened disk
    r = c.post(
        f"{URL}{vm['id']}/backups/{first['id']}/restore/",
        {"name": "rootcopy", "node": "shared-2"},
        format="json",
    )
    assert r.status_code == 202 and r.json()["status"] == "creating", r.json()
    nodes.run()
    vol = c.get(f"/api/v1/volumes/{r.json()['id']}/").json()
    assert (vol["status"], vol["node"], vol["format"], vol["size_gb"]) == (
        "available",
        "shared-2",
        "qcow2",
        1,
    )
    path = _file(nodes, "shared-2", vol["id"])
    same = subprocess.run(["qemu-img", "compare", str(blob), str(path)], capture_output=True, text=True)
    assert same.returncode == 0, same.stdout + same.stderr
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                                     capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert info["format"] == "qcow2" and info["virtual-size"] == 8 << 20
    # the volume backups' own list does not show it
    assert c.get(f"/api/v1/volumes/{vol['id']}/backups/").json() == []
    # one backup deleted: the blob stays for the other; the last one takes it along
    assert c.delete(f"{URL}{vm['id']}/backups/{second['id']}/").status_code == 204
    assert blob.is_file()
    # the backups outlive the instance and still restore
    assert c.delete(f"{URL}{vm['id']}/").status_code == 202
    nodes.run()
    assert Instance.objects.get(pk=vm["id"]).vm_state == "deleted"
    r = c.post(f"{URL}{vm['id']}/backups/{first['id']}/restore/", {"name": "later"}, format="json")
    assert r.status_code == 202, r.json()
    nodes.run()
    assert c.get(f"/api/v1/volumes/{r.json()['id']}/").json()["status"] == "available"
    assert c.delete(f"{URL}{vm['id']}/backups/{first['id']}/").status_code == 204
    assert not blob.exists() and not Blob.objects.exists()


def test_refusals_change_nothing(
    world: World, split: FakeNodes, wire: Any, node_uploads: list[str], store: Path
) -> None:
    nodes, c = split, world.client("a_member")
    # a running VM: 409, stop it first
    vm = _launch(world, "a_member", "acme", "vm1", image="tiny:1", kind="vm")
    nodes.run()
    r = c.post(f"{URL}{vm['id']}/backups/")
    assert r.status_code == 409 and "stop it first" in r.json()["message"], r.json()
    assert nodes.sent == [] and not Backup.objects.exists()
    assert Instance.objects.get(pk=vm["id"]).task_state is None
    # a container: its data lives in volumes
    _dedicate_node_a(world)
    ct = _launch(world, "a_member", "acme", "ct1", kind="container")
    nodes.run()
    r = c.post(f"{URL}{ct['id']}/backups/")
    assert r.status_code == 409 and "volumes" in r.json()["message"], r.json()
    assert nodes.sent == [] and not Backup.objects.exists()
    # another tenant: 404; a viewer: 403
    stopped = _stopped_vm(world, nodes, "vm2")
    assert world.client("b_member").post(f"{URL}{stopped['id']}/backups/").status_code == 404
    assert world.client("b_member").get(f"{URL}{stopped['id']}/backups/").status_code == 404
    assert world.client("a_viewer").post(f"{URL}{stopped['id']}/backups/").status_code == 403
    assert not Backup.objects.exists()
    r = c.post(f"{URL}{stopped['id']}/backups/")
    assert r.status_code == 202
    nodes.run()
    bid = r.json()["id"]
    restore = f"{URL}{stopped['id']}/backups/{bid}/restore/"
    assert world.client("b_member").post(restore, {"name": "x"}, format="json").status_code == 404
    assert world.client("b_member").get(f"{URL}{stopped['id']}/backups/{bid}/").status_code == 404
    # a backup of this VM is not reachable through another VM's path
    assert c.get(f"{URL}{vm['id']}/backups/{bid}/").status_code == 404
    # quota on restore: 409, nothing made
    before = Volume.objects.count()
    Quota.objects.filter(tenant=world.a).update(volumes=0)
    r = c.post(restore, {"name": "again"}, format="json")
    assert r.status_code == 409 and r.json()["code"] == "quota_exceeded", r.json()
    Quota.objects.filter(tenant=world.a).update(volumes=10, volume_gb=0)
    r = c.post(restore, {"name": "again"}, format="json")
    assert r.status_code == 409 and "volume_gb" in r.json()["message"], r.json()
    Quota.objects.filter(tenant=world.a).update(volume_gb=100)
    assert c.post(restore, {"name": "bad name!"}, format="json").status_code == 400
    r = c.post(restore, {"name": "x", "node": "nowhere"}, format="json")
    assert r.status_code == 400 and "No node named" in str(r.json())
    missing = f"{URL}{stopped['id']}/backups/00000000-0000-4000-8000-000000000000/restore/"
    assert c.post(missing, {"name": "x"}, format="json").status_code == 404
    malformed = f"{URL}{stopped['id']}/backups/{'-' * 36}/"
    assert (
        c.get(malformed).status_code == 404
        and c.post(f"{malformed}restore/", {"name": "x"}).status_code == 404
    )
    assert Volume.objects.count() == before and nodes.sent == []


def test_failed_upload_and_timeout_leave_the_vm_stopped(
    world: World, split: FakeNodes, wire: Any, node_uploads: list[str], store: Path, settings: Any
) -> None:
    nodes, c = split, world.client("a_member")
    vm = _stopped_vm(world, nodes)
    settings.SKYPORT_UPLOAD_MAX_BYTES = 1000
    r = c.post(f"{URL}{vm['id']}/backups/")
    nodes.run()
    got = c.get(f"{URL}{vm['id']}/backups/{r.json()['id']}/").json()
    assert got["status"] == "error" and "413" in got["status_reason"] and got["digest"] is None, got
    inst = c.get(f"{URL}{vm['id']}/").json()
    assert (inst["vm_state"], inst["task_state"]) == ("stopped", None)
    assert not Blob.objects.exists()
    r = c.post(f"{URL}{vm['id']}/backups/{got['id']}/restore/", {"name": "x"}, format="json")
    assert r.status_code == 409
    # a node that never answers: the sweeper fails the backup, the VM stays stopped
    r = c.post(f"{URL}{vm['id']}/backups/")
    nodes.sent.clear()
    assert sweep(timezone.now() + dt.timedelta(hours=2))["stuck"] >= 1
    got = c.get(f"{URL}{vm['id']}/backups/{r.json()['id']}/").json()
    assert got["status"] == "error" and "in time" in got["status_reason"], got
    inst = c.get(f"{URL}{vm['id']}/").json()
    assert (inst["vm_state"], inst["task_state"]) == ("stopped", None), inst
    # a forged token 401; a token of another instance 403; a spent one 409
    raw, target = Client(), f"{URL}{vm['id']}/backup-content"
    assert (
        raw.put(target, b"x", "application/octet-stream", HTTP_AUTHORIZATION="Upload no").status_code == 401
    )
    other = _stopped_vm(world, nodes, "vm2")
    inst = Instance.objects.get(pk=vm["id"])
    token = backups.instance_token(inst, r.json()["id"])
    put = raw.put(f"{URL}{other['id']}/backup-content", b"x", "application/octet-stream",
                  HTTP_AUTHORIZATION=f"Upload {token}")  # fmt: skip
    assert put.status_code == 403
    put = raw.put(target, b"x", "application/octet-stream", HTTP_AUTHORIZATION=f"Upload {token}")
    assert put.status_code == 409 and not Blob.objects.exists()


def test_policy_ticks_retention_and_skips_a_running_vm(
    world: World, split: FakeNodes, wire: Any, node_uploads: list[str], store: Path
) -> None:
    nodes, c = split, world.client("a_member")
    vm = _stopped_vm(world, nodes)
    policy = f"{URL}{vm['id']}/backup-policy/"
    assert c.get(policy).status_code == 404
    for bad in (
        {"interval_hours": 0, "retention": 1},
        {"interval_hours": 1, "retention": 0},
        {"retention": 2},
    ):
        assert c.post(policy, bad, format="json").status_code == 400, bad
    assert (
        world.client("a_viewer")
        .post(policy, {"interval_hours": 6, "retention": 2}, format="json")
        .status_code
        == 403
    )
    assert world.client("b_member").get(policy).status_code == 404
    r = c.post(policy, {"interval_hours": 6, "retention": 2}, format="json")
    assert r.status_code == 200 and r.json()["retention"] == 2, r.json()
    now = timezone.now()
    for i in range(3):
        when = now + dt.timedelta(hours=6 * i)
        assert backups.tick(when) == {"started": 1, "skipped": 0}
        Backup.objects.filter(status="creating").update(created_at=when)
        nodes.run()
        assert backups.tick(when + dt.timedelta(hours=5)) == {"started": 0, "skipped": 0}, "not due yet"
    listed = c.get(f"{URL}{vm['id']}/backups/").json()
    assert len(listed) == 2 and all(b["scheduled"] and b["status"] == "available" for b in listed), listed
    assert Event.objects.filter(action="instance.backup.expire", object_id=vm["id"]).count() == 1
    assert Blob.objects.count() == 1  # the fake disk is the same each time: one blob, still used
    # a running VM is skipped with the reason, and backed up at a later tick once stopped
    assert c.post(f"{URL}{vm['id']}/actions/", {"action": "start"}, format="json").status_code == 202
    nodes.run()
    later = now + dt.timedelta(hours=48)
    assert backups.tick(later) == {"started": 0, "skipped": 1}
    assert "stop it first" in c.get(policy).json()["last_result"]
    assert c.post(f"{URL}{vm['id']}/actions/", {"action": "stop"}, format="json").status_code == 202
    nodes.run()
    assert backups.tick(later) == {"started": 1, "skipped": 0}
    nodes.run()
    assert len(c.get(f"{URL}{vm['id']}/backups/").json()) == 2
    # DELETE stops it; the backups stay
    assert c.delete(policy).status_code == 204 and c.get(policy).status_code == 404
    assert backups.tick(later + dt.timedelta(hours=48)) == {"started": 0, "skipped": 0}
    assert Backup.objects.filter(instance_id=vm["id"]).count() == 2
    # a container gets no policy
    _dedicate_node_a(world)
    ct = _launch(world, "a_member", "acme", "ct1", kind="container")
    nodes.run()
    r = c.post(f"{URL}{ct['id']}/backup-policy/", {"interval_hours": 6, "retention": 2}, format="json")
    assert r.status_code == 409 and "volumes" in r.json()["message"]
