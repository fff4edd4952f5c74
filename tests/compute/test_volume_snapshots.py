"""Volume snapshots for real: qcow2 internal snapshots with qemu-img, ext4 sparse copies.

Data is written into each volume, a snapshot taken, the data changed, the
volume reverted and the first data read back: qcow2 through ``qemu-io``
(patterns at offsets), ext4 through a loop mount as root.  A volume in use is
refused (a qcow2 write lock held by another QEMU process, an ext4 file that
backs a loop device), and the snapshots libvirt writes into an attached
volume when its VM is snapshotted are neither listed nor touched.  The node's
task answers with the volume's whole list.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from compute.config import NodeConfig
from compute.spec import ID_RANGE_MIN, Task, VolumeFormat, VolumeOp, VolumeRequest, from_json, to_json
from compute.spec import VolumeObservation as Obs
from compute.tasks import NodeService
from compute.volumes import VolumeError, VolumeStore
from tests.hostcaps import require_binary, require_root

OWNER = ID_RANGE_MIN + 3 * 65536


def _io(path: Path, command: str) -> str:
    out = subprocess.run(["qemu-io", "-c", command, str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _pattern_is(path: Path, byte: int, length: str = "4M") -> bool:
    """True when the first ``length`` of the qcow2 disk all hold ``byte`` (qemu-io's read -P)."""
    out = subprocess.run(
        ["qemu-io", "-c", f"read -P {byte:#x} 0 {length}", str(path)], capture_output=True, text=True
    )
    return "Pattern verification failed" not in out.stdout + out.stderr and out.returncode == 0


def test_qcow2_volume_snapshot_revert_delete_keeps_data(tmp_path: Path) -> None:
    require_binary("qemu-img")
    require_binary("qemu-io")
    store = VolumeStore(tmp_path / "volumes")
    vid = str(uuid.uuid4())
    store.create(vid, 1)
    path = store.path(vid)
    _io(path, "write -P 0xab 0 4M")
    first = store.snapshot(vid, "before")
    assert first.name == "before"
    assert 4 << 20 <= first.size_bytes < 6 << 20  # the 4 MiB it holds plus qcow2 metadata
    assert abs(first.created_at - time.time()) < 60
    assert store.snapshot(vid, "before") == first  # redelivered: kept, not taken twice
    _io(path, "write -P 0xcd 0 4M")
    _io(path, "write -P 0xee 8M 8M")
    second = store.snapshot(vid, "after")
    assert 12 << 20 <= second.size_bytes < 14 << 20  # 4 MiB rewritten + 8 MiB more: 12 MiB of data
    assert [s.name for s in store.snapshots(vid)] == ["before", "after"]

    store.revert(vid, "before")
    assert _pattern_is(path, 0xAB)
    assert _pattern_is(path, 0xCD) is False
    store.revert(vid, "after")
    assert _pattern_is(path, 0xCD)
    # grown after the snapshots: a revert keeps the new size (volumes never shrink), data as taken
    assert store.grow(vid, 2) == 2 << 30
    store.revert(vid, "before")
    assert store.size(vid) == 2 << 30 and _pattern_is(path, 0xAB)
    store.revert(vid, "after")
    with pytest.raises(VolumeError, match="no snapshot 'gone'"):
        store.revert(vid, "gone")

    # what libvirt writes into an attached volume when its VM is snapshotted: not a volume snapshot
    subprocess.run(["qemu-img", "snapshot", "-c", "vm-snap", str(path)], check=True)
    assert [s.name for s in store.snapshots(vid)] == ["before", "after"]
    store.delete_snapshot(vid, "vm-snap")  # not ours: nothing happens
    store.delete_snapshot(vid, "before")
    store.delete_snapshot(vid, "before")  # already gone: fine
    tags = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True,
                                     text=True, check=True).stdout)["snapshots"]  # fmt: skip
    assert sorted(t["name"] for t in tags) == ["vm-snap", "vs:after"]


def test_qcow2_volume_held_by_another_qemu_is_refused(tmp_path: Path) -> None:
    require_binary("qemu-io")
    store = VolumeStore(tmp_path / "volumes")
    vid = str(uuid.uuid4())
    store.create(vid, 1)
    path = store.path(vid)
    store.snapshot(vid, "s1")
    holder = subprocess.Popen(["qemu-io", "-c", "sleep 4000", str(path)])  # holds the write lock as QEMU
    try:
        time.sleep(0.5)
        with pytest.raises(VolumeError, match="lock"):
            store.snapshot(vid, "s2")
        with pytest.raises(VolumeError, match="lock"):
            store.revert(vid, "s1")
    finally:
        holder.wait(timeout=30)
    assert [s.name for s in store.snapshots(vid)] == ["s1"]


