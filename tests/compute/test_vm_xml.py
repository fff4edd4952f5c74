"""Unit tests of the VM driver: domain XML, accelerator choice, seed contents,
image cache, and the driver logic against libvirt's test driver (no daemon)."""

from __future__ import annotations

import json
import subprocess
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from compute.drivers import cloudinit
from compute.drivers.accel import choose_domain_type
from compute.drivers.base import DriverError, InstanceNotFound, InvalidState
from compute.drivers.libvirt_xml import DiskConfig, DomainConfig, InterfaceConfig, metadata_nics, snapshot_xml
from compute.drivers.vm import LibvirtDriver, domain_name, tap_name
from compute.imagecache import ImageCache, ImageError, create_overlay, qemu_img_info
from compute.spec import ImageFormat, ImageRef, NetworkAttachment, NetworkSegment, PowerState
from tests.compute.vm_fixtures import node_config, sha256_file, vm_spec

IID = "0123abcd-0000-4000-8000-000000000001"

GOLDEN = f"""
<domain type="qemu">
  <name>sky-{IID}</name>
  <uuid>{IID}</uuid>
  <metadata>
    <skyport:instance xmlns:skyport="https://skyport.invalid/xmlns/libvirt/instance/1">
      <skyport:node>test-node</skyport:node>
      <skyport:tenant>acme &lt;&amp;&gt; "co"</skyport:tenant>
    </skyport:instance>
  </metadata>
  <memory unit="MiB">256</memory>
  <vcpu placement="static">2</vcpu>
  <os><type arch="x86_64" machine="pc">hvm</type><boot dev="hd"/></os>
  <features><acpi/><tcg><tb-cache unit="MiB">64</tb-cache></tcg></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type="file" device="disk">
      <driver name="qemu" type="qcow2"/><source file="/s/instances/{IID}/disk.qcow2"/>
      <target dev="vda" bus="virtio"/>
    </disk>
    <disk type="file" device="disk">
      <driver name="qemu" type="raw"/><source file="/s/instances/{IID}/seed.iso"/>
      <target dev="vdb" bus="virtio"/><readonly/>
    </disk>
    <interface type="bridge">
      <mac address="52:54:00:aa:bb:cc"/><source bridge="sktnet1"/><target dev="skv0123abcd0"/>
      <model type="virtio"/><mtu size="1400"/><rom enabled="no"/>
    </interface>
    <serial type="pty"><log file="/s/logs/{IID}.console.log" append="on"/><target port="0"/></serial>
    <console type="pty"><target type="serial" port="0"/></console>
    <controller type="usb" model="none"/>
    <memballoon model="none"/>
  </devices>
</domain>
"""


def canon(xml: str) -> str:
    return ET.canonicalize(xml, strip_text=True)


def golden_config() -> DomainConfig:
    return DomainConfig(
        name=f"sky-{IID}",
        uuid=IID,
        domain_type="qemu",
        vcpus=2,
        memory_mib=256,
        disks=(
            DiskConfig(f"/s/instances/{IID}/disk.qcow2", "vda"),
            DiskConfig(f"/s/instances/{IID}/seed.iso", "vdb", "raw", readonly=True),
        ),
        interfaces=(InterfaceConfig("sktnet1", "52:54:00:aa:bb:cc", "skv0123abcd0", mtu=1400),),
        console_log=f"/s/logs/{IID}.console.log",
        tenant='acme <&> "co"',
        node="test-node",
    )


def test_domain_xml_golden() -> None:
    assert canon(golden_config().to_xml()) == canon(GOLDEN)


def test_domain_xml_kvm_has_no_tcg_knobs() -> None:
    cfg = golden_config()
    xml = DomainConfig(**{**cfg.__dict__, "domain_type": "kvm"}).to_xml()
    root = ET.fromstring(xml)
    assert root.get("type") == "kvm"
    assert root.find("features/tcg") is None
    assert root.find("features/acpi") is not None


