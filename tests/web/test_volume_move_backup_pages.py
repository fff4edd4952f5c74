"""The volume page's move and backups: the forms call the API's services (moves.move, backups.start /
set_policy / restore / delete), refusals show on the page with nothing changed, viewers see the lists
but no forms, another tenant gets 404.  The last test runs a move and a backup for real (FakeNodes:
real qemu-img exports into the real blob store) and reads the progress from the page."""

from __future__ import annotations

import re
from typing import Any

import pytest

from portal.cloud.models import ComputeNode
from portal.images.models import Blob
from portal.storage.models import Backup, BackupPolicy, Volume
from portal.tenancy.models import Quota
from tests.hostcaps import require_binary
from tests.portal.conftest import UP_BOTH, FakeNodes, World, split, store, wire  # noqa: F401
from tests.web.helpers import client, text


def _vol(world: World, name: str = "data", **kw: Any) -> Volume:
    return Volume.objects.create(
        tenant=world.a, name=name, size_gb=1, node=world.node_a, status="available", **kw
    )


def _backup(vol: Volume, status: str = "available", digest: str = "sha256:" + "ab" * 32) -> Backup:
    blob = None
    if status == "available":
        blob, _ = Blob.objects.get_or_create(
            digest=digest, defaults={"size": 5 << 20, "media_type": "application/vnd.skyport.volume.qcow2"}
        )
    return Backup.objects.create(
        tenant=vol.tenant,
        volume=vol,
        volume_name=vol.name,
        format=vol.format,
        size_gb=vol.size_gb,
        status=status,
        blob=blob,
        size_bytes=5 << 20 if blob else 0,
    )


def _nodes(world: World) -> None:
    """shared-1 (up) is where a volume of acme may go; node-b is dedicated to another tenant, shared-3
    is down: neither is offered."""
    ComputeNode.objects.create(
        name="node-b", queue="node.node-b", status="up", tenancy="dedicated", owner=world.b, drivers=UP_BOTH
    )
    ComputeNode.objects.create(name="shared-3", queue="node.shared-3", status="down", drivers=UP_BOTH)


def test_move_form_offers_allowed_nodes_and_starts_the_move(world: World, sent: list[Any]) -> None:
    _nodes(world)
    vol = _vol(world)
    c = client(world, "a_member")
    base = f"/volumes/{vol.pk}"
    page = text(c.get(f"{base}/"))
    options = re.findall(r'<option value="([^"]+)"', page.split('id="volume-move"')[1].split("</form>")[0])
    assert options == ["shared-1"]
    # a node not offered (another tenant's, down, the same) is refused before anything is sent
    for node in ("node-b", "shared-3", "node-a", "nowhere"):
        r = c.post(f"{base}/move/", {"node": node})
        assert r.status_code == 400 and f"Node {node} is not one this volume can move to." in text(r)
    # attached: the service's refusal, on the page, nothing changed
    Volume.objects.filter(pk=vol.pk).update(instance=world.instance_a, status="in-use", target="vdc")
    assert "No move now: volume data is attached" in text(c.get(f"{base}/"))
    r = c.post(f"{base}/move/", {"node": "shared-1"})
    assert r.status_code == 409 and "Volume data is attached; detach it before moving it." in text(r)
    assert Volume.objects.get(pk=vol.pk).status == "in-use" and sent == []
    Volume.objects.filter(pk=vol.pk).update(instance=None, status="available", target="")
    assert client(world, "a_viewer").post(f"{base}/move/", {"node": "shared-1"}).status_code == 403
    assert client(world, "b_admin").post(f"{base}/move/", {"node": "shared-1"}).status_code == 404
    assert sent == []
    r = c.post(f"{base}/move/", {"node": "shared-1"})
    assert r.status_code == 303
    assert sent[-1][1] == "compute.volume" and sent[-1][2][0]["op"] == "send"
    vol.refresh_from_db()
    assert (vol.status, vol.move_node.name if vol.move_node else None) == ("moving", "shared-1")
    # the page shows the phase and the bytes, and polls itself while it moves
    Volume.objects.filter(pk=vol.pk).update(move_phase="receive", move_done=3 << 20, move_total=8 << 20)
    page = text(c.get(f"{base}/"))
    assert 'data-field="move-phase">receive<' in page
    assert f'value="{3 << 20}" max="{8 << 20}"' in page and "3.0\xa0MB of 8.0\xa0MB" in page
    assert 'hx-select="#volume-move"' in page and "Move volume</button>" not in page
    # a second move while it moves: the claim refuses it
    r = c.post(f"{base}/move/", {"node": "shared-1"})
    assert r.status_code == 409 and "Cannot move volume data while it is moving" in text(r)


