"""Container volumes for real: ext4 in a sparse file, loop-mounted, bind-mounted into crun containers.

A volume is created for a tenant's id range, attached to a stopped busybox
container at /data, written by the container's (namespaced) root, filled to
ENOSPC (the file system's size is the limit), the container deleted, the
volume attached to a new container which reads the file back; on the host
the files belong to the tenant's mapped root uid, not host root.  Mount
points are resolved inside the rootfs without following symbolic links.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from compute.drivers.base import DriverError, InvalidState
from compute.drivers.container import ContainerDriver, mount_point
from compute.mountpath import MountPathError, check_mount_path
from compute.spec import (
    ID_RANGE_MIN,
    ID_RANGE_SIZE,
    ImageRef,
    InstanceSpec,
    PowerState,
    VolumeFormat,
    VolumeMount,
)
from compute.volumes import GIB, VolumeError, VolumeStore
from tests.compute.container_fixtures import SampleImages, driver, make_spec, sample_images  # noqa: F401
from tests.compute.test_container_driver import wait_for
from tests.hostcaps import require_binary, require_root

BASE = ID_RANGE_MIN + 7 * ID_RANGE_SIZE  # the tenant's id range: root inside = host uid BASE


def _spec(images: SampleImages, name: str) -> InstanceSpec:
    spec = make_spec(images.base, command=("sleep", "3600"), ram_mb=64, hostname=name)
    return dataclasses.replace(spec, id_base=BASE)


def _exec(drv: ContainerDriver, iid: str, script: str) -> subprocess.CompletedProcess[str]:
    argv = drv.exec_argv(iid, ("sh", "-c", script), False)
    deadline = time.monotonic() + 3.0
    while True:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        # `crun exec` just after a start sometimes cannot join PID 1's namespaces yet (seen 1 run
        # in 4 here, with or without volumes): setns EPERM before the command runs; try again.
        if "setns(" not in out.stderr or time.monotonic() > deadline:
            return out
        time.sleep(0.05)


def _loops(path: Path) -> str:
    return subprocess.run(["losetup", "-j", str(path)], capture_output=True, text=True, check=False).stdout


def test_mount_paths_are_checked() -> None:
    for good in ("/data", "/var/lib/postgresql", "/etc/nginx/conf.d", "/srv/a b"):
        assert check_mount_path(good) == good
    for bad, why in (
        ("", "non-empty"),
        ("data", "absolute"),
        ("/", "may not be /"),
        ("/data/../etc", "'..'"),
        ("/data/", "not normalised"),
        ("//data", "not normalised"),
        ("/data/./x", "not normalised"),
        ("/proc", "under /proc"),
        ("/sys/fs", "under /sys"),
        ("/dev/shm", "under /dev"),
        ("/tmp/x", "under /tmp"),
        ("/etc", "system directory"),
        ("/usr", "system directory"),
        ("/etc/resolv.conf", "system directory"),
        ("/data,ro", "','"),
        ("/da\nta", "control"),
        ("/" + "a" * 255, "longer than 255"),
    ):
        with pytest.raises(MountPathError, match=why):
            check_mount_path(bad)


def test_mount_point_never_follows_a_link_out_of_the_rootfs(tmp_path: Path) -> None:
    rootfs, outside = tmp_path / "rootfs", tmp_path / "outside"
    rootfs.mkdir()
    outside.mkdir()
    (rootfs / "evil").symlink_to("../../../../../../../../" + str(outside).lstrip("/"))
    (rootfs / "abs").symlink_to(str(outside))
    (rootfs / "file").write_text("x")
    for path, why in (
        ("/evil", "/evil is a symbolic link"),
        ("/evil/data", "/evil is a symbolic link"),
        ("/abs/data", "/abs is a symbolic link"),
        ("/file/data", "/file is not a directory"),
    ):
        with pytest.raises(DriverError, match=why):
            mount_point(rootfs, path, os.getuid())
    assert list(outside.iterdir()) == []  # nothing was made through a link
    mount_point(rootfs, "/srv/data", os.getuid())
    assert (rootfs / "srv" / "data").is_dir() and not (rootfs / "srv").is_symlink()


def test_volume_store_makes_ext4_owned_by_the_range(tmp_path: Path) -> None:
    require_root()
    require_binary("mkfs.ext4")
    store = VolumeStore(tmp_path / "volumes")
    vid = str(uuid.uuid4())
    with pytest.raises(VolumeError, match="container id range"):
        store.create(vid, 1, VolumeFormat.EXT4, 0)
    assert store.create(vid, 1, VolumeFormat.EXT4, BASE) == GIB
    path = store.path(vid)
    assert path.name == f"{vid}.ext4" and store.ids() == [vid] and store.format(vid) is VolumeFormat.EXT4
    assert path.stat().st_blocks * 512 < 64 << 20  # sparse: mkfs wrote only metadata
    out = subprocess.run(["debugfs", "-R", "stat /", str(path)], capture_output=True, text=True, check=True)
    assert f"User: {BASE}" in out.stdout and f"Group: {BASE}" in out.stdout
    assert store.create(vid, 1, VolumeFormat.EXT4, BASE) == GIB  # redelivered: kept
    with pytest.raises(VolumeError, match="exists on this node as ext4"):
        store.create(vid, 1, VolumeFormat.QCOW2)
    assert store.grow(vid, 2) == 2 * GIB
    out = subprocess.run(["dumpe2fs", "-h", str(path)], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    assert int(fields["Block count"]) * int(fields["Block size"]) == 2 * GIB
    store.delete(vid)
    assert store.ids() == [] and not path.exists()


def test_volume_outlives_its_container_keeps_owners_and_holds_its_size(
    driver: ContainerDriver,  # noqa: F811
    sample_images: SampleImages,  # noqa: F811
) -> None:
    require_binary("mkfs.ext4")
    store = VolumeStore(driver.config.state_dir / "volumes")
    vid = str(uuid.uuid4())
    t0 = time.monotonic()
    store.create(vid, 1, VolumeFormat.EXT4, BASE)
    print(f"\ncreate 1 GiB ext4 volume: {time.monotonic() - t0:.2f} s")
    path = store.path(vid)

    a = _spec(sample_images, "vola")
    driver.spawn(a)
    with pytest.raises(InvalidState, match="no hot attach"):
        driver.attach_volume(a.instance_id, vid, path, mount_path="/data")
    driver.stop(a.instance_id, timeout=0)
    assert driver.attach_volume(a.instance_id, vid, path, mount_path="/data") == "/data"
    assert driver.attach_volume(a.instance_id, vid, path, mount_path="/data") == "/data"  # redelivered
    assert driver.volume_attachments(store.root) == [(vid, a.instance_id)]
    t0 = time.monotonic()
    assert driver.start(a.instance_id).power_state is PowerState.RUNNING
    print(f"start with one volume: {(time.monotonic() - t0) * 1000:.0f} ms")
    out = _exec(driver, a.instance_id, "echo hello > /data/hello && id -u && stat -c %u:%g /data /data/hello")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "0:0", "0:0"]  # root inside owns the volume's root
    # the file system's size is the limit: write until ENOSPC
    t0 = time.monotonic()
    out = _exec(
        driver,
        a.instance_id,
        "dd if=/dev/zero of=/data/fill bs=1M 2>&1; sync; stat -c %s /data/fill; df -k /data | tail -1",
    )
    lines = out.stdout.strip().splitlines()
    assert "No space left on device" in out.stdout, out.stdout
    filled = int(lines[-2])
    print(f"filled until ENOSPC: {filled} bytes ({filled / GIB:.3f} GiB) in {time.monotonic() - t0:.1f} s")
    print(f"df inside: {lines[-1]}")
    assert 0.9 * GIB < filled < GIB
    assert _exec(driver, a.instance_id, "rm /data/fill").returncode == 0
    # not detachable while it runs; the container is deleted, the volume stays
    with pytest.raises(InvalidState, match="no hot detach"):
        driver.detach_volume(a.instance_id, vid, path)
    driver.destroy(a.instance_id)
    assert path.is_file() and driver.volume_attachments(store.root) == []
    wait_for(lambda: _loops(path) == "", timeout=10, what="the loop device to go with the container")

    # on the host the files belong to the tenant's mapped root, not to host root
    mnt = driver.config.state_dir / "check"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop,ro", str(path), str(mnt)], check=True)
    try:
        listing = subprocess.run(["ls", "-lna", str(mnt)], capture_output=True, text=True, check=True).stdout
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    print(f"ls -lna on the host:\n{listing}")
    owners = {line.split()[-1]: (line.split()[2], line.split()[3]) for line in listing.splitlines()[1:]}
    assert owners["hello"] == owners["."] == (str(BASE), str(BASE))

    # a new container of the tenant reads it back, as its root
    b = _spec(sample_images, "volb")
    driver.spawn(b)
    # the container plants a link out of its rootfs; a mount there is refused and nothing escapes
    target = f"skyport-escape-{uuid.uuid4().hex[:8]}"
    assert _exec(driver, b.instance_id, f"ln -s ../../../../../../../../../../tmp /{target}").returncode == 0
    driver.stop(b.instance_id, timeout=0)
    with pytest.raises(DriverError, match=f"/{target} is a symbolic link"):
        driver.attach_volume(b.instance_id, vid, path, mount_path=f"/{target}/{target}")
    assert not Path(f"/tmp/{target}").exists()  # nothing was made on the host through the link
    assert driver.volume_attachments(store.root) == []
    driver.attach_volume(b.instance_id, vid, path, mount_path="/data")
    driver.start(b.instance_id)
    out = _exec(driver, b.instance_id, "cat /data/hello && stat -c %u:%g /data/hello && ls /data")
    assert out.stdout.split() == ["hello", "0:0", "hello", "lost+found"], out
    driver.stop(b.instance_id, timeout=0)
    driver.detach_volume(b.instance_id, vid, path)
    driver.detach_volume(b.instance_id, vid, path)  # not attached: nothing to do
    assert driver.volume_attachments(store.root) == []
    driver.start(b.instance_id)
    assert _exec(driver, b.instance_id, "test -e /data/hello").returncode == 1  # gone from the container
    driver.destroy(b.instance_id)
    wait_for(lambda: _loops(path) == "", timeout=10, what="the loop device to go")

    # attached at create: the spec names it, the first start mounts it
    c = dataclasses.replace(_spec(sample_images, "volc"), volumes=(VolumeMount(vid, "/srv/data"),))
    assert driver.spawn(c).power_state is PowerState.RUNNING
    assert driver.volume_attachments(store.root) == [(vid, c.instance_id)]
    got = _exec(driver, c.instance_id, "cat /srv/data/hello")
    assert got.stdout == "hello\n", got
    other = dataclasses.replace(_spec(sample_images, "vold"), volumes=(VolumeMount(vid, "/data"),))
    with pytest.raises(DriverError, match="is attached to container"):
        driver.spawn(other)  # one container at a time
    driver.destroy(c.instance_id)


def _with_links(src: ImageRef, dest: Path, links: dict[str, str]) -> ImageRef:
    """``src`` (an OCI archive) with one more layer holding the symbolic links ``links`` (name -> target)."""
    with tarfile.open(src.location) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}  # type: ignore[union-attr]
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tf:
        for name, target in links.items():
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, target, 0o777
            tf.addfile(ti)

    def add(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        files[f"blobs/sha256/{digest}"] = data
        return f"sha256:{digest}"

    index = json.loads(files["index.json"])
    manifest = json.loads(files["blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]])
    data = layer.getvalue()
    manifest["layers"].append(
        {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": add(data), "size": len(data)}
    )
    body = json.dumps(manifest).encode()
    index["manifests"][0].update(digest=add(body), size=len(body))
    files["index.json"] = json.dumps(index).encode()
    with tarfile.open(dest, "w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            tf.addfile(ti, io.BytesIO(data))
    digest = "sha256:" + hashlib.sha256(dest.read_bytes()).hexdigest()
    return dataclasses.replace(src, name="busybox-links", digest=digest, location=str(dest))


def test_a_link_in_the_image_cannot_lead_a_volume_out_of_the_rootfs(
    driver: ContainerDriver,  # noqa: F811
    sample_images: SampleImages,  # noqa: F811
    tmp_path: Path,
) -> None:
    require_binary("mkfs.ext4")
    name = f"skyport-escape-{uuid.uuid4().hex[:8]}"
    image = _with_links(
        sample_images.base,
        tmp_path / "links.oci.tar",
        {"evil": "../../../../../../../../../../tmp", "abs": "/tmp", "srv": "../../../../../../../tmp"},
    )
    spec = dataclasses.replace(_spec(sample_images, "links"), image=image)
    driver.spawn(spec)
    assert _exec(driver, spec.instance_id, "readlink /evil").stdout.strip().endswith("/tmp")
    driver.stop(spec.instance_id, timeout=0)
    store = VolumeStore(driver.config.state_dir / "volumes")
    vid = str(uuid.uuid4())
    store.create(vid, 1, VolumeFormat.EXT4, BASE)
    for link in ("evil", "abs", "srv"):
        with pytest.raises(DriverError, match=f"/{link} is a symbolic link"):
            driver.attach_volume(spec.instance_id, vid, store.path(vid), mount_path=f"/{link}/{name}")
    assert not Path(f"/tmp/{name}").exists()  # nothing was made on the host through a link
    assert driver.volume_attachments(store.root) == []
    # a path without links still works, and the container starts with it
    driver.attach_volume(spec.instance_id, vid, store.path(vid), mount_path="/vol")
    assert driver.start(spec.instance_id).power_state is PowerState.RUNNING
    assert _exec(driver, spec.instance_id, "grep -c ' /vol ' /proc/self/mountinfo").stdout.strip() == "1"


def test_attachments_survive_a_worker_restart_and_a_missing_file_fails_the_start(
    driver: ContainerDriver,  # noqa: F811
    sample_images: SampleImages,  # noqa: F811
) -> None:
    require_binary("mkfs.ext4")
    store = VolumeStore(driver.config.state_dir / "volumes")
    vid = str(uuid.uuid4())
    store.create(vid, 1, VolumeFormat.EXT4, BASE)
    spec = dataclasses.replace(_spec(sample_images, "vole"), volumes=(VolumeMount(vid, "/data"),))
    driver.spawn(spec)
    assert _exec(driver, spec.instance_id, "echo kept > /data/f").returncode == 0
    driver.stop(spec.instance_id, timeout=0)
    # a new driver (the worker restarted) knows the attachment and mounts it again
    again = ContainerDriver(driver.config)
    assert again.volume_attachments(store.root) == [(vid, spec.instance_id)]
    assert again.start(spec.instance_id).power_state is PowerState.RUNNING
    assert _exec(again, spec.instance_id, "cat /data/f").stdout == "kept\n"
    again.stop(spec.instance_id, timeout=0)
    # the volume's file is gone: the start fails with the reason and leaves nothing mounted
    path = store.path(vid)
    moved = path.with_name("moved")
    path.rename(moved)
    with pytest.raises(DriverError, match=f"volume {vid} has no file on this node"):
        again.start(spec.instance_id)
    assert again.info(spec.instance_id).power_state is not PowerState.RUNNING
    with open("/proc/self/mountinfo") as fh:
        assert not [line for line in fh if str(driver.config.state_dir) in line]
    moved.rename(path)
    assert again.start(spec.instance_id).power_state is PowerState.RUNNING
    assert _exec(again, spec.instance_id, "cat /data/f").stdout == "kept\n"