def test_foreign_taps_are_unbridged_and_their_bridge_is_in_the_metadata() -> None:
    """libvirtd in another network namespace: an ethernet tap there; the node bridges it from the metadata."""
    cfg = golden_config()
    (nic,) = cfg.interfaces
    foreign = InterfaceConfig(nic.bridge, nic.mac, nic.tap, nic.mtu, foreign=True)
    root = ET.fromstring(DomainConfig(**{**cfg.__dict__, "interfaces": (foreign,)}).to_xml())
    iface = root.find("devices/interface")
    assert iface is not None and iface.get("type") == "ethernet" and iface.find("source") is None
    assert iface.find("target").get("dev") == "skv0123abcd0"  # type: ignore[union-attr]
    meta = ET.tostring(root.find("metadata")[0], encoding="unicode")  # type: ignore[index]
    assert metadata_nics(meta) == [("skv0123abcd0", "sktnet1", 1400)]
    # libvirtd hands the element back without the prefix
    plain = '<instance><node>n</node><nic tap="skv0123abcd0" bridge="sktnet1" mtu="1400"/></instance>'
    assert metadata_nics(plain) == [("skv0123abcd0", "sktnet1", 1400)]
    assert metadata_nics(ET.tostring(ET.fromstring(GOLDEN).find("metadata")[0], encoding="unicode")) == []  # type: ignore[index]


def test_driver_builds_golden_xml_from_spec(tmp_path: Path) -> None:
    drv = LibvirtDriver(node_config(Path("/s"), uri="test:///default", accel="qemu"))
    image = ImageRef("tiny", "1", ImageFormat.QCOW2, "sha256:" + "0" * 64, "/x.qcow2")
    net = NetworkAttachment(NetworkSegment("n1", "sktnet1", mtu=1400), "198.18.3.10/24", "52:54:00:aa:bb:cc")
    spec = vm_spec(image, (net,), ram_mb=256)
    spec = type(spec)(**{**spec.__dict__, "instance_id": IID, "vcpus": 2, "tenant": 'acme <&> "co"'})
    assert canon(drv.domain_config(spec).to_xml()) == canon(GOLDEN)


@pytest.mark.parametrize(
    ("ram_mb", "cache_mib"), [(64, 32), (128, 32), (256, 64), (512, 128), (1024, 256), (8192, 256)]
)
def test_tcg_translation_cache_follows_the_guest_size(ram_mb: int, cache_mib: int) -> None:
    """A quarter of the guest's RAM, 32-256 MiB: a 512 MiB Debian guest thrashed a 32 MiB cache."""
    drv = LibvirtDriver(node_config(Path("/s"), uri="test:///default", accel="qemu"))
    image = ImageRef("tiny", "1", ImageFormat.QCOW2, "sha256:" + "0" * 64, "/x.qcow2")
    root = ET.fromstring(drv.domain_config(vm_spec(image, ram_mb=ram_mb)).to_xml())
    assert root.findtext("features/tcg/tb-cache") == str(cache_mib)
    assert root.find("features/tcg/tb-cache").get("unit") == "MiB"  # type: ignore[union-attr]


def test_snapshot_xml_leaves_seed_out() -> None:
    root = ET.fromstring(snapshot_xml("s1", internal=("vda",), skip=("vdb",)))
    assert root.findtext("name") == "s1"
    assert {d.get("name"): d.get("snapshot") for d in root.iterfind("disks/disk")} == {
        "vda": "internal",
        "vdb": "no",
    }


def test_names_fit_linux_limits() -> None:
    iid = str(uuid.uuid4())
    assert domain_name(iid) == f"sky-{iid}"
    for i in range(10):
        assert len(tap_name(iid, i)) <= 15


@pytest.mark.parametrize(
    ("flags", "pvm", "setting", "expected"),
    [
        ("fpu vmx sse", False, "auto", "kvm"),
        ("fpu svm sse", False, "auto", "kvm"),
        ("fpu vmx sse", True, "auto", "qemu"),  # PVM: stock kernels hang under it
        ("fpu sse", False, "auto", "qemu"),
        ("fpu sse", False, "kvm", "kvm"),  # explicit setting wins
        ("fpu vmx", False, "qemu", "qemu"),
    ],
)
def test_accelerator_choice(tmp_path: Path, flags: str, pvm: bool, setting: str, expected: str) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    module = tmp_path / "kvm_pvm"
    if pvm:
        module.mkdir()
    assert choose_domain_type(setting, cpuinfo, module) == expected


