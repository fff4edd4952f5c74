"""libvirt domain XML built from typed config objects (never string-formatted).

Only what the Skyport VM driver needs: BIOS boot from a qcow2 overlay, a
read-only NoCloud seed, bridged virtio NICs with named taps, a serial console
written to a file, and the knobs that keep a TCG guest small.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

METADATA_NS = "https://skyport.invalid/xmlns/libvirt/instance/1"

TB_CACHE_MIN_MIB = 32
TB_CACHE_MAX_MIB = 256


def tb_cache_mib(memory_mib: int) -> int:
    """TCG's translated-code cache for a guest of ``memory_mib``: a quarter of it, 32-256 MiB.

    When the cache is full QEMU throws every translation away and starts again, so a guest whose
    running code outgrows it spends its vCPU translating the same code over and over.  A tiny
    guest (128 MiB, busybox) fits in 32 MiB; a Debian cloud guest (512 MiB: systemd, four
    cloud-init processes) did not, and booted ~30% slower for it (docs/vm-driver.md has the
    figures).  The cache is host memory the QEMU process touches as it fills, so it is bounded by
    the guest's size rather than set to QEMU's own default (1 GiB)."""
    return max(TB_CACHE_MIN_MIB, min(TB_CACHE_MAX_MIB, memory_mib // 4))


@dataclasses.dataclass(frozen=True)
class DiskConfig:
    path: str
    target: str  # vda, vdb ...
    format: str = "qcow2"
    readonly: bool = False
    serial: str = ""  # the guest sees it as /dev/disk/by-id/virtio-<serial> (volumes: their id)

    def to_element(self) -> ET.Element:
        d = ET.Element("disk", type="file", device="disk")
        ET.SubElement(d, "driver", name="qemu", type=self.format)
        ET.SubElement(d, "source", file=self.path)
        ET.SubElement(d, "target", dev=self.target, bus="virtio")
        if self.serial:
            _text(d, "serial", self.serial)
        if self.readonly:
            ET.SubElement(d, "readonly")
        return d

    def to_xml(self) -> str:
        """The ``<disk>`` element alone, as attachDeviceFlags and detachDeviceFlags take it."""
        return ET.tostring(self.to_element(), encoding="unicode")


@dataclasses.dataclass(frozen=True)
class InterfaceConfig:
    bridge: str
    mac: str
    tap: str  # host-side tap name, at most 15 characters
    mtu: int = 1500
    #: libvirtd runs in another network namespace: an unbridged tap there, moved and bridged by the node
    foreign: bool = False


@dataclasses.dataclass(frozen=True)
class DomainConfig:
    name: str
    uuid: str
    domain_type: str  # "kvm" or "qemu" (TCG)
    vcpus: int
    memory_mib: int
    disks: tuple[DiskConfig, ...]
    interfaces: tuple[InterfaceConfig, ...]
    console_log: str
    tenant: str = ""
    node: str = ""  # owning compute node: several nodes may share one libvirtd (tests, e2e)
    tb_cache_mib: int | None = None  # TCG only; None: tb_cache_mib(memory_mib)
    machine: str = "pc"

    def to_xml(self) -> str:
        return ET.tostring(self.to_element(), encoding="unicode")

    def to_element(self) -> ET.Element:
        dom = ET.Element("domain", type=self.domain_type)
        _text(dom, "name", self.name)
        _text(dom, "uuid", self.uuid)
        meta = ET.SubElement(dom, "metadata")
        inst = ET.SubElement(meta, "skyport:instance", {"xmlns:skyport": METADATA_NS})
        _text(inst, "skyport:node", self.node)
        _text(inst, "skyport:tenant", self.tenant)
        for nic in self.interfaces:
            if nic.foreign:  # what the node needs to bridge the tap once it moved it in
                ET.SubElement(inst, "skyport:nic", tap=nic.tap, bridge=nic.bridge, mtu=str(nic.mtu))
        _text(dom, "memory", str(self.memory_mib), unit="MiB")
        _text(dom, "vcpu", str(self.vcpus), placement="static")

        os_el = ET.SubElement(dom, "os")
        _text(os_el, "type", "hvm", arch="x86_64", machine=self.machine)
        ET.SubElement(os_el, "boot", dev="hd")

        features = ET.SubElement(dom, "features")
        ET.SubElement(features, "acpi")  # the power button is how stop() asks nicely
        if self.domain_type == "qemu":
            tcg = ET.SubElement(features, "tcg")
            size = self.tb_cache_mib if self.tb_cache_mib is not None else tb_cache_mib(self.memory_mib)
            _text(tcg, "tb-cache", str(size), unit="MiB")

        _text(dom, "on_poweroff", "destroy")
        _text(dom, "on_reboot", "restart")
        _text(dom, "on_crash", "destroy")

        devices = ET.SubElement(dom, "devices")
        for disk in self.disks:
            devices.append(disk.to_element())
        for nic in self.interfaces:
            n = ET.SubElement(devices, "interface", type="ethernet" if nic.foreign else "bridge")
            ET.SubElement(n, "mac", address=nic.mac)
            if not nic.foreign:
                ET.SubElement(n, "source", bridge=nic.bridge)
            ET.SubElement(n, "target", dev=nic.tap)
            ET.SubElement(n, "model", type="virtio")
            ET.SubElement(n, "mtu", size=str(nic.mtu))
            ET.SubElement(n, "rom", enabled="no")
        # A pty, so the console is interactive (compute/console); libvirt's <log> keeps the file
        # the portal's console tail reads, whether or not anyone is attached.
        serial = ET.SubElement(devices, "serial", type="pty")
        ET.SubElement(serial, "log", file=self.console_log, append="on")
        ET.SubElement(serial, "target", port="0")
        console = ET.SubElement(devices, "console", type="pty")
        ET.SubElement(console, "target", type="serial", port="0")
        ET.SubElement(devices, "controller", type="usb", model="none")
        ET.SubElement(devices, "memballoon", model="none")
        return dom


def _text(parent: ET.Element, tag: str, text: str, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    el.text = text
    return el


def metadata_node(metadata_xml: str) -> str | None:
    """Owning node recorded in a domain's Skyport metadata element (from virDomainGetMetadata)."""
    root = ET.fromstring(metadata_xml)  # noqa: S314 - XML from libvirtd
    return root.findtext(f"{{{METADATA_NS}}}node", default=root.findtext("node"))


