"""Volumes on the real libvirtd (TCG): two tiny guests, one volume moved between them.

A guest writes a marker to the volume hot-attached to it, the volume is
hot-detached (the guest releases it through ACPI hot-unplug), attached to a
second running guest that reads the marker back; the attachment survives a
stop and start (it is in the persistent definition), the file survives the
deletion of both VMs; an attach that fails inside libvirt leaves the VM's
definition as it was.  All through ``NodeService.volume``, the node's real
handler of ``compute.volume`` messages.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from compute.drivers.base import InvalidState
from compute.drivers.libvirt_xml import disk_sources
from compute.drivers.vm import LibvirtDriver
from compute.spec import Kind, PowerState, Task, VolumeOp, VolumeRequest, to_json
from compute.tasks import NodeService
from tests.compute.vm_fixtures import (
    build_sample_image,
    image_ref,
    node_config,
    vm_spec,
    vm_state_dir,
    wait_for,
)
from tests.hostcaps import require_binary, require_libvirtd

pytestmark = [pytest.mark.host, pytest.mark.slow]
__all__ = ["vm_state_dir"]  # fixture used by name

DEADLINE = 90.0
# user-data of the writer and the reader: each waits for the hot-plugged disk (vdc) to appear
WRITER = """#!/bin/sh
while [ ! -b /dev/vdc ]; do usleep 100000; done
printf 'skyport-volume-%s\\n' "{mark}" | dd of=/dev/vdc bs=512 conv=sync,fsync 2>/dev/null
echo SKYPORT-VOLUME-WROTE
"""
READER = """#!/bin/sh
while [ ! -b /dev/vdc ]; do usleep 100000; done
echo "SKYPORT-VOLUME-READ $(head -n1 /dev/vdc)"
"""


@pytest.fixture
def node(vm_state_dir: Path) -> Iterator[tuple[NodeService, list[dict[str, Any]]]]:
    require_libvirtd()
    for tool in ("qemu-img", "genisoimage"):
        require_binary(tool)
    sent: list[dict[str, Any]] = []
    config = node_config(vm_state_dir)
    svc = NodeService(config, lambda task, payload: sent.append(payload), {Kind.VM: LibvirtDriver(config)})
    yield svc, sent


def _request(svc: NodeService, vid: str, op: VolumeOp, **kw: Any) -> Any:
    message = VolumeRequest(vid, op, uuid.uuid4().hex, **kw)
    return svc.handle(Task.VOLUME, to_json(message))


def test_a_volume_moves_between_running_vms_and_outlives_them(node: tuple[NodeService, list[Any]]) -> None:
    svc, _ = node
    drv = svc.driver(Kind.VM)
    assert isinstance(drv, LibvirtDriver)
    image = image_ref(build_sample_image())
    mark = secrets.token_hex(6)
    writer = vm_spec(image, hostname="vol-writer", user_data=WRITER.replace("{mark}", mark))
    reader = vm_spec(image, hostname="vol-reader", user_data=READER)
    vid = str(uuid.uuid4())
    path = svc.volumes.path(vid)
    try:
        created = _request(svc, vid, VolumeOp.CREATE, size_gb=1)
        assert created.ok and created.size_bytes == 1 << 30, created
        assert _request(svc, vid, VolumeOp.CREATE, size_gb=1).ok  # a redelivered create keeps the file
        drv.spawn(writer)
        drv.spawn(reader)

        def log(spec: Any) -> str:
            return drv.console_log(spec.instance_id, max_bytes=1 << 20)

        for spec in (writer, reader):
            wait_for(f"{spec.hostname} ready", lambda s=spec: "SKYPORT-READY" in log(s), DEADLINE, 0.2)
        # hot attach to the running writer; it writes the marker
        attached = _request(svc, vid, VolumeOp.ATTACH, instance_id=writer.instance_id, kind="vm")
        assert attached.ok and attached.target == "vdc", attached
        again = _request(svc, vid, VolumeOp.ATTACH, instance_id=writer.instance_id, kind="vm")
        assert again.ok and again.target == "vdc"
        wait_for("the writer's marker", lambda: "SKYPORT-VOLUME-WROTE" in log(writer), DEADLINE, 0.2)
        assert svc.report().attachments == ((vid, writer.instance_id),)
        # hot detach: the running guest releases the disk
        assert _request(svc, vid, VolumeOp.DETACH, instance_id=writer.instance_id, kind="vm").ok
        assert str(path) not in disk_sources(drv._lookup(writer.instance_id).XMLDesc(0)).values()
        assert _request(svc, vid, VolumeOp.DETACH, instance_id=writer.instance_id, kind="vm").ok  # no-op
        # attach to the second running guest: it reads what the first wrote
        assert _request(svc, vid, VolumeOp.ATTACH, instance_id=reader.instance_id, kind="vm").ok
        wait_for(
            "the reader's line",
            lambda: f"SKYPORT-VOLUME-READ skyport-volume-{mark}" in log(reader),
            DEADLINE,
            0.2,
        )
        # persistent: a stopped and started VM still has the volume (as after a node restart)
        assert drv.stop(reader.instance_id, force=True).power_state is PowerState.SHUTDOWN
        assert drv.start(reader.instance_id).power_state is PowerState.RUNNING
        assert disk_sources(drv._lookup(reader.instance_id).XMLDesc(0)).get("vdc") == str(path)
        # a snapshot of a running VM holds its volumes too (libvirt wants every writable disk in it)
        drv.snapshot(reader.instance_id, "with-volume")
        assert drv.revert(reader.instance_id, "with-volume").power_state is PowerState.RUNNING
        # deleting both VMs leaves the volume and its data
        drv.destroy(writer.instance_id)
        drv.destroy(reader.instance_id)
        assert path.is_file()
        with open(path, "rb") as f:
            assert f.read(4) == b"QFI\xfb"
        assert svc.report().volumes == (vid,)
        grown = _request(svc, vid, VolumeOp.GROW, size_gb=2)
        assert grown.ok and grown.size_bytes == 2 << 30
        shrink = _request(svc, vid, VolumeOp.GROW, size_gb=1)
        assert not shrink.ok and "only grow" in shrink.message
    finally:
        drv.destroy(writer.instance_id)
        drv.destroy(reader.instance_id)
        svc.volumes.delete(vid)
    assert not path.exists()
    assert _request(svc, vid, VolumeOp.DELETE).ok  # deleting a deleted volume succeeds


def test_a_failed_attach_leaves_the_vm_as_it_was(node: tuple[NodeService, list[Any]]) -> None:
    svc, sent = node
    drv = svc.driver(Kind.VM)
    assert isinstance(drv, LibvirtDriver)
    spec = vm_spec(image_ref(build_sample_image()), hostname="vol-fault")
    vid = str(uuid.uuid4())
    try:
        drv.spawn(spec)
        missing = _request(svc, vid, VolumeOp.ATTACH, instance_id=spec.instance_id, kind="vm")
        assert not missing.ok and "has no file on node" in missing.message
        # a file QEMU cannot open as qcow2: libvirt refuses the live attach half-way
        svc.volumes.root.mkdir(parents=True, exist_ok=True)
        svc.volumes.path(vid).write_bytes(b"not a qcow2 image" * 100)
        before = drv._lookup(spec.instance_id).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        broken = _request(svc, vid, VolumeOp.ATTACH, instance_id=spec.instance_id, kind="vm")
        assert not broken.ok and "attaching the volume failed" in broken.message, broken
        dom = drv._lookup(spec.instance_id)
        assert dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == before
        assert "vdc" not in disk_sources(dom.XMLDesc(0))
        assert drv.info(spec.instance_id).power_state is PowerState.RUNNING
        assert [m["ok"] for m in sent] == [False, False]
        # resize (issue 13): only stopped; vCPUs, memory and the grown root disk, persistent
        with pytest.raises(InvalidState):
            drv.resize(spec.instance_id, 2, 192, 1)
        drv.stop(spec.instance_id, force=True)
        assert drv.resize(spec.instance_id, 2, 192, 1).power_state is PowerState.SHUTDOWN
        dom = drv._lookup(spec.instance_id)
        assert dom.info()[1] == 192 * 1024 and dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_CONFIG) == 2
        disk = drv._instance_dir(spec.instance_id) / "disk.qcow2"
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", str(disk)], capture_output=True, text=True
        )
        assert json.loads(info.stdout)["virtual-size"] == 1 << 30
        assert drv.start(spec.instance_id).power_state is PowerState.RUNNING
        assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) == 2
    finally:
        drv.destroy(spec.instance_id)
        svc.volumes.delete(vid)