def test_accelerator_missing_cpuinfo_is_tcg(tmp_path: Path) -> None:
    assert choose_domain_type("auto", tmp_path / "nope", tmp_path / "nope2") == "qemu"
    with pytest.raises(ValueError):
        choose_domain_type("xen")


# -- NoCloud seed ------------------------------------------------------------------------------


def _spec_with_net(**kw: object) -> object:
    image = ImageRef("tiny", "1", ImageFormat.QCOW2, "sha256:" + "0" * 64, "/x.qcow2")
    net = NetworkAttachment(
        NetworkSegment("n1", "sktnet1"),
        "198.18.3.10/24",
        "52:54:00:aa:bb:cc",
        gateway="198.18.3.1",
        dns=("198.18.3.1",),
    )
    return vm_spec(image, (net,), hostname="web-1", ssh_keys=("ssh-ed25519 AAAAkey user@h",), **kw)


def test_seed_contents() -> None:
    spec = _spec_with_net()
    md = json.loads(cloudinit.meta_data(spec))  # type: ignore[arg-type]
    assert md == {
        "instance-id": spec.instance_id,  # type: ignore[attr-defined]
        "local-hostname": "web-1",
        "public-keys": ["ssh-ed25519 AAAAkey user@h"],
    }
    nc = json.loads(cloudinit.network_config(spec))  # type: ignore[arg-type]
    eth0 = nc["ethernets"]["eth0"]
    assert nc["version"] == 2
    assert eth0["match"] == {"macaddress": "52:54:00:aa:bb:cc"}
    assert eth0["addresses"] == ["198.18.3.10/24"]
    # cloud-init 22.4 (Debian 12) refuses "to": "default" and brings no NIC up
    assert eth0["routes"] == [{"to": "0.0.0.0/0", "via": "198.18.3.1"}]
    assert eth0["nameservers"] == {"addresses": ["198.18.3.1"]}
    ud = cloudinit.user_data(spec)  # type: ignore[arg-type]
    assert ud.startswith("#cloud-config\n")
    assert json.loads(ud.split("\n", 1)[1]) == {"hostname": "web-1"}


# A multi-part MIME user-data with CRLF line ends and non-ASCII text: must reach the guest unchanged.
MULTIPART = (
    'Content-Type: multipart/mixed; boundary="==B=="\r\nMIME-Version: 1.0\r\n\r\n'
    '--==B==\r\nContent-Type: text/cloud-config; charset="utf-8"\r\n\r\n'
    "#cloud-config\r\nwrite_files:\r\n- path: /etc/motd\r\n  content: 'grüße'\r\n"
    '--==B==\r\nContent-Type: text/x-shellscript; charset="utf-8"\r\n\r\n'
    "#!/bin/sh\r\necho hi > /tmp/hi\r\n--==B==--\r\n"
)


@pytest.mark.parametrize("user_data", [None, "#!/bin/sh\necho hi\n", "#cloud-config\nusers: []\n", MULTIPART])
def test_keys_are_in_meta_data_whatever_the_user_data(user_data: str | None) -> None:
    """Regression (issue 13): giving user-data dropped the tenant's SSH keys (they were only in user-data)."""
    spec = _spec_with_net(user_data=user_data)
    files = cloudinit.seed_files(spec)  # type: ignore[arg-type]
    assert json.loads(files["meta-data"])["public-keys"] == ["ssh-ed25519 AAAAkey user@h"]
    if user_data is not None:
        assert files["user-data"] == user_data.encode("utf-8")
    assert "vendor-data" not in files


def test_seed_iso_is_labelled_cidata_and_carries_user_data_byte_for_byte(tmp_path: Path) -> None:
    spec = _spec_with_net(user_data=MULTIPART, vendor_data="#cloud-config\ntimezone: UTC\n")
    iso = cloudinit.build_seed(spec, tmp_path / "seed.iso")  # type: ignore[arg-type]
    out = subprocess.run(["isoinfo", "-d", "-i", str(iso)], capture_output=True, text=True, check=True).stdout
    assert "Volume id: cidata" in out
    names = subprocess.run(["isoinfo", "-J", "-f", "-i", str(iso)], capture_output=True, text=True).stdout
    assert set(names.split()) == {"/meta-data", "/network-config", "/user-data", "/vendor-data"}

    def extract(name: str) -> bytes:
        cmd = ["isoinfo", "-J", "-i", str(iso), "-x", name]
        return subprocess.run(cmd, capture_output=True, check=True).stdout

    assert extract("/user-data") == MULTIPART.encode("utf-8")
    assert extract("/vendor-data") == b"#cloud-config\ntimezone: UTC\n"


