"""Cold migration, the node's halves, for real: libvirtd (TCG), qemu-img, HTTP on loopback.

Two nodes are two state dirs on this host's libvirtd.  The portal's two
endpoints the disk passes through (the upload PUT and the blob GET) are a
small HTTP server on 127.0.0.1 here: the node code under test (export,
upload, fetch with digest check, spawn) is the real one.  One libvirtd
cannot hold two domains of the same name, so the source copy is destroyed
before the target defines it; between real nodes the target starts first.
"""

from __future__ import annotations

import hashlib
import http.server
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute import migration
from compute.drivers.base import DriverError, InvalidState
from compute.drivers.vm import LibvirtDriver
from compute.imagecache import qemu_img_info
from compute.spec import ImageRef, InstanceSpec, NetworkAttachment, NetworkSegment, PowerState
from tests.compute.vm_fixtures import (
    build_sample_image,
    image_ref,
    make_state_dir,
    node_config,
    random_mac,
    test_bridge,
    vm_spec,
    wait_for,
)
from tests.hostcaps import require_binary, require_libvirtd

pytestmark = [pytest.mark.host, pytest.mark.slow]
__all__ = ["test_bridge"]  # fixture used by name

BOOT_DEADLINE = 90.0
READY = "SKYPORT-READY"


