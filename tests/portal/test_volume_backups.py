"""Volume backups through the API against FakeNodes: real exports into the real blob store, real restores.

The nodes' HTTP to the portal goes through the test client (the ``wire``
fixture in conftest); the real round trip with sockets and real workers
is in tests/e2e/test_volume_move_multinode.py.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path
from typing import Any

from django.utils import timezone

from portal.audit.models import Event
from portal.cloud.models import ComputeNode
from portal.images.maintenance import collect_garbage
from portal.images.models import Blob
from portal.storage import backups
from portal.storage.models import Backup, BackupPolicy, Volume
from portal.tenancy.models import Quota
from tests.portal.conftest import UP_BOTH, FakeNodes, World
from tests.portal.test_flow import _dedicate_node_a, _launch
from tests.portal.test_volume_moves import _create, _file, _qemu_io, _tools  # noqa: F401 -- _tools: autouse

URL = "/api/v1/volumes/"


def _backup(world: World, nodes: FakeNodes, vid: str) -> dict[str, Any]:
    c = world.client("a_member")
    r = c.post(f"{URL}{vid}/backups/")
    assert r.status_code == 202 and r.json()["status"] == "creating", r.json()
    assert c.get(f"{URL}{vid}/").json()["status"] == "backing-up"
    nodes.run()
    got = c.get(f"{URL}{vid}/backups/{r.json()['id']}/").json()
    assert got["status"] == "available", got
    return dict(got)


def _blob_file(store: Path, digest: str) -> Path:
    return store / "blobs" / "sha256" / digest.removeprefix("sha256:")


def test_backup_dedupe_and_restore_to_a_new_volume(
    world: World, split: FakeNodes, wire: Any, store: Path
) -> None:
    nodes, c = split, world.client("a_member")
    vol = _create(world, nodes, {"name": "data", "node": "shared-1"})
    assert _qemu_io(_file(nodes, "shared-1", vol["id"]), "write -P 0x33 2M 512k").returncode == 0
    first = _backup(world, nodes, vol["id"])
    assert first["digest"].startswith("sha256:") and first["size_bytes"] > 512 << 10
    assert (first["volume"], first["volume_name"], first["format"], first["size_gb"], first["scheduled"]) == (
        vol["id"], "data", "qcow2", 1, False,
    )  # fmt: skip
    assert _blob_file(store, first["digest"]).stat().st_size == first["size_bytes"]
    assert c.get(f"{URL}{vol['id']}/").json()["status"] == "available"
    # unchanged content: a second backup shares the blob
    second = _backup(world, nodes, vol["id"])
    assert second["digest"] == first["digest"] and Blob.objects.filter(digest=first["digest"]).count() == 1
    assert [b["id"] for b in c.get(f"{URL}{vol['id']}/backups/").json()] == [second["id"], first["id"]]
    # the images' garbage collection keeps backup blobs
    assert collect_garbage(grace=0) == 0 and _blob_file(store, first["digest"]).is_file()
    # deleting one backup keeps the blob the other still uses
    assert c.delete(f"{URL}{vol['id']}/backups/{second['id']}/").status_code == 204
    assert _blob_file(store, first["digest"]).is_file()
    # restore to shared-2: a new volume with the content
    r = c.post(f"{URL}{vol['id']}/backups/{first['id']}/restore/", {"name": "again", "node": "shared-2"},
               format="json")  # fmt: skip
    assert r.status_code == 202 and r.json()["status"] == "creating", r.json()
    new = r.json()["id"]
    assert new != vol["id"]
    nodes.run()
    got = c.get(f"{URL}{new}/").json()
    assert (got["status"], got["node"], got["size_gb"], got["format"]) == (
        "available",
        "shared-2",
        1,
        "qcow2",
    )
    assert "read 524288/524288" in _qemu_io(_file(nodes, "shared-2", new), "read -P 0x33 2M 512k").stdout
    assert Event.objects.filter(action="dispatch.volume.restore", object_id=new).exists()
    # the backup outlives its volume, and still restores
    assert c.delete(f"{URL}{vol['id']}/").status_code == 202
    nodes.run()
    assert str(Backup.objects.get(pk=first["id"]).volume_id) == vol["id"]
    r = c.post(f"{URL}{vol['id']}/backups/{first['id']}/restore/", {"name": "third"}, format="json")
    assert r.status_code == 202, r.json()
    nodes.run()
    assert c.get(f"{URL}{r.json()['id']}/").json()["status"] == "available"
    # the last backup deleted: its blob goes
    assert c.delete(f"{URL}{vol['id']}/backups/{first['id']}/").status_code == 204
    assert not _blob_file(store, first["digest"]).exists() and not Blob.objects.exists()


def test_restore_is_quota_checked_and_refusals_change_nothing(
    world: World, split: FakeNodes, wire: Any
) -> None:
    nodes, c = split, world.client("a_member")
    vol = _create(world, nodes, {"name": "data", "node": "shared-1"})
    b = _backup(world, nodes, vol["id"])
    restore = f"{URL}{vol['id']}/backups/{b['id']}/restore/"
    Quota.objects.filter(tenant=world.a).update(volumes=1)
    r = c.post(restore, {"name": "again"}, format="json")
    assert r.status_code == 409 and r.json()["code"] == "quota_exceeded", r.json()
    Quota.objects.filter(tenant=world.a).update(volumes=10, volume_gb=1)
    r = c.post(restore, {"name": "again"}, format="json")
    assert r.status_code == 409 and "volume_gb" in r.json()["message"]
    Quota.objects.filter(tenant=world.a).update(volume_gb=100)
    assert c.post(restore, {"name": "data"}, format="json").status_code == 409  # name taken
    assert c.post(restore, {"name": "bad name!"}, format="json").status_code == 400
    r = c.post(restore, {"name": "x", "node": "nowhere"}, format="json")
    assert r.status_code == 400 and "No node named" in str(r.json())
    missing = f"{URL}{vol['id']}/backups/00000000-0000-4000-8000-000000000000/restore/"
    assert c.post(missing, {"name": "x"}, format="json").status_code == 404
    assert world.client("a_viewer").post(restore, {"name": "x"}, format="json").status_code == 403
    assert world.client("a_viewer").post(f"{URL}{vol['id']}/backups/").status_code == 403
    assert world.client("b_member").get(f"{URL}{vol['id']}/backups/").status_code == 404
    assert world.client("b_member").post(restore, {"name": "x"}, format="json").status_code == 404
    # attached: no backup (a running guest writes to it)
    vm = _launch(world, "a_member", "acme", "vm1", image="tiny:1", kind="vm")
    nodes.run()
    vol2 = _create(world, nodes, {"name": "disk", "node": vm["node"]})
    assert c.post(f"{URL}{vol2['id']}/attach/", {"instance": vm["id"]}, format="json").status_code == 202
    nodes.run()
    r = c.post(f"{URL}{vol2['id']}/backups/")
    assert r.status_code == 409 and "detach it first" in r.json()["message"]
    assert nodes.sent == []
    assert Volume.objects.live().count() == 2 and Backup.objects.count() == 1
    # policies: bad values 400, nothing stored
    bad = [
        {"interval_hours": 0, "retention": 1},
        {"interval_hours": 1, "retention": 0},
        {"retention": 2},
        {"interval_hours": "1", "retention": 1},
    ]
    for body in bad:
        assert c.post(f"{URL}{vol['id']}/backup-policy/", body, format="json").status_code == 400, body
    assert c.get(f"{URL}{vol['id']}/backup-policy/").status_code == 404
    assert not BackupPolicy.objects.exists()


def test_policy_tick_retention_and_skips(world: World, split: FakeNodes, wire: Any, store: Path) -> None:
    nodes, c = split, world.client("a_member")
    vol = _create(world, nodes, {"name": "data", "node": "shared-1"})
    r = c.post(f"{URL}{vol['id']}/backup-policy/", {"interval_hours": 6, "retention": 2}, format="json")
    assert r.status_code == 200 and r.json()["interval_hours"] == 6, r.json()
    assert c.get(f"{URL}{vol['id']}/").json()["backup_policy"]["retention"] == 2
    path = _file(nodes, "shared-1", vol["id"])
    digests = []
    now = timezone.now()
    for i in range(4):
        # new content each time, so each backup has a blob of its own
        assert _qemu_io(path, f"write -P {0x40 + i} 0 64k").returncode == 0
        when = now + dt.timedelta(hours=6 * i)
        assert backups.tick(when) == {"started": 1, "skipped": 0}
        Backup.objects.filter(status="creating").update(created_at=when)
        nodes.run()
        assert backups.tick(when + dt.timedelta(hours=5)) == {"started": 0, "skipped": 0}, "not due yet"
        digests.append(Backup.objects.get(created_at=when).blob_id)
    listed = c.get(f"{URL}{vol['id']}/backups/").json()
    assert [b["digest"] for b in listed] == [digests[3], digests[2]]
    assert all(b["scheduled"] and b["status"] == "available" for b in listed)
    assert len(set(digests)) == 4
    for gone in digests[:2]:
        assert not _blob_file(store, gone).exists() and not Blob.objects.filter(digest=gone).exists()
    assert Event.objects.filter(action="volume.backup.expire", object_id=vol["id"]).count() == 2
    # an attached volume is skipped, with the reason, and tried again at the next tick
    ComputeNode.objects.filter(name="shared-2").update(status="disabled")  # the VM goes to shared-1
    vm = _launch(world, "a_member", "acme", "vm1", image="tiny:1", kind="vm")
    nodes.run()
    assert c.post(f"{URL}{vol['id']}/attach/", {"instance": vm["id"]}, format="json").status_code == 202
    nodes.run()
    assert backups.tick(now + dt.timedelta(hours=48)) == {"started": 0, "skipped": 1}
    assert "detach it first" in BackupPolicy.objects.get().last_result
    assert c.post(f"{URL}{vol['id']}/detach/").status_code == 202
    nodes.run()
    assert backups.tick(now + dt.timedelta(hours=48)) == {"started": 1, "skipped": 0}
    nodes.run()
    assert len(c.get(f"{URL}{vol['id']}/backups/").json()) == 2


def test_failed_backup_is_error_with_reason(world: World, split: FakeNodes, wire: Any, settings: Any) -> None:
    nodes, c = split, world.client("a_member")
    vol = _create(world, nodes, {"name": "data", "node": "shared-1"})
    settings.SKYPORT_UPLOAD_MAX_BYTES = 1000
    r = c.post(f"{URL}{vol['id']}/backups/")
    assert r.status_code == 202
    nodes.run()
    got = c.get(f"{URL}{vol['id']}/backups/{r.json()['id']}/").json()
    assert got["status"] == "error" and "HTTP 413" in got["status_reason"] and got["digest"] is None
    assert c.get(f"{URL}{vol['id']}/").json()["status"] == "available"
    assert not Blob.objects.exists()
    r = c.post(f"{URL}{vol['id']}/backups/{got['id']}/restore/", {"name": "x"}, format="json")
    assert r.status_code == 409


def test_ext4_backup_restores_files_on_another_dedicated_node(
    world: World, split: FakeNodes, wire: Any, tmp_path: Path
) -> None:
    nodes, c = split, world.client("a_member")
    _dedicate_node_a(world)
    ComputeNode.objects.create(
        name="node-a2", queue="node.node-a2", tenancy="dedicated", owner=world.a, status="up",
        vcpus=8, ram_mb=8192, disk_gb=50, drivers=UP_BOTH,
    )  # fmt: skip
    vol = _create(world, nodes, {"name": "files", "format": "ext4", "node": "node-a"})
    (tmp_path / "note").write_text("kept by a backup\n")
    src = _file(nodes, "node-a", vol["id"], "ext4")
    subprocess.run(["debugfs", "-w", "-R", f"write {tmp_path / 'note'} note", str(src)], check=True,
                   capture_output=True)  # fmt: skip
    b = _backup(world, nodes, vol["id"])
    assert b["size_bytes"] < 64 << 20, "a sparse 1 GiB file system travels as a small qcow2"
    r = c.post(f"{URL}{vol['id']}/backups/{b['id']}/restore/", {"name": "copy", "node": "shared-1"},
               format="json")  # fmt: skip
    assert r.status_code == 409 and "not dedicated" in r.json()["message"]
    r = c.post(f"{URL}{vol['id']}/backups/{b['id']}/restore/", {"name": "copy", "node": "node-a2"},
               format="json")  # fmt: skip
    assert r.status_code == 202, r.json()
    nodes.run()
    got = c.get(f"{URL}{r.json()['id']}/").json()
    assert (got["status"], got["node"], got["format"]) == ("available", "node-a2", "ext4")
    dest = _file(nodes, "node-a2", got["id"], "ext4")
    out = subprocess.run(["debugfs", "-R", "cat note", str(dest)], capture_output=True, text=True, check=True)
    assert out.stdout == "kept by a backup\n"


def test_beat_runs_the_backup_tick(world: World, split: FakeNodes, wire: Any, settings: Any) -> None:
    from portal.storage.tasks import backup_tick

    entry = settings.CELERY_BEAT_SCHEDULE["backups"]
    assert entry["task"] == "portal.storage.backups" == backup_tick.name
    vol = _create(world, split, {"name": "data", "node": "shared-1"})
    world.client("a_member").post(
        f"{URL}{vol['id']}/backup-policy/", {"interval_hours": 24, "retention": 3}, format="json"
    )
    assert backup_tick() == {"started": 1, "skipped": 0}
    split.run()
    assert backup_tick() == {"started": 0, "skipped": 0}
    assert Backup.objects.get().status == "available"