def test_backup_now_policy_restore_delete(world: World, sent: list[Any]) -> None:
    vol = _vol(world)
    c = client(world, "a_member")
    base = f"/volumes/{vol.pk}"
    page = text(c.get(f"{base}/"))
    assert "No backups." in page and "No scheduled backups." in page
    assert "disabled>Restore into a new volume…" in page
    # back up now: the same claim as the API
    r = c.post(f"{base}/backups/")
    assert r.status_code == 303 and sent[-1][2][0]["op"] == "send"
    made = Backup.objects.get(volume=vol)
    assert made.status == "creating" and Volume.objects.get(pk=vol.pk).status == "backing-up"
    r = c.post(f"{base}/backups/")
    assert r.status_code == 409 and "while it is backing-up" in text(r)
    assert Backup.objects.filter(volume=vol).count() == 1
    # a backup still being made cannot be deleted
    r = c.post(f"{base}/backups/{made.pk}/delete/")
    assert (
        r.status_code == 409 and "still being made" in text(r) and Backup.objects.filter(pk=made.pk).exists()
    )
    Volume.objects.filter(pk=vol.pk).update(status="available")
    Backup.objects.filter(pk=made.pk).update(status="error", status_reason="backup failed: disk full")
    good = _backup(vol)
    page = text(c.get(f"{base}/"))
    assert f'data-backup="{good.pk}"' in page and f'data-backup="{made.pk}"' in page
    assert 'data-bytes="5242880"' in page and "5.0\xa0MB" in page and "(backup failed: disk full)" in page
    # restore offers the available backup only
    restore_form = page.split('action="/volumes/')[-1]
    assert f'<option value="{good.pk}"' in restore_form and f'<option value="{made.pk}"' not in restore_form
    # policy: set, bad values refused, remove
    assert c.post(f"{base}/backup-policy/", {"interval_hours": 0, "retention": 3}).status_code == 400
    assert not BackupPolicy.objects.filter(volume=vol).exists()
    assert c.post(f"{base}/backup-policy/", {"interval_hours": 6, "retention": 3}).status_code == 303
    policy = BackupPolicy.objects.get(volume=vol)
    assert (policy.interval_hours, policy.retention) == (6, 3)
    page = text(c.get(f"{base}/"))
    assert "Every 6 h, keeping the newest 3." in page and 'value="6"' in page
    assert c.post(f"{base}/backup-policy/", {"remove": "1"}).status_code == 303
    assert not BackupPolicy.objects.filter(volume=vol).exists()
    # restore: asks first, refusals (quota, name taken, unknown node, unknown backup) change nothing
    before = Volume.objects.count()
    q = {"backup": str(good.pk), "name": "again"}
    r = c.get(f"{base}/restore/", q)
    assert r.status_code == 200 and "into a new volume again?" in text(r)
    assert Volume.objects.count() == before
    Quota.objects.filter(tenant=world.a).update(volumes=1)
    r = c.post(f"{base}/restore/", q)
    assert r.status_code == 409 and "quota" in text(r).lower()
    Quota.objects.filter(tenant=world.a).update(volumes=10, volume_gb=100)
    r = c.post(f"{base}/restore/", {**q, "name": "data"})
    assert r.status_code == 409 and Volume.objects.count() == before
    r = c.post(f"{base}/restore/", {**q, "node": "nowhere"})
    assert r.status_code == 400 and "No node named &#x27;nowhere&#x27;." in text(r)
    r = c.post(f"{base}/restore/", {**q, "backup": str(made.pk)})
    assert r.status_code == 400 and "No available backup" in text(r)
    assert Volume.objects.count() == before
    sent.clear()
    r = c.post(f"{base}/restore/", {**q, "node": "shared-1"})
    new = Volume.objects.get(tenant=world.a, name="again")
    assert r.status_code == 303 and r["Location"] == f"/volumes/{new.pk}/"
    assert new.node.name == "shared-1" and new.status == "creating"
    assert sent[-1][2][0]["digest"] == good.blob_id
    # delete asks, then removes the row (and its unshared blob)
    r = c.get(f"{base}/backups/{good.pk}/delete/")
    assert r.status_code == 200 and f"Delete the backup of {good.created_at:%Y-%m-%d %H:%M}" in text(r)
    assert c.post(f"{base}/backups/{good.pk}/delete/").status_code == 303
    assert (
        not Backup.objects.filter(pk=good.pk).exists() and not Blob.objects.filter(pk=good.blob_id).exists()
    )
    assert c.get(f"{base}/backups/{good.pk}/delete/").status_code == 404


