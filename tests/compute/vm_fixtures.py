"""Fixtures for the VM driver tests (import them into a test module).

The state dir lives under /var/lib/skyport (0755 all the way) because QEMU
runs as libvirt-qemu and cannot traverse pytest's 0700 tmp_path.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compute.config import NodeConfig
from compute.spec import ImageFormat, ImageRef, InstanceSpec, Kind, NetworkAttachment

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = Path(os.environ.get("SKYPORT_TEST_IMAGE_DIR", REPO / "var" / "images"))
TEST_ROOT = Path("/var/lib/skyport")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def build_sample_image() -> Path:
    """Build (or find) the tiny sample VM image; returns its qcow2 path."""
    proc = subprocess.run(
        [str(REPO / "images" / "sample_vm" / "build.sh"), str(IMAGE_DIR)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return Path(proc.stdout.strip().splitlines()[-1])


def image_ref(path: Path) -> ImageRef:
    return ImageRef(
        name="skyport-tiny",
        version=path.stem.removeprefix("skyport-tiny-"),
        format=ImageFormat.QCOW2,
        digest="sha256:" + sha256_file(path),
        location=str(path),
    )


def make_state_dir() -> Path:
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    TEST_ROOT.chmod(0o755)
    path = TEST_ROOT / f"test-vm-{secrets.token_hex(4)}"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    return path


def node_config(
    state_dir: Path, uri: str = "qemu:///system", accel: str = "qemu", node: str = "test-node"
) -> NodeConfig:
    return NodeConfig(
        name=node,
        state_dir=state_dir,
        libvirt_uri=uri,
        accelerator=accel,
        container_runtime="crun",
        broker_url="memory://",
    )


def vm_spec(
    image: ImageRef,
    networks: tuple[NetworkAttachment, ...] = (),
    hostname: str = "tiny",
    ram_mb: int = 128,
    **kw: object,
) -> InstanceSpec:
    return InstanceSpec(
        instance_id=str(uuid.uuid4()),
        name=hostname,
        hostname=hostname,
        tenant="acme",
        kind=Kind.VM,
        vcpus=1,
        ram_mb=ram_mb,
        disk_gb=0,
        image=image,
        networks=networks,
        **kw,  # type: ignore[arg-type]
    )


def wait_for(what: str, check: Callable[[], bool], deadline: float, interval: float = 0.1) -> None:
    """Poll ``check`` until true; fail the test naming ``what`` after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline:.0f} s waiting for {what}")
        time.sleep(interval)


def random_mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


@pytest.fixture(scope="module")
def vm_state_dir() -> Iterator[Path]:
    path = make_state_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def test_bridge() -> Iterator[tuple[str, int]]:
    """A bridge name ``skt<hex>`` and a free-ish N for 198.18.N.0/24; yields (name, N).

    The bridge is made by the first spawn (host address from the spec's
    ``host_address``) and always deleted here.
    """
    from compute.network import bridge

    name = f"skt{secrets.token_hex(4)}"
    n = secrets.randbelow(254) + 1
    try:
        yield name, n
    finally:
        bridge.delete_bridge(name)
