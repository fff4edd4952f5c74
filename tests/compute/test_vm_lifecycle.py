"""The VM driver against the real libvirtd (TCG here): one tiny guest booted
once and taken through its whole life.  Tests run in file order and share it."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute.drivers.base import DriverError, InstanceNotFound
from compute.drivers.vm import LibvirtDriver, domain_name, tap_name
from compute.network import bridge
from compute.spec import ImageFormat, ImageRef, InstanceSpec, NetworkAttachment, NetworkSegment, PowerState
from tests.compute.vm_fixtures import (
    build_sample_image,
    image_ref,
    node_config,
    random_mac,
    test_bridge,
    vm_spec,
    vm_state_dir,
    wait_for,
)
from tests.hostcaps import require_binary, require_libvirtd

pytestmark = [pytest.mark.host, pytest.mark.slow]
__all__ = ["test_bridge", "vm_state_dir"]  # fixtures used by name

BOOT_DEADLINE = 90.0
READY = "SKYPORT-READY"


def ping(address: str, deadline: float = 20.0) -> None:
    def once() -> bool:
        return subprocess.run(["ping", "-c1", "-W1", address], capture_output=True).returncode == 0

    wait_for(f"ping {address}", once, deadline, interval=0.2)


class Booted:
    def __init__(self, driver: LibvirtDriver, spec: InstanceSpec, address: str) -> None:
        self.driver = driver
        self.spec = spec
        self.iid = spec.instance_id
        self.address = address

    def log(self) -> str:
        return self.driver.console_log(self.iid, max_bytes=1 << 20)

    def wait_ready(self, count: int) -> None:
        wait_for(f"ready marker #{count}", lambda: self.log().count(READY) >= count, BOOT_DEADLINE, 0.2)


@pytest.fixture(scope="module")
def driver(vm_state_dir: Path) -> LibvirtDriver:
    require_libvirtd()
    for tool in ("qemu-img", "genisoimage", "ping"):
        require_binary(tool)
    return LibvirtDriver(node_config(vm_state_dir))


@pytest.fixture(scope="module")
def sample_image() -> ImageRef:
    return image_ref(build_sample_image())


@pytest.fixture(scope="module")
def booted(driver: LibvirtDriver, sample_image: ImageRef, test_bridge: tuple[str, int]) -> Iterator[Booted]:
    name, n = test_bridge
    address = f"198.18.{n}.10"
    net = NetworkAttachment(
        NetworkSegment("testnet", name, host_address=f"198.18.{n}.1/24"),
        f"{address}/24",
        random_mac(),
        gateway=f"198.18.{n}.1",
    )
    spec = vm_spec(sample_image, (net,), hostname="tiny-vm", ssh_keys=("ssh-ed25519 AAAAC3Nza test@skyport",))
    try:
        driver.spawn(spec)
        vm = Booted(driver, spec, address)
        vm.wait_ready(1)
        yield vm
    finally:
        driver.destroy(spec.instance_id)


def test_boot_shows_ready_marker_with_seeded_identity(booted: Booted) -> None:
    assert f"{READY} hostname=tiny-vm address={booted.address}/24" in booted.log()
    assert "ssh key ssh-ed25519" in booted.log()


def test_host_pings_guest(booted: Booted) -> None:
    ping(booted.address)
    assert tap_name(booted.iid, 0) in bridge.bridge_ports(booted.spec.networks[0].bridge)


def test_redelivered_spawn_yields_one_domain(booted: Booted) -> None:
    before = booted.driver.info(booted.iid)
    again = booted.driver.spawn(booted.spec)
    assert again == before
    assert [i.instance_id for i in booted.driver.list()].count(booted.iid) == 1


def test_list_is_per_node_on_a_shared_libvirtd(booted: Booted) -> None:
    other = LibvirtDriver(node_config(booted.driver.config.state_dir, node="other-node"))
    assert booted.iid not in [i.instance_id for i in other.list()]
    assert booted.iid in [i.instance_id for i in booted.driver.list()]


def test_info_stats_and_console(booted: Booted) -> None:
    info = booted.driver.info(booted.iid)
    assert info.power_state is PowerState.RUNNING and info.pid
    stats = booted.driver.stats(booted.iid)
    assert stats.cpu_time_ns > 0 and stats.memory_bytes > 0
    assert stats.disk_read_bytes and stats.disk_read_bytes > 0
    assert stats.net_rx_bytes is not None and stats.net_tx_bytes and stats.net_tx_bytes > 0
    assert booted.driver.console_log(booted.iid, max_bytes=10) == booted.log()[-10:]


def test_pause_and_resume(booted: Booted) -> None:
    assert booted.driver.pause(booted.iid).power_state is PowerState.PAUSED
    assert booted.driver.pause(booted.iid).power_state is PowerState.PAUSED
    assert booted.driver.resume(booted.iid).power_state is PowerState.RUNNING
    ping(booted.address)


def test_export_disk_of_a_running_vm_is_standalone_and_boots(booted: Booted, tmp_path: Path) -> None:
    """What 'publish' sends to the portal: a flattened qcow2, taken while the guest is paused."""
    from compute.imagecache import qemu_img_info

    dest = tmp_path / "published.qcow2"
    booted.driver.export_disk(booted.iid, dest)
    assert booted.driver.info(booted.iid).power_state is PowerState.RUNNING  # resumed after the copy
    info = qemu_img_info(dest)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    ping(booted.address)
    # a new VM boots from the exported disk (the driver copies it into its image cache)
    spec = vm_spec(image_ref(dest), hostname="from-export")
    clone = Booted(booted.driver, spec, "")
    try:
        booted.driver.spawn(spec)
        clone.wait_ready(1)
        assert f"{READY} hostname=from-export" in clone.log()
    finally:
        booted.driver.destroy(spec.instance_id)


def test_snapshot_and_revert_restore_the_running_guest(booted: Booted) -> None:
    drv, iid = booted.driver, booted.iid
    snap = drv.snapshot(iid, "before-stop")
    assert [s.name for s in drv.list_snapshots(iid)] == ["before-stop"]
    assert drv.snapshot(iid, "before-stop") == snap
    # the size the portal lists: the memory state saved with a running VM (qemu-img vm-state-size)
    (sized,) = drv.list_snapshots(iid, sizes=True)
    assert sized.name == "before-stop" and sized.created_at == snap.created_at
    assert 1 << 20 < sized.size_bytes < 256 << 20, sized
    readies = booted.log().count(READY)
    assert drv.stop(iid, force=True).power_state is PowerState.SHUTDOWN
    # The snapshot holds memory: revert resumes the guest where it was, without a boot.
    assert drv.revert(iid, "before-stop").power_state is PowerState.RUNNING
    ping(booted.address)
    assert booted.log().count(READY) == readies
    drv.delete_snapshot(iid, "before-stop")
    drv.delete_snapshot(iid, "before-stop")
    assert drv.list_snapshots(iid) == []
    with pytest.raises(DriverError):
        drv.revert(iid, "before-stop")


def test_reboot(booted: Booted) -> None:
    readies = booted.log().count(READY)
    assert booted.driver.reboot(booted.iid).power_state is PowerState.RUNNING
    booted.wait_ready(readies + 1)
    ping(booted.address)


def test_stop_by_acpi_power_button(booted: Booted) -> None:
    t0 = time.monotonic()
    assert booted.driver.stop(booted.iid, timeout=30).power_state is PowerState.SHUTDOWN
    assert time.monotonic() - t0 < 15  # the guest honoured ACPI; no forced timeout
    assert "SKYPORT-POWEROFF" in booted.log()
    assert booted.driver.stop(booted.iid).power_state is PowerState.SHUTDOWN  # no-op


def test_snapshot_of_a_stopped_vm(booted: Booted) -> None:
    drv, iid = booted.driver, booted.iid
    drv.snapshot(iid, "offline")
    assert drv.revert(iid, "offline").power_state is PowerState.SHUTDOWN
    drv.delete_snapshot(iid, "offline")
    assert drv.list_snapshots(iid) == []


def test_stop_is_forced_after_timeout(booted: Booted) -> None:
    drv, iid = booted.driver, booted.iid
    poweroffs = booted.log().count("SKYPORT-POWEROFF")
    assert drv.start(iid).power_state is PowerState.RUNNING
    # Seconds before the guest's ACPI handler runs: the button is ignored, so stop forces.
    t0 = time.monotonic()
    assert drv.stop(iid, timeout=0.2).power_state is PowerState.SHUTDOWN
    assert time.monotonic() - t0 < 5
    assert booted.log().count("SKYPORT-POWEROFF") == poweroffs
    assert drv.start(iid).power_state is PowerState.RUNNING
    assert drv.stop(iid, force=True).power_state is PowerState.SHUTDOWN


def test_start_boots_again(booted: Booted) -> None:
    readies = booted.log().count(READY)
    assert booted.driver.start(booted.iid).power_state is PowerState.RUNNING
    assert booted.driver.start(booted.iid).power_state is PowerState.RUNNING
    booted.wait_ready(readies + 1)
    ping(booted.address)


def test_destroy_leaves_nothing_but_the_console_log(booted: Booted) -> None:
    drv, iid = booted.driver, booted.iid
    drv.snapshot(iid, "kept-until-destroy")
    drv.destroy(iid)
    drv.destroy(iid)  # already gone
    with pytest.raises(InstanceNotFound):
        drv.info(iid)
    assert iid not in [i.instance_id for i in drv.list()]
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        assert domain_name(iid) not in [d.name() for d in conn.listAllDomains(0)]
    finally:
        conn.close()
    idir = drv.config.state_dir / "instances" / iid
    assert not (idir / "disk.qcow2").exists()
    assert not (idir / "seed.iso").exists()
    assert not idir.exists()
    assert not bridge.link_exists(tap_name(iid, 0))
    assert READY in drv.console_log(iid)  # kept for the portal


def test_spawn_failure_leaves_nothing(driver: LibvirtDriver, sample_image: ImageRef) -> None:
    bad = ImageRef("tiny", "x", ImageFormat.QCOW2, "sha256:" + "2" * 64, sample_image.location)
    spec = vm_spec(bad)
    with pytest.raises(DriverError, match="sha256 mismatch"):
        driver.spawn(spec)
    with pytest.raises(InstanceNotFound):
        driver.info(spec.instance_id)
    assert not (driver.config.state_dir / "instances" / spec.instance_id).exists()


def test_spawn_failure_after_bridge_removes_the_bridge_it_made(
    driver: LibvirtDriver, sample_image: ImageRef, monkeypatch: pytest.MonkeyPatch
) -> None:
    import libvirt

    br = f"skt{secrets.token_hex(4)}"
    net = NetworkAttachment(NetworkSegment("failnet", br), "198.18.0.10/24", random_mac())
    spec = vm_spec(sample_image, (net,))

    def refuse(xml: str) -> None:
        raise libvirt.libvirtError("refused by the test")

    monkeypatch.setattr(driver.conn, "defineXML", refuse)
    try:
        with pytest.raises(DriverError, match="defining the domain"):
            driver.spawn(spec)
        assert not bridge.link_exists(br)
        assert not (driver.config.state_dir / "instances" / spec.instance_id).exists()
    finally:
        monkeypatch.undo()
        bridge.delete_bridge(br)