# -- image cache and overlays ----------------------------------------------------------------------


def _qcow2(path: Path, size: str = "16M", backing: Path | None = None) -> Path:
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        cmd += ["-F", "qcow2", "-b", str(backing)]
    subprocess.run([*cmd, str(path), size], check=True)
    return path


def _ref(path: Path, digest: str | None = None) -> ImageRef:
    return ImageRef("t", "1", ImageFormat.QCOW2, "sha256:" + (digest or sha256_file(path)), str(path))


def test_image_cache_verifies_and_keeps_by_digest(tmp_path: Path) -> None:
    src = _qcow2(tmp_path / "src.qcow2")
    cache = ImageCache(tmp_path / "cache")
    got = cache.fetch(_ref(src))
    assert got.name == sha256_file(src) + ".qcow2"
    assert got.stat().st_mode & 0o777 == 0o644
    src.unlink()  # cached: the source is no longer needed
    assert cache.fetch(_ref(got)) == got


def test_image_cache_rejects_bad_digest_and_backing_files(tmp_path: Path) -> None:
    src = _qcow2(tmp_path / "src.qcow2")
    cache = ImageCache(tmp_path / "cache")
    with pytest.raises(ImageError, match="sha256 mismatch"):
        cache.fetch(_ref(src, digest="1" * 64))
    evil = _qcow2(tmp_path / "evil.qcow2", backing=src)
    with pytest.raises(ImageError, match="backing"):
        cache.fetch(_ref(evil))
    with pytest.raises(ImageError, match="absolute path"):
        cache.fetch(ImageRef("t", "1", ImageFormat.QCOW2, "sha256:" + "0" * 64, "relative.qcow2"))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


def test_overlay_grows_only(tmp_path: Path) -> None:
    base = _qcow2(tmp_path / "base.qcow2", "16M")
    create_overlay(base, "qcow2", tmp_path / "a.qcow2", 1 << 30)
    create_overlay(base, "qcow2", tmp_path / "b.qcow2", 0)
    a, b = qemu_img_info(tmp_path / "a.qcow2"), qemu_img_info(tmp_path / "b.qcow2")
    assert a["virtual-size"] == 1 << 30
    assert b["virtual-size"] == 16 << 20
    assert a["backing-filename"] == str(base)


# -- driver logic against libvirt's test driver ---------------------------------------------------


@pytest.fixture
def test_driver(tmp_path: Path) -> LibvirtDriver:
    return LibvirtDriver(node_config(tmp_path / "state", uri="test:///default", accel="qemu"))


@pytest.fixture
def tiny_ref(tmp_path: Path) -> ImageRef:
    return _ref(_qcow2(tmp_path / "tiny.qcow2"))