def metadata_nics(metadata_xml: str) -> list[tuple[str, str, int]]:
    """(tap, bridge, mtu) of the NICs the node bridges itself (libvirtd in another namespace)."""
    root = ET.fromstring(metadata_xml)  # noqa: S314 - XML from libvirtd
    return [
        (el.get("tap", ""), el.get("bridge", ""), int(el.get("mtu", "1500")))
        for el in [*root.iter(f"{{{METADATA_NS}}}nic"), *root.iter("nic")]  # libvirtd drops the prefix
    ]


def disk_sources(domain_xml: str) -> dict[str, str]:
    """Target (``vda``…) to source file of every file-backed disk in a domain's XML."""
    root = ET.fromstring(domain_xml)  # noqa: S314 - XML from libvirtd
    found: dict[str, str] = {}
    for disk in root.iter("disk"):
        target, source = disk.find("target"), disk.find("source")
        if target is not None and source is not None and source.get("file"):
            found[target.get("dev", "")] = source.get("file", "")
    return found


def snapshot_xml(name: str, internal: tuple[str, ...], skip: tuple[str, ...] = ()) -> str:
    """Request for an internal (qcow2) snapshot of disks ``internal``; ``skip`` (the seed) is left out."""
    snap = ET.Element("domainsnapshot")
    _text(snap, "name", name)
    disks = ET.SubElement(snap, "disks")
    for target in internal:
        ET.SubElement(disks, "disk", name=target, snapshot="internal")
    for target in skip:
        ET.SubElement(disks, "disk", name=target, snapshot="no")
    return ET.tostring(snap, encoding="unicode")
