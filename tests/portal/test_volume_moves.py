"""Moving a volume between nodes through the API against FakeNodes (each node its own directory).

The nodes run the real NodeService: real ``qemu-img convert`` exports and
imports, real ext4 files; their HTTP calls to the portal (the PUT of the
content, the GET of the blob with the node key) go through Django's test
client instead of a socket.  The real sockets, two real workers in network
namespaces: tests/e2e/test_volume_move_multinode.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client

from compute import transfer
from portal.audit.models import Event
from portal.cloud.models import ComputeNode
from portal.images.maintenance import collect_garbage
from portal.images.models import Blob
from portal.storage import moves
from portal.storage.models import Volume
from tests.hostcaps import require_binary
from tests.portal.conftest import UP_BOTH, FakeNodes, World
from tests.portal.test_flow import _dedicate_node_a, _launch

URL = "/api/v1/volumes/"


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("qemu-img", "qemu-io", "mkfs.ext4", "debugfs", "e2fsck"):
        require_binary(tool)


def _file(nodes: FakeNodes, node: str, vid: str, fmt: str = "qcow2") -> Path:
    return Path(nodes.tmp) / node / "volumes" / f"{vid}.{fmt}"


def _create(world: World, nodes: FakeNodes, body: dict[str, Any]) -> dict[str, Any]:
    r = world.client("a_member").post(URL, {"size_gb": 1, **body}, format="json")
    assert r.status_code == 202, r.json()
    nodes.run()
    got = world.client("a_member").get(f"{URL}{r.json()['id']}/").json()
    assert got["status"] == "available", got
    return dict(got)


def _step(nodes: FakeNodes) -> str:
    """Deliver one message the portal sent; returns its op."""
    queue, task, args = nodes.sent.pop(0)
    nodes.service(queue).handle(task, *args)
    return str(args[0].get("op", task))


def _qemu_io(path: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, str(path)], capture_output=True, text=True, check=False
    )


def test_move_qcow2_with_progress_then_source_dropped(
    world: World, split: FakeNodes, wire: list[tuple[str, int, int]], store: Path
) -> None:
    nodes, c = split, world.client("a_member")
    vol = _create(world, nodes, {"name": "data", "node": "shared-1"})
    src = _file(nodes, "shared-1", vol["id"])
    assert _qemu_io(src, "write -P 0x5a 1M 256k").returncode == 0
    r = c.post(f"{URL}{vol['id']}/move/", {"node": "shared-2"}, format="json")
    assert r.status_code == 202, r.json()
    assert (r.json()["status"], r.json()["node"], r.json()["move"]) == (
        "moving",
        "shared-1",
        {"node": "shared-2", "phase": "send", "done_bytes": 0, "total_bytes": 0},
    )
    # an attach or delete while it moves is refused
    vm = _launch(world, "a_member", "acme", "vm1", image="tiny:1", kind="vm")
    assert c.post(f"{URL}{vol['id']}/attach/", {"instance": vm["id"]}, format="json").status_code == 409
    assert c.delete(f"{URL}{vol['id']}/").status_code == 409
    assert c.post(f"{URL}{vol['id']}/move/", {"node": "shared-2"}, format="json").status_code == 409
    nodes.sent[:] = [m for m in nodes.sent if m[2][0].get("op") == "send"]  # the VM's create is not needed
    # 1. the source sends: the portal holds the content, the target is asked to receive it
    assert _step(nodes) == "send"
    got = c.get(f"{URL}{vol['id']}/").json()
    size = got["move"]["total_bytes"]
    assert got["status"] == "moving" and got["move"]["phase"] == "receive" and size > 256 << 10
    sends = [w for w in wire if w[0] == "send"]
    assert sends and sends[-1] == ("send", size, size) and len(sends) <= 2  # bounded: ≤ 1/s + the last
    digest = Volume.objects.get(pk=vol["id"]).move_digest
    assert (store / "blobs" / "sha256" / digest.removeprefix("sha256:")).is_file()
    assert collect_garbage(grace=0) == 0, "a move's blob is held while the move runs"
    assert src.is_file()
    # 2. the target receives and verifies; 3. the source drops its copy
    assert _step(nodes) == "receive"
    got = c.get(f"{URL}{vol['id']}/").json()
    assert (got["status"], got["node"], got["move"], got["status_reason"]) == (
        "available",
        "shared-2",
        None,
        "",
    )
    assert wire[-1] == ("receive", size, size)
    dest = _file(nodes, "shared-2", vol["id"])
    assert _qemu_io(dest, "read -P 0x5a 1M 256k").returncode == 0
    assert "read 262144/262144" in _qemu_io(dest, "read -P 0x5a 1M 256k").stdout
    assert src.is_file(), "the source copy stays until the drop"
    assert _step(nodes) == "drop"
    assert not src.exists()
    assert not Blob.objects.filter(digest=digest).exists()
    assert not (store / "blobs" / "sha256" / digest.removeprefix("sha256:")).exists()
    actions = list(Event.objects.filter(object_id=vol["id"]).values_list("action", flat=True))
    for action in ("dispatch.volume.move", "node.volume.send", "node.volume.move", "node.volume.drop"):
        assert action in actions
    # attachable on its new node
    ComputeNode.objects.filter(name="shared-1").update(status="disabled")
    vm2 = _launch(world, "a_member", "acme", "vm2", image="tiny:1", kind="vm")
    nodes.run()
    assert vm2["node"] == "shared-2"
    assert c.post(f"{URL}{vol['id']}/attach/", {"instance": vm2["id"]}, format="json").status_code == 202
    nodes.run()
    assert c.get(f"{URL}{vol['id']}/").json()["status"] == "in-use"


def test_move_ext4_keeps_files_and_owners(world: World, split: FakeNodes, wire: Any, tmp_path: Path) -> None:
    nodes, c = split, world.client("a_member")
    _dedicate_node_a(world)
    ComputeNode.objects.create(
        name="node-a2", queue="node.node-a2", tenancy="dedicated", owner=world.a, status="up",
        vcpus=8, ram_mb=8192, disk_gb=50, drivers=UP_BOTH,
    )  # fmt: skip
    vol = _create(world, nodes, {"name": "files", "format": "ext4", "node": "node-a"})
    src = _file(nodes, "node-a", vol["id"], "ext4")
    (tmp_path / "hello").write_text("written on node-a\n")
    subprocess.run(
        ["debugfs", "-w", "-R", f"write {tmp_path / 'hello'} hello", str(src)],
        check=True,
        capture_output=True,
    )
    assert c.post(f"{URL}{vol['id']}/move/", {"node": "node-a2"}, format="json").status_code == 202
    nodes.run()
    got = c.get(f"{URL}{vol['id']}/").json()
    assert (got["status"], got["node"], got["format"]) == ("available", "node-a2", "ext4")
    dest = _file(nodes, "node-a2", vol["id"], "ext4")
    assert not src.exists() and dest.stat().st_size == 1 << 30
    assert dest.stat().st_blocks * 512 < 64 << 20, "sparse again on the target"
    cat = subprocess.run(
        ["debugfs", "-R", "cat hello", str(dest)], capture_output=True, text=True, check=True
    )
    assert cat.stdout == "written on node-a\n"
    root = subprocess.run(["debugfs", "-R", "stat /", str(dest)], capture_output=True, text=True, check=True)
    assert f"User: {world.a.id_base}" in root.stdout


def test_move_refusals_change_nothing(world: World, split: FakeNodes, wire: Any) -> None:
    nodes, c = split, world.client("a_member")
    _dedicate_node_a(world)
    vol = _create(world, nodes, {"name": "data", "node": "shared-1"})
    ext = _create(world, nodes, {"name": "files", "format": "ext4", "node": "node-a"})
    ComputeNode.objects.create(name="down-1", queue="node.down-1", status="down", drivers=UP_BOTH)
    ComputeNode.objects.create(
        name="bob-1", queue="node.bob-1", status="up", tenancy="dedicated", owner=world.b, drivers=UP_BOTH
    )
    cases = [
        (vol, {"node": "shared-1"}, 409, "already"),
        (vol, {"node": "nowhere"}, 400, "No node named"),
        (vol, {"node": "down-1"}, 409, "is down"),
        (vol, {"node": "bob-1"}, 409, "dedicated to another tenant"),
        (ext, {"node": "shared-2"}, 409, "not dedicated to tenant acme"),
        (vol, {}, 400, "required"),
        (vol, {"node": 7}, 400, "string"),
    ]
    for v, body, code, words in cases:
        r = c.post(f"{URL}{v['id']}/move/", body, format="json")
        assert r.status_code == code, (body, r.json())
        assert words in str(r.json()), (body, r.json())
    # attached: detach first
    ComputeNode.objects.filter(name="shared-2").update(status="disabled")
    vm = _launch(world, "a_member", "acme", "vm1", image="tiny:1", kind="vm")
    ComputeNode.objects.filter(name="shared-2").update(status="up")
    nodes.run()
    assert c.post(f"{URL}{vol['id']}/attach/", {"instance": vm["id"]}, format="json").status_code == 202
    nodes.run()
    r = c.post(f"{URL}{vol['id']}/move/", {"node": "shared-2"}, format="json")
    assert r.status_code == 409 and "detach it before moving" in r.json()["message"]
    # a viewer may not, another tenant does not see it
    r = world.client("a_viewer").post(f"{URL}{ext['id']}/move/", {"node": "shared-1"}, format="json")
    assert r.status_code == 403
    r = world.client("b_member").post(f"{URL}{ext['id']}/move/", {"node": "shared-1"}, format="json")
    assert r.status_code == 404
    assert nodes.sent == []
    assert sorted(Volume.objects.values_list("name", "status", "node__name", "status_reason")) == [
        ("data", "in-use", "shared-1", ""),
        ("files", "available", "node-a", ""),
    ]
    # an operator moves a tenant's volume under the same rules
    r = world.client("operator").post(f"{URL}{ext['id']}/move/", {"node": "shared-2"}, format="json")
    assert r.status_code == 409


def test_failed_upload_leaves_the_volume_on_its_source(
    world: World, split: FakeNodes, wire: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes, c = split, world.client("a_member")
    vol = _create(world, nodes, {"name": "data", "node": "shared-1"})
    monkeypatch.setattr(settings, "SKYPORT_UPLOAD_MAX_BYTES", 1000)  # the portal refuses the body
    assert c.post(f"{URL}{vol['id']}/move/", {"node": "shared-2"}, format="json").status_code == 202
    nodes.run()
    got = c.get(f"{URL}{vol['id']}/").json()
    assert (got["status"], got["node"], got["move"]) == ("available", "shared-1", None)
    assert got["status_reason"].startswith("move to shared-2 failed (send on shared-1): PUT ")
    assert "HTTP 413" in got["status_reason"]
    assert _file(nodes, "shared-1", vol["id"]).is_file()
    assert not _file(nodes, "shared-2", vol["id"]).exists()
    assert Blob.objects.count() == 0


def test_corrupted_blob_fails_the_receive_and_keeps_the_source(
    world: World, split: FakeNodes, wire: Any, store: Path
) -> None:
    nodes, c = split, world.client("a_member")
    vol = _create(world, nodes, {"name": "data", "node": "shared-1"})
    assert c.post(f"{URL}{vol['id']}/move/", {"node": "shared-2"}, format="json").status_code == 202
    assert _step(nodes) == "send"
    digest = Volume.objects.get(pk=vol["id"]).move_digest
    blob = store / "blobs" / "sha256" / digest.removeprefix("sha256:")
    with blob.open("r+b") as fh:  # a bit flips in the portal's store
        fh.seek(100)
        fh.write(b"\xff")
    assert _step(nodes) == "receive"
    got = c.get(f"{URL}{vol['id']}/").json()
    assert (got["status"], got["node"]) == ("available", "shared-1")
    assert (
        "failed (receive on shared-2)" in got["status_reason"]
        and f"does not match {digest}" in got["status_reason"]
    )
    assert nodes.sent == [], "no drop: the source copy is the volume"
    assert _file(nodes, "shared-1", vol["id"]).is_file()
    assert not _file(nodes, "shared-2", vol["id"]).exists()
    assert list((Path(nodes.tmp) / "shared-2" / "exports").iterdir()) == []
    assert not Blob.objects.filter(digest=digest).exists() and not blob.exists()
    # and it moves fine afterwards
    assert c.post(f"{URL}{vol['id']}/move/", {"node": "shared-2"}, format="json").status_code == 202
    nodes.run()
    assert c.get(f"{URL}{vol['id']}/").json()["node"] == "shared-2"


def test_stale_and_forged_transfers_are_refused(world: World, split: FakeNodes, wire: Any) -> None:
    nodes, c = split, world.client("a_member")
    vol = _create(world, nodes, {"name": "data", "node": "shared-1"})
    other = _create(world, nodes, {"name": "other", "node": "shared-1"})
    assert c.post(f"{URL}{vol['id']}/move/", {"node": "shared-2"}, format="json").status_code == 202
    token = moves.transfer_token(Volume.objects.get(pk=vol["id"]))
    anon = Client()
    r = anon.put(f"{URL}{other['id']}/content", data=b"x", content_type="application/octet-stream",
                 HTTP_AUTHORIZATION=f"Upload {token}")  # fmt: skip
    assert r.status_code == 403
    r = anon.put(f"{URL}{vol['id']}/content", data=b"x", content_type="application/octet-stream")
    assert r.status_code == 401
    r = anon.put(f"{URL}{vol['id']}/content", data=b"x", content_type="application/octet-stream",
                 HTTP_AUTHORIZATION=f"Upload {token}x")  # fmt: skip
    assert r.status_code == 401
    nodes.run()
    assert c.get(f"{URL}{vol['id']}/").json()["node"] == "shared-2"
    # the finished move's token is spent
    r = anon.put(f"{URL}{vol['id']}/content", data=b"x", content_type="application/octet-stream",
                 HTTP_AUTHORIZATION=f"Upload {token}")  # fmt: skip
    assert r.status_code == 409


def test_progress_messages_are_bounded() -> None:
    reports: list[tuple[int, int]] = []
    throttle = transfer.Throttle(lambda d, t: reports.append((d, t)), 10_000 * 4096, every=3600)
    for _ in range(10_000):
        throttle.add(4096)
    assert reports == [(4096, 40_960_000), (40_960_000, 40_960_000)]


def test_a_drop_delivered_again_after_a_move_back_keeps_the_new_copy(
    world: World, split: FakeNodes, wire: Any
) -> None:
    nodes, c = split, world.client("a_member")
    vol = _create(world, nodes, {"name": "data", "node": "shared-1"})
    assert c.post(f"{URL}{vol['id']}/move/", {"node": "shared-2"}, format="json").status_code == 202
    assert [_step(nodes), _step(nodes)] == ["send", "receive"]
    drop = nodes.sent[0]
    assert _step(nodes) == "drop" and not _file(nodes, "shared-1", vol["id"]).exists()
    # moved back: shared-1 holds the volume again, under the new move's stamp
    assert c.post(f"{URL}{vol['id']}/move/", {"node": "shared-1"}, format="json").status_code == 202
    nodes.run()
    assert c.get(f"{URL}{vol['id']}/").json()["node"] == "shared-1"
    assert _file(nodes, "shared-1", vol["id"]).is_file() and not _file(nodes, "shared-2", vol["id"]).exists()
    # the first move's drop, delivered again (a worker died before acking it): the copy is kept
    nodes.sent.append(drop)
    assert _step(nodes) == "drop"
    assert _file(nodes, "shared-1", vol["id"]).is_file()
    event = Event.objects.filter(action="node.volume.drop", object_id=vol["id"]).order_by("-id").first()
    assert event is not None and event.outcome == "failure" and "kept" in event.message
    assert c.get(f"{URL}{vol['id']}/").json()["status"] == "available"