def _mount(path: Path, mnt: Path) -> None:
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(path), str(mnt)], check=True)


def _umount(mnt: Path) -> None:
    subprocess.run(["umount", str(mnt)], check=True)


def test_ext4_volume_snapshot_revert_delete_keeps_data(tmp_path: Path) -> None:
    require_root()
    require_binary("mkfs.ext4")
    store = VolumeStore(tmp_path / "volumes")
    vid = str(uuid.uuid4())
    store.create(vid, 1, VolumeFormat.EXT4, OWNER)
    path, mnt = store.path(vid), tmp_path / "mnt"
    _mount(path, mnt)
    try:
        (mnt / "hello").write_text("first\n")
        subprocess.run(["dd", "if=/dev/urandom", f"of={mnt / 'blob'}", "bs=1M", "count=8"], check=True,
                       capture_output=True)  # fmt: skip
        with pytest.raises(VolumeError, match="mounted by a running container"):
            store.snapshot(vid, "s1")  # the file backs a loop device
    finally:
        _umount(mnt)
    assert store.snapshots(vid) == []
    snap = store.snapshot(vid, "s1")
    copy = tmp_path / "volumes" / "snapshots" / vid / "s1.ext4"
    assert copy.stat().st_size == path.stat().st_size == 1 << 30
    # sparse: the copy holds the 8 MiB written plus the file system's metadata, not 1 GiB
    assert snap.size_bytes == copy.stat().st_blocks * 512
    assert 8 << 20 < snap.size_bytes < 128 << 20

    _mount(path, mnt)
    try:
        (mnt / "hello").write_text("second\n")
        (mnt / "blob").unlink()
        (mnt / "new").write_text("x")
    finally:
        _umount(mnt)
    store.grow(vid, 2)  # grown after the snapshot: the revert keeps the size
    store.revert(vid, "s1")
    assert path.stat().st_size == 2 << 30
    _mount(path, mnt)
    try:
        assert os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize > 1 << 30  # the file system too
        assert (mnt / "hello").read_text() == "first\n"
        assert (mnt / "blob").stat().st_size == 8 << 20
        assert not (mnt / "new").exists()
        assert mnt.stat().st_uid == OWNER  # the root directory still belongs to the tenant's root
    finally:
        _umount(mnt)
    assert path.stat().st_mode & 0o777 == 0o600
    assert [s.name for s in store.snapshots(vid)] == ["s1"]  # a revert keeps the snapshot
    store.delete_snapshot(vid, "s1")
    assert store.snapshots(vid) == [] and not copy.exists()
    store.snapshot(vid, "s2")
    store.delete(vid)  # the volume's snapshots go with it
    assert not (tmp_path / "volumes" / "snapshots" / vid).exists()


def test_the_node_task_answers_with_the_volume_list(tmp_path: Path) -> None:
    require_binary("qemu-img")
    sent: list[tuple[str, dict[str, Any]]] = []
    cfg = NodeConfig("n1", tmp_path, "test:///default", "qemu", "crun", "memory://")
    svc = NodeService(cfg, lambda n, p: sent.append((n, p)), {})
    vid = str(uuid.uuid4())

    def ask(op: VolumeOp, **kw: Any) -> Obs:
        svc.handle(Task.VOLUME, to_json(VolumeRequest(vid, op, uuid.uuid4().hex, **kw)))
        task, payload = sent.pop()
        assert task == Task.OBSERVE_VOLUME
        return from_json(Obs, payload)

    assert ask(VolumeOp.CREATE, size_gb=1).ok
    obs = ask(VolumeOp.SNAPSHOT, snapshot="one")
    assert obs.ok and obs.snapshots is not None and [s.name for s in obs.snapshots] == ["one"]
    assert obs.snapshots[0].size_bytes > 0
    obs = ask(VolumeOp.REVERT, snapshot="two")
    assert not obs.ok and "no snapshot 'two'" in obs.message
    assert obs.snapshots is not None and [s.name for s in obs.snapshots] == ["one"]
    obs = ask(VolumeOp.DELETE_SNAPSHOT, snapshot="one")
    assert obs.ok and obs.snapshots == ()
    # the contract refuses a snapshot op without a name and a name where none belongs
    with pytest.raises(ValueError, match="snapshot names"):
        VolumeRequest(vid, VolumeOp.SNAPSHOT, "a")
    with pytest.raises(ValueError, match="snapshot names"):
        VolumeRequest(vid, VolumeOp.DELETE, "a", snapshot="x")
    with pytest.raises(ValueError, match="not a snapshot name"):
        VolumeRequest(vid, VolumeOp.SNAPSHOT, "a", snapshot="../x")
