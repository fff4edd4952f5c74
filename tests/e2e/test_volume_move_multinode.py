"""A volume moves between two real compute workers, through the portal, with its data.

The three "hosts" of ``test_multinode`` (network namespaces joined by an
underlay, a real compute worker in each, the portal's HTTP server on the
underlay address; h1 and h2 dedicated to acme).  A busybox container of acme
on h1 writes a file and 96 MiB of random bytes into an ext4 volume (real
loop mount, the container's own root); the container is deleted, the volume
is moved to h2 over real HTTP (h1 PUTs the export with its one-move token,
h2 GETs the blob with its node key), the test watches the progress in the
API, then reads the file back on h2 from the volume file itself (``debugfs``,
no mount), checks the random bytes by digest, and reads the file again inside
a container on h2 that mounts the moved volume.  h1's copy is gone, and so is
the transfer blob.  Then a backup of the volume on h2 goes into the portal's
blob store, the volume is deleted, and the backup is restored into a new
volume on h1 whose files are checked the same way.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from portal.cloud.models import ComputeNode
from portal.images.models import Blob
from portal.tenancy.models import Tenant
from tests.e2e import test_multinode as mn
from tests.e2e.test_end_to_end import Stack, _client, wait_for
from tests.e2e.test_multinode import _container_pid, cluster  # noqa: F401 -- cluster is a fixture
from tests.hostcaps import require_binary

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.host, pytest.mark.slow]

#: an underlay of this test's own (the other multinode tests use 198.19.0.0/24 and 198.19.9.0/24)
UNDERLAY_HOST = "198.18.223.1"
HOSTS = {"h1": "198.18.223.11", "h2": "198.18.223.12", "h3": "198.18.223.13"}


def test_ext4_volume_moves_from_h1_to_h2_then_backup_restores_it_on_h1(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_binary("debugfs")
    monkeypatch.setattr(mn, "UNDERLAY_HOST", UNDERLAY_HOST)
    monkeypatch.setattr(mn, "HOSTS", HOSTS)
    stack, _underlay, nodes = request.getfixturevalue("cluster")
    try:
        _scenario(stack, nodes)
    except BaseException:
        print(stack.logs())
        raise


def _debugfs(path: Path, command: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["debugfs", "-R", command, str(path)], capture_output=True, check=True, timeout=60)


def _scenario(stack: Stack, nodes: dict[str, str]) -> None:
    base = stack.base
    version = mn.seed_tenants_and_busybox()
    op = _client("vm-operator", None, staff=True)
    acme = _client("vm-acme", "acme")
    wait_for(
        "three nodes up with a healthy container driver",
        lambda: (
            ComputeNode.objects.filter(
                name__in=nodes.values(), status="up", drivers__container__ok=True
            ).count()
            == 3
        ),
        timeout=90,
    )
    mn.dedicate(op, nodes)
    flavor = op.get("/api/v1/flavors/", {"name": "m1.tiny"}).json()["results"][0]["id"]

    def volume(vid: str) -> dict[str, Any]:
        return acme.get(f"/api/v1/volumes/{vid}/").json()  # type: ignore[no-any-return]

    # 1. an ext4 volume on h1, written by a container's root through the real loop mount
    r = acme.post(
        "/api/v1/volumes/",
        {"tenant": "acme", "name": "files", "size_gb": 1, "format": "ext4", "node": nodes["h1"]},
        format="json",
    )
    assert r.status_code == 202, r.json()
    vid = r.json()["id"]
    wait_for("the volume on h1", lambda: volume(vid)["status"] == "available", timeout=60)
    script = (
        "echo moved-across-nodes > /data/hello && "
        "dd if=/dev/urandom of=/data/random bs=1M count=96 2>/dev/null && sync && sleep 3600"
    )
    body = {
        "tenant": "acme", "name": "writer", "image": f"busybox:{version}", "flavor": flavor,
        "kind": "container", "command": ["sh", "-c", script],
        "volumes": [{"volume": vid, "mount_path": "/data"}],
    }  # fmt: skip
    r = acme.post("/api/v1/instances/", body, format="json")
    assert r.status_code == 202, r.json()
    iid = r.json()["id"]

    def instance() -> dict[str, Any]:
        return acme.get(f"/api/v1/instances/{iid}/").json()  # type: ignore[no-any-return]

    wait_for("the writer running on h1", lambda: instance()["vm_state"] == "active", timeout=120)
    assert instance()["node"] == nodes["h1"]
    src = base / nodes["h1"] / "volumes" / f"{vid}.ext4"
    wait_for(
        "the container to write its 96 MiB",
        lambda: b"100663296" in subprocess.run(
            ["debugfs", "-R", "stat random", str(src)], capture_output=True, timeout=60
        ).stdout,
        timeout=60,
    )  # fmt: skip
    assert acme.delete(f"/api/v1/instances/{iid}/").status_code == 202
    wait_for("the writer deleted", lambda: instance()["vm_state"] == "deleted", timeout=60)
    wait_for("the volume released", lambda: volume(vid)["status"] == "available", timeout=30)
    expected = _debugfs(src, "cat random").stdout
    assert len(expected) == 96 << 20
    digest = hashlib.sha256(expected).hexdigest()

    # 2. refusals first: nothing changes
    r = acme.post(f"/api/v1/volumes/{vid}/move/", {"node": nodes["h3"]}, format="json")
    assert r.status_code == 409 and "dedicated to another tenant" in r.json()["message"], r.json()
    assert acme.post(f"/api/v1/volumes/{vid}/move/", {"node": nodes["h1"]}, format="json").status_code == 409

    # the bare tools for comparison: export to qcow2 and back to a sparse raw file, no network
    bare0 = time.monotonic()
    for argv in (
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(base / "bare.qcow2")],
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(base / "bare.qcow2"), str(base / "bare.raw")],
    ):
        subprocess.run(argv, check=True, capture_output=True, timeout=120)
    bare = time.monotonic() - bare0
    (base / "bare.qcow2").unlink()
    (base / "bare.raw").unlink()

    # 3. the move, watched through the API
    load = Path("/proc/loadavg").read_text().split()[:3]
    t0 = time.monotonic()
    r = acme.post(f"/api/v1/volumes/{vid}/move/", {"node": nodes["h2"]}, format="json")
    assert r.status_code == 202 and r.json()["status"] == "moving", r.json()
    seen: list[tuple[str, int, int]] = []
    while True:
        got = volume(vid)
        if got["status"] != "moving":
            break
        m = got["move"]
        step = (m["phase"], m["done_bytes"], m["total_bytes"])
        if not seen or seen[-1] != step:
            seen.append(step)
        assert time.monotonic() - t0 < 180, f"still moving: {got}"
        time.sleep(0.1)
    took = time.monotonic() - t0
    assert (got["status"], got["node"], got["status_reason"]) == ("available", nodes["h2"], ""), got
    sent = [s for s in seen if s[0] == "send" and s[2]]
    assert sent or any(s[0] == "receive" for s in seen), seen
    total = max(s[2] for s in seen)
    assert total > 96 << 20, seen  # the export carries the random bytes (they do not compress)
    print(
        f"volume move h1 -> h2: {total} bytes of qcow2 in {took:.2f} s (bare qemu-img export + import "
        f"{bare:.2f} s, ratio {took / bare:.1f}), progress seen in GET: {seen}; loadavg {' '.join(load)}"
    )

    # 4. on h2, the same files; h1's copy and the transfer blob are gone
    dest = base / nodes["h2"] / "volumes" / f"{vid}.ext4"
    assert _debugfs(dest, "cat hello").stdout == b"moved-across-nodes\n"
    assert hashlib.sha256(_debugfs(dest, "cat random").stdout).hexdigest() == digest
    id_base = Tenant.objects.get(slug="acme").id_base
    assert f"User: {id_base}".encode() in _debugfs(dest, "stat hello").stdout
    wait_for("h1 to drop its copy", lambda: not src.exists(), timeout=30)
    assert not Blob.objects.filter(media_type="application/vnd.skyport.volume.qcow2").exists()

    # 5. a container on h2 mounts it and reads the file
    body = {
        "tenant": "acme", "name": "reader", "image": f"busybox:{version}", "flavor": flavor,
        "kind": "container", "command": ["sleep", "3600"],
        "volumes": [{"volume": vid, "mount_path": "/data"}],
    }  # fmt: skip
    r = acme.post("/api/v1/instances/", body, format="json")
    assert r.status_code == 202, r.json()
    iid = r.json()["id"]
    wait_for("the reader running on h2", lambda: instance()["vm_state"] == "active", timeout=120)
    assert instance()["node"] == nodes["h2"]

    pid = _container_pid(base, nodes["h2"], iid)  # read it inside the container's mount namespace
    seen_inside = subprocess.run(
        ["nsenter", "-t", str(pid), "-m", "cat", "/data/hello"], capture_output=True, check=True, timeout=30
    ).stdout
    assert seen_inside == b"moved-across-nodes\n"
    assert acme.delete(f"/api/v1/instances/{iid}/").status_code == 202
    wait_for("the reader deleted", lambda: instance()["vm_state"] == "deleted", timeout=60)
    wait_for("the volume released", lambda: volume(vid)["status"] == "available", timeout=30)

    # 6. a backup on h2 into the portal's blob store, the volume deleted, restored onto h1
    t0 = time.monotonic()
    r = acme.post(f"/api/v1/volumes/{vid}/backups/")
    assert r.status_code == 202, r.json()
    bid = r.json()["id"]

    def backup() -> dict[str, Any]:
        return acme.get(f"/api/v1/volumes/{vid}/backups/{bid}/").json()  # type: ignore[no-any-return]

    done = wait_for("the backup", lambda: backup() if backup()["status"] != "creating" else None, timeout=120)
    backup_s = time.monotonic() - t0
    assert done["status"] == "available", done
    blob = Blob.objects.get(digest=done["digest"])
    assert blob.size == done["size_bytes"] > 96 << 20
    assert acme.delete(f"/api/v1/volumes/{vid}/").status_code == 202
    wait_for("the volume deleted", lambda: volume(vid)["status"] == "deleted", timeout=30)
    assert not dest.exists()
    t0 = time.monotonic()
    body = {"name": "restored", "node": nodes["h1"]}
    r = acme.post(f"/api/v1/volumes/{vid}/backups/{bid}/restore/", body, format="json")
    assert r.status_code == 202, r.json()
    rid = r.json()["id"]
    wait_for("the restored volume", lambda: volume(rid)["status"] != "creating", timeout=120)
    restore_s = time.monotonic() - t0
    got = volume(rid)
    assert (got["status"], got["node"], got["format"]) == ("available", nodes["h1"], "ext4"), got
    restored = base / nodes["h1"] / "volumes" / f"{rid}.ext4"
    assert _debugfs(restored, "cat hello").stdout == b"moved-across-nodes\n"
    assert hashlib.sha256(_debugfs(restored, "cat random").stdout).hexdigest() == digest
    print(
        f"volume backup on h2: {done['size_bytes']} bytes in {backup_s:.2f} s; restore onto h1 "
        f"{restore_s:.2f} s; loadavg {' '.join(Path('/proc/loadavg').read_text().split()[:3])}"
    )
    assert acme.delete(f"/api/v1/volumes/{vid}/backups/{bid}/").status_code == 204
    assert not Blob.objects.filter(digest=done["digest"]).exists()
    assert acme.delete(f"/api/v1/volumes/{rid}/").status_code == 202
    wait_for("the restored volume deleted", lambda: volume(rid)["status"] == "deleted", timeout=30)
    assert not restored.exists()
    connection.close()
