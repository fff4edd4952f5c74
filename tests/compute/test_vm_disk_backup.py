"""A VM root-disk backup's node halves, for real: libvirtd (TCG), qemu-img, HTTP on loopback.

A booted sample VM is stopped; ``send_disk`` (the one a portal backup asks
for) flattens and PUTs its disk to the loopback stand-in of the portal's
store (``Blobs`` of test_vm_migration), and the volume restore's
``transfer.receive`` fetches that blob, checks its digest and makes a qcow2
volume of it.  The volume must hold the same guest-visible bytes as the
stored blob and as the VM's own overlay on its base.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import pytest

from compute import migration, transfer
from compute.drivers.vm import LibvirtDriver
from compute.imagecache import qemu_img_info
from compute.spec import InstanceSpec, PowerState, VolumeFormat
from compute.volumes import VolumeStore
from tests.compute.test_vm_migration import Blobs, nodes, portal, sample_image, vm
from tests.compute.vm_fixtures import test_bridge

pytestmark = [pytest.mark.host, pytest.mark.slow]
__all__ = ["nodes", "portal", "sample_image", "test_bridge", "vm"]  # fixtures used by name


def _same(a: Path, b: Path) -> None:
    cmp = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_a_stopped_vms_disk_backup_restores_into_a_volume_with_the_same_content(
    nodes: tuple[LibvirtDriver, LibvirtDriver], vm: InstanceSpec, portal: Blobs, tmp_path: Path
) -> None:
    source, _ = nodes
    iid = vm.instance_id
    assert source.stop(iid, timeout=30).power_state is PowerState.SHUTDOWN
    url = f"{portal.base}/instances/{iid}/backup-content"
    sent = migration.send_disk(source, iid, url, "backup-tok", source.config.state_dir)
    assert portal.tokens_seen[-1] == "Upload backup-tok"
    blob = portal.root / sent.digest.removeprefix("sha256:")
    assert blob.stat().st_size == sent.size
    assert source.info(iid).power_state is PowerState.SHUTDOWN  # the VM is left as it was

    store, vid, seen = VolumeStore(tmp_path / "volumes"), str(uuid.uuid4()), []
    t0 = time.monotonic()
    size = transfer.receive(
        store,
        vid,
        VolumeFormat.QCOW2,
        f"{portal.base}/blobs/{sent.digest}",
        sent.digest,
        tmp_path / "work",
        lambda done, total: seen.append((done, total)),
    )
    restored = time.monotonic() - t0
    volume = store.path(vid, VolumeFormat.QCOW2)
    info = qemu_img_info(volume)
    assert info["format"] == "qcow2" and "backing-filename" not in info and size > 0
    assert seen[-1] == (sent.size, sent.size)
    disk = source.config.state_dir / "instances" / iid / "disk.qcow2"
    _same(blob, volume)  # the volume is the stored backup
    _same(disk, volume)  # ... and the VM's disk as its guest sees it
    t0 = time.monotonic()  # the bare tool, same host, same moment: the conversion a restore does
    bare = tmp_path / "bare.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(blob), str(bare)], check=True)
    bare_seconds = time.monotonic() - t0
    print(
        f"\nVM disk backup: {sent.size} bytes, export {sent.export_seconds:.3f} s, upload "
        f"{sent.upload_seconds:.3f} s; restore to a volume {restored:.3f} s (bare qemu-img convert "
        f"{bare_seconds:.3f} s); loadavg {Path('/proc/loadavg').read_text().split()[0]}"
    )