def test_fake_lifecycle(test_driver: LibvirtDriver, tiny_ref: ImageRef) -> None:
    drv = test_driver
    spec = vm_spec(tiny_ref)
    iid = spec.instance_id
    assert drv.spawn(spec).power_state is PowerState.RUNNING
    assert drv.spawn(spec).power_state is PowerState.RUNNING  # redelivery: same domain
    assert [i.instance_id for i in drv.list()] == [iid]  # the test driver's own "test" domain is not ours
    idir = drv.config.state_dir / "instances" / iid
    assert (idir / "disk.qcow2").exists() and (idir / "seed.iso").exists()

    assert drv.pause(iid).power_state is PowerState.PAUSED
    assert drv.pause(iid).power_state is PowerState.PAUSED
    assert drv.resume(iid).power_state is PowerState.RUNNING
    assert drv.resume(iid).power_state is PowerState.RUNNING
    assert drv.reboot(iid).power_state is PowerState.RUNNING

    first = drv.snapshot(iid, "s1")
    assert drv.snapshot(iid, "s1") == first  # existing name: no-op
    drv.snapshot(iid, "s2")
    assert [s.name for s in drv.list_snapshots(iid)] == ["s1", "s2"]
    drv.delete_snapshot(iid, "s2")
    drv.delete_snapshot(iid, "s2")
    assert [s.name for s in drv.list_snapshots(iid)] == ["s1"]
    with pytest.raises(DriverError):
        drv.snapshot(iid, "../etc")

    assert drv.stop(iid, timeout=5).power_state is PowerState.SHUTDOWN
    assert drv.stop(iid).power_state is PowerState.SHUTDOWN
    with pytest.raises(InvalidState):
        drv.reboot(iid)
    with pytest.raises(InvalidState):
        drv.pause(iid)
    assert drv.revert(iid, "s1").power_state is PowerState.RUNNING  # s1 was taken running
    assert drv.stop(iid, force=True).power_state is PowerState.SHUTDOWN
    assert drv.start(iid).power_state is PowerState.RUNNING
    assert drv.start(iid).power_state is PowerState.RUNNING
    assert drv.stats(iid).memory_limit_bytes == 128 << 20

    drv.destroy(iid)
    drv.destroy(iid)  # already gone
    assert drv.list() == []
    assert not idir.exists()
    with pytest.raises(InstanceNotFound):
        drv.info(iid)
    with pytest.raises(InstanceNotFound):
        drv.console_log(iid)