def test_viewers_see_lists_without_forms_and_other_tenants_get_404(world: World, sent: list[Any]) -> None:
    vol = _vol(world)
    b = _backup(vol)
    BackupPolicy.objects.create(volume=vol, interval_hours=24, retention=7)
    base = f"/volumes/{vol.pk}"
    viewer = client(world, "a_viewer")
    page = text(viewer.get(f"{base}/"))
    assert f'data-backup="{b.pk}"' in page and "Every 24 h, keeping the newest 7." in page
    for absent in (
        "Back up now",
        "Move volume",
        "Restore into",
        "Set schedule",
        "Change schedule",
        "Delete…",
    ):
        assert absent not in page
    assert viewer.post(f"{base}/backups/").status_code == 403
    assert viewer.post(f"{base}/backup-policy/", {"remove": "1"}).status_code == 403
    assert viewer.post(f"{base}/restore/", {"backup": str(b.pk), "name": "x"}).status_code == 403
    assert viewer.post(f"{base}/backups/{b.pk}/delete/").status_code == 403
    bob = client(world, "b_admin")
    assert bob.get(f"{base}/").status_code == 404
    assert bob.post(f"{base}/backups/").status_code == 404
    assert bob.post(f"{base}/backup-policy/", {"interval_hours": 1, "retention": 1}).status_code == 404
    assert bob.get(f"{base}/restore/", {"backup": str(b.pk), "name": "x"}).status_code == 404
    assert bob.post(f"{base}/backups/{b.pk}/delete/").status_code == 404
    assert BackupPolicy.objects.filter(volume=vol).exists() and Backup.objects.filter(pk=b.pk).exists()
    assert sent == []


@pytest.mark.usefixtures("world", "split", "wire", "store")
def test_real_move_and_backup_from_the_page(world: World, nodes: FakeNodes) -> None:
    for tool in ("qemu-img", "qemu-io"):
        require_binary(tool)
    c = client(world, "a_member")
    r = world.client("a_member").post("/api/v1/volumes/", {"name": "data", "size_gb": 1, "node": "shared-1"})
    assert r.status_code == 202
    nodes.run()
    vid = r.json()["id"]
    base = f"/volumes/{vid}"
    # back up now, then the node exports into the store: the list shows it with its size
    assert c.post(f"{base}/backups/").status_code == 303
    nodes.run()
    b = Backup.objects.get(volume_id=vid)
    assert b.status == "available" and b.size_bytes > 0
    assert f'data-bytes="{b.size_bytes}"' in text(c.get(f"{base}/"))
    # move to shared-2: after the send the page shows the receive phase with the real total
    assert c.post(f"{base}/move/", {"node": "shared-2"}).status_code == 303
    queue, task, args = nodes.sent.pop(0)
    nodes.service(queue).handle(task, *args)
    vol = Volume.objects.get(pk=vid)
    assert vol.move_phase == "receive" and vol.move_total > 0
    page = text(c.get(f"{base}/"))
    assert 'data-field="move-phase">receive<' in page and f'data-total="{vol.move_total}"' in page
    nodes.run()
    vol.refresh_from_db()
    assert (vol.status, vol.node.name) == ("available", "shared-2")
    assert "Moving to" not in text(c.get(f"{base}/"))


def test_volume_page_queries_do_not_grow_with_backups_or_nodes(world: World) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    vol = _vol(world)
    c = client(world, "a_admin")
    c.get(f"/volumes/{vol.pk}/")

    def count() -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert c.get(f"/volumes/{vol.pk}/").status_code == 200
        return len(ctx.captured_queries)

    _backup(vol)
    few = count()
    for i in range(5):
        _backup(vol, digest="sha256:" + f"{i:02d}" * 32)
    _nodes(world)
    many = count()
    assert many == few and many <= 12, many