class Blobs(http.server.ThreadingHTTPServer):
    """The two portal endpoints a migrated disk passes through, on loopback."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tokens_seen: list[str] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api/v1"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Blobs

    def log_message(self, format: str, *args: object) -> None:
        return None

    def do_PUT(self) -> None:
        self.server.tokens_seen.append(self.headers.get("Authorization", ""))
        size = int(self.headers["Content-Length"])
        if self.path.endswith("/broken/file"):
            self.rfile.read(size)  # as the portal does: the body first, then the answer
            self.send_error(500, "disk full")
            return
        h = hashlib.sha256()
        tmp = self.server.root / ".upload"
        with tmp.open("wb") as out:
            left = size
            while left:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                h.update(chunk)
                out.write(chunk)
                left -= len(chunk)
        tmp.replace(self.server.root / h.hexdigest())
        self.send_response(204)
        self.end_headers()

    def do_GET(self) -> None:
        name = self.path.rpartition("/blobs/sha256:")[2]
        path = self.server.root / name
        if not name or not path.is_file():
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        with path.open("rb") as f:
            shutil.copyfileobj(f, self.wfile)


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Blobs]:
    server = Blobs(tmp_path_factory.mktemp("blobs"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[LibvirtDriver, LibvirtDriver]]:
    require_libvirtd()
    for tool in ("qemu-img", "genisoimage", "ping"):
        require_binary(tool)
    a, b = make_state_dir(), make_state_dir()
    try:
        yield (
            LibvirtDriver(node_config(a, node="node-a")),
            LibvirtDriver(node_config(b, node="node-b")),
        )
    finally:
        shutil.rmtree(a, ignore_errors=True)
        shutil.rmtree(b, ignore_errors=True)


@pytest.fixture(scope="module")
def sample_image() -> ImageRef:
    return image_ref(build_sample_image())


@pytest.fixture(scope="module")
def vm(
    nodes: tuple[LibvirtDriver, LibvirtDriver], sample_image: ImageRef, test_bridge: tuple[str, int]
) -> Iterator[InstanceSpec]:
    source, target = nodes
    name, n = test_bridge
    net = NetworkAttachment(
        NetworkSegment("testnet", name, host_address=f"198.18.{n}.1/24"),
        f"198.18.{n}.20/24",
        random_mac(),
        gateway=f"198.18.{n}.1",
    )
    spec = vm_spec(sample_image, (net,), hostname="mover")
    try:
        source.spawn(spec)
        wait_ready(source, spec.instance_id)
        yield spec
    finally:
        source.destroy(spec.instance_id)
        target.destroy(spec.instance_id)


def wait_ready(driver: LibvirtDriver, iid: str) -> None:
    def ready() -> bool:
        return READY in driver.console_log(iid, max_bytes=1 << 20)

    wait_for("the guest's ready marker", ready, BOOT_DEADLINE, 0.2)


def ping(address: str, deadline: float = 20.0) -> None:
    def once() -> bool:
        return subprocess.run(["ping", "-c1", "-W1", address], capture_output=True).returncode == 0

    wait_for(f"ping {address}", once, deadline, interval=0.2)


def exports(driver: LibvirtDriver) -> list[Path]:
    return sorted((driver.config.state_dir / "exports").glob("*"))


def test_a_running_vm_is_refused_and_keeps_running(
    nodes: tuple[LibvirtDriver, LibvirtDriver], vm: InstanceSpec, portal: Blobs
) -> None:
    source, _ = nodes
    state = source.config.state_dir
    with pytest.raises(InvalidState, match="stop it before sending its disk"):
        migration.send_disk(source, vm.instance_id, f"{portal.base}/images/1/file", "t", state)
    assert source.info(vm.instance_id).power_state is PowerState.RUNNING
    assert portal.tokens_seen == []


def test_a_clean_stop_never_forces_a_guest_that_cannot_shut_down(
    nodes: tuple[LibvirtDriver, LibvirtDriver], vm: InstanceSpec
) -> None:
    """The migration's stop (``force_after=False``): a paused guest cannot see the power button;
    it is refused and left as it was, never destroyed (a plain stop would force it off)."""
    source, _ = nodes
    source.pause(vm.instance_id)
    with pytest.raises(InvalidState, match="not forced off"):
        source.stop(vm.instance_id, timeout=1, force_after=False)
    assert source.info(vm.instance_id).power_state is PowerState.PAUSED
    assert source.resume(vm.instance_id).power_state is PowerState.RUNNING


def test_a_failed_upload_leaves_the_vm_stopped_and_intact(
    nodes: tuple[LibvirtDriver, LibvirtDriver], vm: InstanceSpec, portal: Blobs
) -> None:
    source, _ = nodes
    assert source.stop(vm.instance_id, timeout=30).power_state is PowerState.SHUTDOWN
    state = source.config.state_dir
    disk = state / "instances" / vm.instance_id / "disk.qcow2"
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    with pytest.raises(DriverError, match="HTTP 500"):
        migration.send_disk(source, vm.instance_id, f"{portal.base}/broken/file", "t", state)
    assert source.info(vm.instance_id).power_state is PowerState.SHUTDOWN
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before
    assert exports(source) == []  # the flattened copy is not left behind


def test_the_disk_travels_through_the_portal_and_the_same_vm_runs_on_the_target(
    nodes: tuple[LibvirtDriver, LibvirtDriver], vm: InstanceSpec, portal: Blobs
) -> None:
    source, target = nodes
    iid = vm.instance_id
    assert source.info(iid).power_state is PowerState.SHUTDOWN
    sent = migration.send_disk(source, iid, f"{portal.base}/images/7/file", "tok-7", source.config.state_dir)
    assert portal.tokens_seen[-1] == "Upload tok-7"
    uploaded = portal.root / sent.digest.removeprefix("sha256:")
    assert uploaded.stat().st_size == sent.size
    info = qemu_img_info(uploaded)
    assert info["format"] == "qcow2" and "backing-filename" not in info  # standalone
    # the same guest-visible bytes as the source's overlay on its base
    disk = source.config.state_dir / "instances" / iid / "disk.qcow2"
    argv = ["qemu-img", "compare", "-U", str(disk), str(uploaded)]
    cmp = subprocess.run(argv, capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert exports(source) == []
    print(
        f"\nmigrated disk: {sent.size} bytes, export {sent.export_seconds:.3f} s, "
        f"upload {sent.upload_seconds:.3f} s"
    )

    source.destroy(iid)  # one libvirtd: the name must be free (real nodes destroy after the target runs)
    spec = migration.target_spec(vm, f"{portal.base}/blobs/{sent.digest}", sent.digest)
    t0 = time.monotonic()
    info_b = target.spawn(spec)
    fetched = time.monotonic() - t0
    assert info_b.power_state is PowerState.RUNNING
    assert target.images.path_for(spec.image).is_file()  # fetched over HTTP and digest-checked
    wait_ready(target, iid)
    assert f"{READY} hostname=mover" in target.console_log(iid, max_bytes=1 << 20)
    xml = target.conn.lookupByName(f"sky-{iid}").XMLDesc()
    assert vm.networks[0].mac in xml and str(target.config.state_dir) in xml
    ping(vm.networks[0].address.split("/")[0])
    assert [i.instance_id for i in target.list()] == [iid]
    assert source.list() == []
    print(f"target fetch+define+start {fetched:.3f} s")


def test_a_corrupted_blob_is_refused_by_the_target(
    nodes: tuple[LibvirtDriver, LibvirtDriver], vm: InstanceSpec, portal: Blobs
) -> None:
    _, target = nodes
    wrong = "sha256:" + "0" * 64
    (portal.root / ("0" * 64)).write_bytes(b"not the disk that was sent")  # served under a digest it lacks
    spec = migration.target_spec(vm, f"{portal.base}/blobs/{wrong}", wrong)
    other = vm_spec(spec.image, hostname="never")
    with pytest.raises(DriverError, match="sha256 mismatch"):
        target.spawn(other)
    assert not (target.config.state_dir / "instances" / other.instance_id).exists()