def test_stats_of_a_domain_vanishing_midway_is_a_driver_error(
    test_driver: LibvirtDriver, tiny_ref: ImageRef, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A heartbeat reads counters while another process deletes the VM: the error must be one
    the heartbeat expects (DriverError), or the whole VM driver is reported down for that beat."""
    drv = test_driver
    spec = vm_spec(tiny_ref)
    drv.spawn(spec)
    dom = drv.conn.lookupByName(domain_name(spec.instance_id))

    class VanishesAfterInfo:
        """The domain, deleted by "another process" right after its first reading."""

        def __getattr__(self, name: str) -> Any:
            return getattr(dom, name)

        def info(self) -> Any:
            got = dom.info()
            dom.destroy()
            dom.undefine()
            return got

    monkeypatch.setattr(drv, "_lookup", lambda iid: VanishesAfterInfo())
    with pytest.raises(DriverError):
        drv.stats(spec.instance_id)


def test_fake_spawn_failure_cleans_up(
    test_driver: LibvirtDriver, tiny_ref: ImageRef, monkeypatch: pytest.MonkeyPatch
) -> None:
    drv = test_driver
    spec = vm_spec(tiny_ref)
    real_define = drv.conn.defineXML

    def define_then_fail(xml: str) -> object:
        dom = real_define(xml)

        def create() -> None:
            import libvirt

            raise libvirt.libvirtError("boom")

        class Wrapped:
            def __getattr__(self, name: str) -> object:
                return create if name == "create" else getattr(dom, name)

        return Wrapped()

    monkeypatch.setattr(drv.conn, "defineXML", define_then_fail)
    with pytest.raises(DriverError, match="starting the domain"):
        drv.spawn(spec)
    monkeypatch.undo()
    assert drv.list() == []
    assert not (drv.config.state_dir / "instances" / spec.instance_id).exists()


def test_fake_spawn_bad_image_cleans_up(test_driver: LibvirtDriver, tiny_ref: ImageRef) -> None:
    bad = ImageRef("t", "1", ImageFormat.QCOW2, "sha256:" + "1" * 64, tiny_ref.location)
    spec = vm_spec(bad)
    with pytest.raises(DriverError, match="sha256 mismatch"):
        test_driver.spawn(spec)
    assert test_driver.list() == []
    assert list((test_driver.config.state_dir / "instances").iterdir()) == []


def test_unknown_ids_are_not_found(test_driver: LibvirtDriver) -> None:
    with pytest.raises(InstanceNotFound):
        test_driver.info("not-a-uuid")
    with pytest.raises(InstanceNotFound):
        test_driver.stop(str(uuid.uuid4()))


def test_health(tmp_path: Path, test_driver: LibvirtDriver) -> None:
    ok, why = test_driver.health()
    assert ok and why.startswith("libvirt ") and why.endswith("accel=qemu")
    broken = LibvirtDriver(node_config(tmp_path, uri="qemu+unix:///system?socket=/nonexistent"))
    ok, why = broken.health()
    assert not ok and "libvirt" in why


def test_image_cache_fetches_over_http(tmp_path: Path) -> None:
    import functools
    import http.server
    import threading

    src = _qcow2(tmp_path / "src.qcow2")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/src.qcow2"
        ref = ImageRef("t", "1", ImageFormat.QCOW2, "sha256:" + sha256_file(src), url)
        got = ImageCache(tmp_path / "cache").fetch(ref)
        assert sha256_file(got) == sha256_file(src)
        with pytest.raises(ImageError, match="HTTP 404"):
            ImageCache(tmp_path / "cache2").fetch(
                ImageRef("t", "1", ImageFormat.QCOW2, "sha256:" + "3" * 64, url + ".missing")
            )
    finally:
        server.shutdown()
        server.server_close()


def test_connection_is_reopened_after_fork(
    test_driver: LibvirtDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    first = test_driver.conn
    assert test_driver.conn is first
    pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: pid + 1)  # as seen in a forked Celery worker
    assert test_driver.conn is not first


def test_state_dirs_are_traversable_whatever_the_umask(tmp_path: Path, tiny_ref: ImageRef) -> None:
    import os

    drv = LibvirtDriver(node_config(tmp_path / "a" / "b", uri="test:///default"))
    old = os.umask(0o077)
    try:
        spec = vm_spec(tiny_ref)
        drv.spawn(spec)
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", drv.config.state_dir / "instances" / spec.instance_id):
        assert d.stat().st_mode & 0o777 == 0o755, d
    drv.destroy(spec.instance_id)


def test_two_nics_two_interfaces_two_ethernets_one_default_route() -> None:
    """Several tenant networks: one virtio interface each, in the spec's order, and one ethernet each in
    network-config; only the first NIC's gateway becomes the default route (the portal sends the gateway
    on the first only; the seed keeps one route even if a spec gave two)."""
    image = ImageRef("tiny", "1", ImageFormat.QCOW2, "sha256:" + "0" * 64, "/x.qcow2")
    nics = tuple(
        NetworkAttachment(
            NetworkSegment(f"acme/n{i}", f"skn-0000000{i}", mtu=1450),
            f"198.18.{160 + i}.10/24",
            f"52:54:00:aa:bb:0{i}",
            gateway=f"198.18.{160 + i}.1",
            dns=(f"198.18.{160 + i}.1",),
        )
        for i in range(2)
    )
    spec = vm_spec(image, nics, hostname="duo")
    drv = LibvirtDriver(node_config(Path("/s"), uri="test:///default", accel="qemu"))
    root = ET.fromstring(drv.domain_config(spec).to_xml())
    found = [
        (i.find("mac").get("address"), i.find("source").get("bridge"), i.find("target").get("dev"))  # type: ignore[union-attr]
        for i in root.iter("interface")
    ]
    assert found == [
        ("52:54:00:aa:bb:00", "skn-00000000", tap_name(spec.instance_id, 0)),
        ("52:54:00:aa:bb:01", "skn-00000001", tap_name(spec.instance_id, 1)),
    ]
    assert [i.find("model").get("type") for i in root.iter("interface")] == ["virtio", "virtio"]  # type: ignore[union-attr]
    nc = json.loads(cloudinit.network_config(spec))
    assert list(nc["ethernets"]) == ["eth0", "eth1"]
    eth0, eth1 = nc["ethernets"]["eth0"], nc["ethernets"]["eth1"]
    assert (eth0["match"], eth1["match"]) == (
        {"macaddress": "52:54:00:aa:bb:00"},
        {"macaddress": "52:54:00:aa:bb:01"},
    )
    assert eth0["addresses"] == ["198.18.160.10/24"] and eth1["addresses"] == ["198.18.161.10/24"]
    assert eth0["routes"] == [{"to": "0.0.0.0/0", "via": "198.18.160.1"}] and "routes" not in eth1
    assert eth1["nameservers"] == {"addresses": ["198.18.161.1"]} and eth1["mtu"] == 1450
