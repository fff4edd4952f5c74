"""VM driver: libvirt/QEMU domains named ``sky-<instance_id>``.

Layout under ``config.state_dir``::

    images/<sha256>.<fmt>          verified base images, immutable (imagecache)
    instances/<id>/disk.qcow2      per-VM overlay on a base
    instances/<id>/seed.iso        NoCloud seed (cidata)
    logs/<id>.console.log          serial console; kept after destroy for the portal
    locks/<id>.lock                serialises spawn/destroy of one instance

Every directory is 0755: QEMU runs as libvirt-qemu and must traverse them.
The libvirt connection is opened lazily and per process (Celery forks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import libvirt
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from compute import nsenv
from compute.config import NodeConfig
from compute.drivers import cloudinit
from compute.drivers.accel import choose_domain_type
from compute.drivers.base import (
    Driver,
    DriverError,
    InstanceInfo,
    InstanceNotFound,
    InvalidState,
    Stats,
)
from compute.drivers.common import is_instance_id, tail
from compute.drivers.libvirt_xml import (
    METADATA_NS,
    DiskConfig,
    DomainConfig,
    InterfaceConfig,
    disk_sources,
    metadata_nics,
    metadata_node,
    snapshot_xml,
)
from compute.imagecache import ImageCache, ImageError, create_overlay, remove_tree
from compute.network import bridge
from compute.spec import Capability, InstanceSpec, Kind, PowerState, SnapshotInfo

#: Domains are ``<prefix><instance id>``.  Nodes that share one libvirtd (simulated nodes in tests)
#: need prefixes of their own, as separate hosts would have separate daemons: a VM migrated between
#: two of them exists once per node (stopped on the source until the target runs it).
PREFIX = os.environ.get("SKYPORT_DOMAIN_PREFIX", "sky-")
if not re.fullmatch(r"[a-z][a-z0-9]{0,15}-", PREFIX):
    raise RuntimeError(f"SKYPORT_DOMAIN_PREFIX={PREFIX!r}: a lowercase letter, letters or digits, then '-'")
MAX_NICS = 10
_SNAP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
GIB = 1 << 30
#: guest disks volumes may take (vda is the root disk, vdb the seed)
VOLUME_TARGETS = tuple(f"vd{c}" for c in "cdefghijklmnopqrstuvwxyz")
#: how long a running guest may take to release a hot-unplugged disk
DETACH_SECONDS = 30.0

_STATES: dict[int, PowerState] = {
    libvirt.VIR_DOMAIN_NOSTATE: PowerState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.RUNNING,  # shutting down, still running
    libvirt.VIR_DOMAIN_SHUTOFF: PowerState.SHUTDOWN,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.SUSPENDED,
}

_T = TypeVar("_T")


def domain_name(instance_id: str) -> str:
    return PREFIX + instance_id


def domain_uuid(instance_id: str) -> str:
    """The instance id; under another prefix one derived from it (libvirtd keys domains by UUID too)."""
    if PREFIX == "sky-":
        return instance_id
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"skyport:{PREFIX}{instance_id}"))


def tap_name(instance_id: str, index: int) -> str:
    """Host tap of NIC ``index``: ``skv`` + 8 hex + index, at most 12 characters."""
    return f"skv{instance_id[:8]}{index}"


def power_state(state: int) -> PowerState:
    return _STATES.get(state, PowerState.NOSTATE)


def _is_no_domain(exc: libvirt.libvirtError) -> bool:
    return exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT)


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    return None


class LibvirtDriver(Driver):
    """Nova-style libvirt driver; see :class:`compute.drivers.base.Driver` for contracts."""

    kind = Kind.VM
    capabilities = frozenset(
        {
            Capability.PAUSE,
            Capability.SNAPSHOTS,
            Capability.PUBLISH,
            Capability.CONSOLE,
            Capability.TERMINAL,
            Capability.VOLUMES,
        }
    )

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.domain_type = choose_domain_type(config.accelerator)
        self.images = ImageCache(config.state_dir / "images")
        self._conn: Any = None
        self._conn_pid = 0
        self._conn_lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------------------

    @property
    def conn(self) -> Any:
        """The libvirt connection of this process, (re)opened when needed."""
        with self._conn_lock:
            if self._conn is not None and self._conn_pid == os.getpid():
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
            # A connection inherited over fork() belongs to the parent: drop it unclosed.
            # Errors reach callers as exceptions; libvirt's default handler would also print them.
            libvirt.registerErrorHandler(_ignore_libvirt_error, None)
            try:
                self._conn = libvirt.open(self.config.libvirt_uri)
            except libvirt.libvirtError as exc:
                raise DriverError(f"cannot connect to libvirt at {self.config.libvirt_uri}: {exc}") from exc
            self._conn_pid = os.getpid()
            return self._conn

    def _instance_dir(self, instance_id: str) -> Path:
        return self.config.state_dir / "instances" / instance_id

    def console_log_path(self, instance_id: str) -> Path:
        return self.config.state_dir / "logs" / f"{instance_id}.console.log"

    @staticmethod
    def _mkdir(path: Path) -> Path:
        """Create ``path`` and missing parents as 0755 whatever the umask (QEMU must traverse)."""
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                d.mkdir()
            d.chmod(0o755)
        return path

    @contextlib.contextmanager
    def _locked(self, instance_id: str) -> Iterator[None]:
        locks = self._mkdir(self.config.state_dir / "locks")
        with open(locks / f"{instance_id}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _lookup(self, instance_id: str) -> Any:
        if not is_instance_id(instance_id):
            raise InstanceNotFound(f"no VM with id {instance_id!r}")
        for attempt in (1, 2):
            try:
                return self.conn.lookupByName(domain_name(instance_id))
            except libvirt.libvirtError as exc:
                if _is_no_domain(exc):
                    raise InstanceNotFound(f"no VM {instance_id} on this node") from exc
                if attempt == 1:
                    # libvirtd restarted: the old connection still says it is alive until a call
                    # fails ("Broken pipe"); open a new one and try once more.
                    self._reset_connection()
                    continue
                raise DriverError(f"libvirt lookup of {instance_id} failed: {exc}") from exc
        raise AssertionError("unreachable")

    def _reset_connection(self) -> None:
        with self._conn_lock:
            self._conn = None

    def _maybe(self, instance_id: str) -> Any | None:
        try:
            return self._lookup(instance_id)
        except InstanceNotFound:
            return None

    @staticmethod
    def _call(what: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except libvirt.libvirtError as exc:
            raise DriverError(f"{what} failed: {exc.get_error_message()}") from exc

    def _info(self, dom: Any) -> InstanceInfo:
        name: str = dom.name()
        instance_id = name.removeprefix(PREFIX)
        state, _reason = self._call("state", dom.state)
        pid: int | None = None
        if state != libvirt.VIR_DOMAIN_SHUTOFF:
            with contextlib.suppress(OSError, ValueError):
                pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
        return InstanceInfo(instance_id=instance_id, kind=Kind.VM, power_state=power_state(state), pid=pid)

    def _state(self, dom: Any) -> int:
        state, _reason = self._call("state", dom.state)
        return int(state)

    # -- Driver -----------------------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        try:
            ver = int(self.conn.getLibVersion())
        except Exception as exc:  # never raises: health feeds every heartbeat
            return False, f"libvirt unavailable: {exc}"
        v = f"{ver // 1_000_000}.{ver // 1000 % 1000}.{ver % 1000}"
        return True, f"libvirt {v}, accel={self.domain_type}"

    def domain_config(self, spec: InstanceSpec) -> DomainConfig:
        """The domain definition of ``spec`` (paths under this node's state dir)."""
        if len(spec.networks) > MAX_NICS:
            raise DriverError(f"at most {MAX_NICS} networks per VM")
        idir = self._instance_dir(spec.instance_id)
        return DomainConfig(
            name=domain_name(spec.instance_id),
            uuid=domain_uuid(spec.instance_id),
            domain_type=self.domain_type,
            vcpus=spec.vcpus,
            memory_mib=spec.ram_mb,
            disks=(
                DiskConfig(str(idir / "disk.qcow2"), "vda", "qcow2"),
                DiskConfig(str(idir / "seed.iso"), "vdb", "raw", readonly=True),
            ),
            interfaces=tuple(
                InterfaceConfig(
                    bridge=n.bridge,
                    mac=n.mac,
                    tap=tap_name(spec.instance_id, i),
                    mtu=n.mtu,
                    foreign=bool(self.config.libvirt_netns),
                )
                for i, n in enumerate(spec.networks)
            ),
            console_log=str(self.console_log_path(spec.instance_id)),
            tenant=spec.tenant,
            node=self.config.name,
        )

    def spawn(self, spec: InstanceSpec) -> InstanceInfo:
        if spec.kind is not Kind.VM:
            raise DriverError(f"the VM driver cannot run a {spec.kind.value}")
        with self._locked(spec.instance_id):
            dom = self._maybe(spec.instance_id)
            if dom is not None:
                return self._info(dom)
            with contextlib.ExitStack() as undo:
                idir = self._instance_dir(spec.instance_id)
                self._mkdir(idir.parent)
                undo.callback(remove_tree, idir)
                self._mkdir(idir)
                self._mkdir(self.config.state_dir / "logs")
                try:
                    base = self.images.fetch(spec.image)
                    create_overlay(base, spec.image.format.value, idir / "disk.qcow2", spec.disk_gb * GIB)
                    cloudinit.build_seed(spec, idir / "seed.iso")
                except (ImageError, cloudinit.SeedError) as exc:
                    raise DriverError(str(exc)) from exc
                except OSError as exc:  # disk full, permissions: still the user's one sentence
                    raise DriverError(f"cannot prepare the disks of {spec.instance_id}: {exc}") from exc
                for net in spec.networks:
                    self._ensure_bridge(net.bridge, net.mtu, net.segment.host_address, undo)
                xml = self.domain_config(spec).to_xml()
                dom = self._call("defining the domain", lambda: self.conn.defineXML(xml))
                undo.callback(self._undo_define, dom)
                self._call("starting the domain", dom.create)
                self._adopt_taps(dom)
                undo.pop_all()
            return self._info(dom)

    def _adopt_taps(self, dom: Any) -> None:
        """libvirtd in another network namespace: move the domain's taps here and onto their bridges.

        QEMU keeps its tap file descriptors across the move.  Done right
        after the domain started, before the guest's kernel is up.
        """
        if not self.config.libvirt_netns:
            return
        meta = self._call(
            "reading the NICs", lambda: dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
        )
        nics = metadata_nics(meta)
        here = os.getpid()  # /proc/<pid>/ns/net of the process: this node's namespace

        def move() -> None:
            fd = os.open(self.config.libvirt_netns, os.O_RDONLY)
            try:
                nsenv.setns(fd, nsenv.CLONE_NEWNET)  # this thread only
            finally:
                os.close(fd)
            with IPRoute() as ipr:
                for tap, _, _ in nics:
                    found = ipr.link_lookup(ifname=tap)
                    if found:
                        ipr.link("set", index=found[0], net_ns_pid=here)

        errors: list[BaseException] = []

        def run() -> None:
            try:
                move()
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=run, name="adopt-taps")
        t.start()
        t.join()
        try:
            if errors:
                raise errors[0]
            with IPRoute() as ipr:
                for tap, bridge_name, mtu in nics:
                    (idx,) = ipr.link_lookup(ifname=tap) or (None,)
                    master = ipr.link_lookup(ifname=bridge_name)
                    if idx is None or not master:
                        raise DriverError(f"tap {tap} or bridge {bridge_name} is missing after the move")
                    ipr.link("set", index=idx, mtu=mtu, master=master[0], state="up")
        except (OSError, NetlinkError, ValueError) as exc:
            raise DriverError(f"cannot move the taps of the VM into this node's namespace: {exc}") from exc

    @staticmethod
    def _ensure_bridge(name: str, mtu: int, host_address: str | None, undo: contextlib.ExitStack) -> None:
        existed = bridge.link_exists(name)
        try:
            bridge.ensure_bridge(name, mtu=mtu, address=host_address)
        except (bridge.NetworkError, NetlinkError, OSError) as exc:
            raise DriverError(f"cannot prepare bridge {name}: {exc}") from exc
        if not existed:
            # Bridges belong to the network; drop one only if this spawn made it and it stayed empty.
            def drop() -> None:
                with contextlib.suppress(bridge.NetworkError, NetlinkError, OSError):
                    if not bridge.bridge_ports(name):
                        bridge.delete_bridge(name)

            undo.callback(drop)

    def _undo_define(self, dom: Any) -> None:
        # Undo must not hide the error that caused it; a leftover domain shows up in list().
        with contextlib.suppress(libvirt.libvirtError):
            self._undefine(dom)

    def _undefine(self, dom: Any) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        basic = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        full = basic | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        try:
            try:
                dom.undefineFlags(full)
            except libvirt.libvirtError as exc:
                # Drivers without NVRAM/checkpoint support (the test driver) reject those flags.
                if exc.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
                    raise
                dom.undefineFlags(basic)
        except libvirt.libvirtError as exc:
            if not _is_no_domain(exc):
                raise

    def destroy(self, instance_id: str) -> None:
        if not is_instance_id(instance_id):
            raise InstanceNotFound(f"no VM with id {instance_id!r}")
        with self._locked(instance_id):
            dom = self._maybe(instance_id)
            if dom is not None:
                try:
                    self._undefine(dom)
                except libvirt.libvirtError as exc:
                    raise DriverError(f"cannot remove VM {instance_id}: {exc.get_error_message()}") from exc
            remove_tree(self._instance_dir(instance_id))
        (self.config.state_dir / "locks" / f"{instance_id}.lock").unlink(missing_ok=True)

    def start(self, instance_id: str) -> InstanceInfo:
        dom = self._lookup(instance_id)
        if self._state(dom) in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
            self._call("start", dom.create)
            self._adopt_taps(dom)
        return self._info(dom)

    def stop(
        self, instance_id: str, timeout: float = 30.0, force: bool = False, force_after: bool = True
    ) -> InstanceInfo:
        dom = self._lookup(instance_id)
        state = self._state(dom)
        if state == libvirt.VIR_DOMAIN_SHUTOFF:
            return self._info(dom)
        # A paused guest cannot see the power button.
        if not force and state != libvirt.VIR_DOMAIN_PAUSED:
            # Fails when already going down or without ACPI: forced below either way.
            with contextlib.suppress(libvirt.libvirtError):
                dom.shutdown()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._state(dom) == libvirt.VIR_DOMAIN_SHUTOFF:
                    return self._info(dom)
                time.sleep(0.05)
        if not force and not force_after:
            if state == libvirt.VIR_DOMAIN_PAUSED:
                raise InvalidState(
                    f"VM {instance_id} is paused and cannot see the power button; not forced off"
                )
            # the button was pressed: a slow guest may still go down by itself later
            raise InvalidState(
                f"VM {instance_id} did not shut down within {timeout:g} s (ACPI power button); "
                "left running, not forced off"
            )
        try:
            dom.destroy()
        except libvirt.libvirtError as exc:
            if self._state(dom) != libvirt.VIR_DOMAIN_SHUTOFF:
                raise DriverError(f"cannot stop VM {instance_id}: {exc.get_error_message()}") from exc
        return self._info(dom)

    def reboot(self, instance_id: str) -> InstanceInfo:
        dom = self._lookup(instance_id)
        if self._state(dom) != libvirt.VIR_DOMAIN_RUNNING:
            raise InvalidState(f"VM {instance_id} is not running")
        # A hard reset: the guest needs no agent and it cannot be ignored.
        self._call("reboot", lambda: dom.reset(0))
        return self._info(dom)

    def pause(self, instance_id: str) -> InstanceInfo:
        dom = self._lookup(instance_id)
        state = self._state(dom)
        if state == libvirt.VIR_DOMAIN_RUNNING:
            self._call("pause", dom.suspend)
        elif state != libvirt.VIR_DOMAIN_PAUSED:
            raise InvalidState(f"VM {instance_id} is not running")
        return self._info(dom)

    def resume(self, instance_id: str) -> InstanceInfo:
        dom = self._lookup(instance_id)
        state = self._state(dom)
        if state == libvirt.VIR_DOMAIN_PAUSED:
            self._call("resume", dom.resume)
        elif state != libvirt.VIR_DOMAIN_RUNNING:
            raise InvalidState(f"VM {instance_id} is not paused")
        return self._info(dom)

    def export_disk(self, instance_id: str, dest: Path) -> None:
        """Flatten the VM's overlay and its base into a standalone qcow2 at ``dest``.

        A running VM is paused for the copy and resumed after, so the disk is
        crash-consistent (as after a power cut); stop the VM first for a
        clean file system.
        """
        dom = self._lookup(instance_id)
        disk = self._instance_dir(instance_id) / "disk.qcow2"
        if not disk.is_file():
            raise DriverError(f"VM {instance_id} has no disk at {disk}")
        paused_here = False
        if self._state(dom) == libvirt.VIR_DOMAIN_RUNNING:
            self._call("pause", dom.suspend)
            paused_here = True
        try:
            proc = subprocess.run(
                ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", str(disk), str(dest)],
                check=False,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                dest.unlink(missing_ok=True)
                raise DriverError(f"qemu-img convert failed: {proc.stderr.strip()[-300:]}")
        finally:
            if paused_here:
                self._call("resume", dom.resume)

    # -- snapshots (internal, in the qcow2 overlay) --------------------------------------------

    @staticmethod
    def _check_snapshot_name(name: str) -> None:
        if not _SNAP_RE.fullmatch(name):
            raise DriverError("snapshot names are 1-64 of letters, digits, '.', '_' and '-'")

    @staticmethod
    def _snapshot_info(snap: Any) -> SnapshotInfo:
        root = ET.fromstring(snap.getXMLDesc(0))  # noqa: S314 - XML from libvirtd
        created = float(root.findtext("creationTime") or 0)
        return SnapshotInfo(name=str(snap.getName()), created_at=created)

    def snapshot(self, instance_id: str, name: str) -> SnapshotInfo:
        self._check_snapshot_name(name)
        dom = self._lookup(instance_id)
        with contextlib.suppress(libvirt.libvirtError):
            return self._snapshot_info(dom.snapshotLookupByName(name, 0))
        # every writable disk, attached volumes too: libvirt takes a running VM's memory snapshot
        # only with all of them inside it, and a revert then returns the volumes with the VM
        disks = disk_sources(self._call("domain XML", lambda: dom.XMLDesc(0)))
        xml = snapshot_xml(name, internal=tuple(t for t in disks if t != "vdb"), skip=("vdb",))
        snap = self._call("snapshot", lambda: dom.snapshotCreateXML(xml, 0))
        return self._snapshot_info(snap)

    def _find_snapshot(self, dom: Any, instance_id: str, name: str) -> Any:
        try:
            return dom.snapshotLookupByName(name, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                raise DriverError(f"VM {instance_id} has no snapshot {name!r}") from exc
            raise DriverError(f"snapshot lookup failed: {exc.get_error_message()}") from exc

    def revert(self, instance_id: str, name: str) -> InstanceInfo:
        self._check_snapshot_name(name)
        dom = self._lookup(instance_id)
        snap = self._find_snapshot(dom, instance_id, name)
        self._call("revert", lambda: dom.revertToSnapshot(snap, 0))
        return self._info(dom)

    def delete_snapshot(self, instance_id: str, name: str) -> None:
        self._check_snapshot_name(name)
        dom = self._lookup(instance_id)
        try:
            snap = dom.snapshotLookupByName(name, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                return
            raise DriverError(f"snapshot lookup failed: {exc.get_error_message()}") from exc
        self._call("delete snapshot", lambda: snap.delete(0))

    def list_snapshots(self, instance_id: str, sizes: bool = False) -> list[SnapshotInfo]:
        dom = self._lookup(instance_id)
        snaps = self._call("list snapshots", lambda: dom.listAllSnapshots(0))
        found = sorted((self._snapshot_info(s) for s in snaps), key=lambda s: (s.created_at, s.name))
        if not sizes or not found:
            return found
        measured = self._snapshot_sizes(instance_id)
        return [dataclasses.replace(s, size_bytes=measured.get(s.name, 0)) for s in found]

    def _snapshot_sizes(self, instance_id: str) -> dict[str, int]:
        """``vm-state-size`` of each internal snapshot, read with ``qemu-img info -U`` (shared lock)."""
        disk = self._instance_dir(instance_id) / "disk.qcow2"
        cmd = ["qemu-img", "info", "-U", "--output=json", str(disk)]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise DriverError(f"qemu-img info failed: {proc.stderr.strip()[-300:]}")
        snaps = json.loads(proc.stdout).get("snapshots") or []
        return {str(s.get("name")): int(s.get("vm-state-size") or 0) for s in snaps}

    # -- resize (stopped VMs) ---------------------------------------------------------------------

    def resize(self, instance_id: str, vcpus: int, ram_mb: int, disk_gb: int) -> InstanceInfo:
        with self._locked(instance_id):
            dom = self._lookup(instance_id)
            if self._state(dom) not in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
                raise InvalidState(f"VM {instance_id} must be stopped to be resized")
            disk = self._instance_dir(instance_id) / "disk.qcow2"
            if disk_gb:
                info = json.loads(self._qemu_img_out("info", "-U", "--output=json", str(disk)))
                if disk_gb * GIB > int(info["virtual-size"]):
                    if info.get("snapshots"):
                        raise DriverError(
                            f"VM {instance_id} has snapshots; delete them before growing its disk (qcow2 "
                            "cannot resize an image with internal snapshots)"
                        )
                    self._qemu_img_out("resize", "-q", "-f", "qcow2", str(disk), str(disk_gb * GIB))
            config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
            self._call("setting the memory", lambda: dom.setMaxMemory(ram_mb * 1024))
            self._call("setting the memory", lambda: dom.setMemoryFlags(ram_mb * 1024, config))
            maximum = config | libvirt.VIR_DOMAIN_VCPU_MAXIMUM
            self._call("setting the vCPUs", lambda: dom.setVcpusFlags(vcpus, maximum))
            self._call("setting the vCPUs", lambda: dom.setVcpusFlags(vcpus, config))
            return self._info(dom)

    @staticmethod
    def _qemu_img_out(*args: str) -> str:
        proc = subprocess.run(["qemu-img", *args], check=False, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise DriverError(f"qemu-img {args[0]} failed: {proc.stderr.strip()[-300:]}")
        return proc.stdout

    # -- volumes (virtio disks vdc…; hot on a running VM, persistent in the definition) ------------

    def _disks(self, dom: Any) -> tuple[dict[str, str], dict[str, str]]:
        """(persistent, live) target -> source file; live is empty when the VM is not running."""
        config = disk_sources(self._call("domain XML", lambda: dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
        live = disk_sources(self._call("domain XML", lambda: dom.XMLDesc(0))) if dom.isActive() else {}
        return config, live

    def attach_volume(self, instance_id: str, volume_id: str, path: Path, mount_path: str = "") -> str:
        with self._locked(instance_id):
            dom = self._lookup(instance_id)
            config, live = self._disks(dom)
            for target, source in (config | live).items():
                if source == str(path):
                    return target
            free = [t for t in VOLUME_TARGETS if t not in config and t not in live]
            if not free:
                raise DriverError(
                    f"VM {instance_id} has no free disk slot (at most {len(VOLUME_TARGETS)} volumes)"
                )
            disk = DiskConfig(str(path), free[0], "qcow2", serial=volume_id[:20])
            flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
            if dom.isActive():
                flags |= (
                    libvirt.VIR_DOMAIN_AFFECT_LIVE
                )  # libvirt saves the definition only if the live part worked
            self._call("attaching the volume", lambda: dom.attachDeviceFlags(disk.to_xml(), flags))
            return free[0]

    def detach_volume(self, instance_id: str, volume_id: str, path: Path) -> None:
        with self._locked(instance_id):
            dom = self._lookup(instance_id)
            config, live = self._disks(dom)
            target = next((t for t, s in (config | live).items() if s == str(path)), None)
            if target is None:
                return
            if target in ("vda", "vdb"):
                raise DriverError(f"{target} is not a volume of VM {instance_id}")
            disk = DiskConfig(str(path), target, "qcow2", serial=volume_id[:20]).to_xml()
            if target in config:
                self._call(
                    "detaching the volume",
                    lambda: dom.detachDeviceFlags(disk, libvirt.VIR_DOMAIN_AFFECT_CONFIG),
                )
            if target in live:
                self._call(
                    "detaching the volume",
                    lambda: dom.detachDeviceFlags(disk, libvirt.VIR_DOMAIN_AFFECT_LIVE),
                )
                # the guest releases the disk (ACPI hot-unplug) some time after the call returns
                end = time.monotonic() + DETACH_SECONDS
                while target in self._disks(dom)[1]:
                    if time.monotonic() > end:
                        raise DriverError(
                            f"the guest of VM {instance_id} did not release {target} within "
                            f"{DETACH_SECONDS:g} s; stop the VM and detach again"
                        )
                    time.sleep(0.05)

    def volume_attachments(self, volumes: Path) -> list[tuple[str, str]]:
        found = []
        for info in self.list():
            dom = self._maybe(info.instance_id)
            if dom is None:
                continue
            with contextlib.suppress(DriverError, libvirt.libvirtError):
                config, live = self._disks(dom)
                for source in set(config.values()) | set(live.values()):
                    p = Path(source)
                    if p.parent == volumes and p.suffix == ".qcow2":
                        found.append((p.stem, info.instance_id))
        return sorted(found)

    # -- observation ------------------------------------------------------------------------------

    def info(self, instance_id: str) -> InstanceInfo:
        return self._info(self._lookup(instance_id))

    def list(self) -> list[InstanceInfo]:
        """Domains ``sky-<uuid>`` that this node defined (several nodes may share a libvirtd)."""
        try:
            doms = self.conn.listAllDomains(0)
        except libvirt.libvirtError:
            self._reset_connection()  # a restarted libvirtd: one more try on a new connection
            doms = self._call("list domains", lambda: self.conn.listAllDomains(0))
        out = []
        for dom in doms:
            name = dom.name()
            if not (name.startswith(PREFIX) and is_instance_id(name.removeprefix(PREFIX))):
                continue
            with contextlib.suppress(DriverError, libvirt.libvirtError):  # vanished meanwhile
                meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
                if metadata_node(meta) == self.config.name:
                    out.append(self._info(dom))
        return sorted(out, key=lambda i: i.instance_id)

    def stats(self, instance_id: str) -> Stats:
        dom = self._lookup(instance_id)
        # The domain may vanish at any call (a delete on another worker process): every libvirt
        # call below must fail as a DriverError, which heartbeats treat as "no counters this time".
        _state, max_kib, mem_kib, _vcpus, cpu_ns = self._call("stats", dom.info)
        if not self._call("stats", dom.isActive):
            return Stats(cpu_time_ns=0, memory_bytes=0, memory_limit_bytes=int(max_kib) * 1024)
        memory = int(mem_kib) * 1024
        with contextlib.suppress(libvirt.libvirtError):
            rss = dom.memoryStats().get("rss")
            if rss:
                memory = int(rss) * 1024
        rd = wr = rx = tx = None
        with contextlib.suppress(libvirt.libvirtError):
            blk = dom.blockStats("vda")
            rd, wr = int(blk[1]), int(blk[3])
        root = ET.fromstring(self._call("stats", lambda: dom.XMLDesc(0)))  # noqa: S314 - XML from libvirtd
        for target in root.iterfind("./devices/interface/target"):
            with contextlib.suppress(libvirt.libvirtError):
                nic = dom.interfaceStats(target.get("dev"))
                rx = (rx or 0) + int(nic[0])
                tx = (tx or 0) + int(nic[4])
        return Stats(
            cpu_time_ns=int(cpu_ns),
            memory_bytes=memory,
            memory_limit_bytes=int(max_kib) * 1024,
            disk_read_bytes=rd,
            disk_write_bytes=wr,
            net_rx_bytes=rx,
            net_tx_bytes=tx,
        )

    def serial_pty(self, instance_id: str) -> str:
        # The pty QEMU opened for <serial type='pty'>; its path is only in the live XML.
        dom = self._lookup(instance_id)
        if self._state(dom) != libvirt.VIR_DOMAIN_RUNNING:
            raise InvalidState(f"VM {instance_id} is not running")
        root = ET.fromstring(self._call("XMLDesc", lambda: dom.XMLDesc(0)))  # noqa: S314 - from libvirtd
        source = root.find("./devices/serial[@type='pty']/source")
        path = source.get("path") if source is not None else None
        if not path or not path.startswith("/dev/pts/"):
            raise DriverError(f"VM {instance_id} has no serial pty (defined before consoles existed?)")
        return path

    def console_log(self, instance_id: str, max_bytes: int = 65536) -> str:
        text = tail(self.console_log_path(instance_id), max_bytes)
        if text is None:
            self._lookup(instance_id)  # InstanceNotFound if there is no such VM either
            return ""
        return text
