"""Fixtures for the container driver tests (import them into a test module).

Everything a test creates is named ``skc`` + a random suffix and lives in
198.19.0.0/16; every fixture tears down what it made, also on failure.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from compute.config import NodeConfig
from compute.drivers.container import ContainerDriver, cgroups_path, container_id
from compute.network import bridge as bridges
from compute.network import veth
from compute.spec import ImageFormat, ImageRef, InstanceSpec, Kind, NetworkAttachment, NetworkSegment
from tests.hostcaps import require_binary, require_root

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "images" / "sample_container" / "build.sh"


def require_container_host() -> None:
    require_root()
    for binary in ("crun", "conmon"):
        require_binary(binary)


@dataclass(frozen=True)
class SampleImages:
    base: ImageRef
    web: ImageRef


def _ref(path: Path, name: str, version: str) -> ImageRef:
    digest = (path.parent / (path.name + ".sha256")).read_text().split()[0]
    return ImageRef(name, version, ImageFormat.OCI, f"sha256:{digest}", str(path))


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory: pytest.TempPathFactory) -> SampleImages:
    out = tmp_path_factory.mktemp("oci-images")
    subprocess.run([str(BUILD), str(out)], check=True, capture_output=True)
    base = next(out.glob("busybox-[0-9]*.oci.tar"))
    web = next(out.glob("busybox-web-*.oci.tar"))
    version = base.name.removeprefix("busybox-").removesuffix(".oci.tar")
    return SampleImages(_ref(base, "busybox", version), _ref(web, "busybox-web", version))


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[ContainerDriver]:
    require_container_host()
    state = tmp_path / "node"
    config = NodeConfig(
        name=f"skc{secrets.token_hex(3)}",
        state_dir=state,
        libvirt_uri="test:///default",
        accelerator="qemu",
        container_runtime="crun",
        broker_url="memory://",
    )
    drv = ContainerDriver(config)
    try:
        yield drv
    finally:
        base = state / "containers"
        if base.exists():
            for d in base.iterdir():
                if d.name.startswith("sky-"):
                    drv.destroy(d.name.removeprefix("sky-"))
        shutil.rmtree(state, ignore_errors=True)


@dataclass(frozen=True)
class BridgeNet:
    bridge: str
    network: ipaddress.IPv4Network

    def attachment(self, host: int) -> NetworkAttachment:
        addr = self.network.network_address + host
        mac = "02:5c:" + ":".join(f"{b:02x}" for b in addr.packed)
        return NetworkAttachment(NetworkSegment("test", self.bridge), f"{addr}/{self.network.prefixlen}", mac)

    def address(self, host: int) -> str:
        return str(self.network.network_address + host)


@pytest.fixture
def testnet() -> Iterator[BridgeNet]:
    require_root()
    name = f"skc{secrets.token_hex(4)}"
    # below 198.19.224.0/19, the portal's test network pool (settings_test): a bridge of this fixture must
    # never carry a tenant network's subnet while a portal test on the same host places that network
    net = ipaddress.IPv4Network(f"198.19.{random.randint(1, 223)}.0/24")
    bridges.ensure_bridge(name, address=f"{net.network_address + 1}/24")
    try:
        yield BridgeNet(name, net)
    finally:
        bridges.delete_bridge(name)


def make_spec(
    image: ImageRef,
    *,
    command: tuple[str, ...] = (),
    networks: tuple[NetworkAttachment, ...] = (),
    ram_mb: int = 32,
    pids_limit: int = 64,
    cpu_quota_percent: int = 100,
    hostname: str = "box1",
) -> InstanceSpec:
    return InstanceSpec(
        instance_id=str(uuid.uuid4()),
        name=hostname,
        hostname=hostname,
        tenant="acme",
        kind=Kind.CONTAINER,
        vcpus=1,
        ram_mb=ram_mb,
        disk_gb=0,
        image=image,
        networks=networks,
        command=command,
        cpu_quota_percent=cpu_quota_percent,
        pids_limit=pids_limit,
    )


def leftovers(drv: ContainerDriver, spec: InstanceSpec) -> list[str]:
    """Everything of ``spec`` still on the host (empty when cleanly gone)."""
    found = []
    cg = cgroups_path(spec.instance_id).lstrip("/")
    for controller in (
        "memory",
        "cpu",
        "cpuacct",
        "pids",
        "freezer",
        "devices",
        "blkio",
        "cpuset",
        "systemd",
    ):
        if (Path("/sys/fs/cgroup") / controller / cg).exists():
            found.append(f"cgroup {controller}/{cg}")
    inst = drv.base / container_id(spec.instance_id)
    with open("/proc/self/mountinfo") as fh:
        found += [f"mount {line.split()[4]}" for line in fh if str(inst) in line]
    if inst.exists():
        found.append(f"state dir {inst}")
    for i in range(max(1, len(spec.networks))):
        name = veth.host_ifname(spec.short_id, i)
        if bridges.link_exists(name):
            found.append(f"veth {name}")
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if container_id(spec.instance_id).encode() in cmd:
                found.append(f"process {pid}: {cmd[:60]!r}")
    if drv._crun_state(spec.instance_id) is not None:
        found.append("crun state")
    return found
