"""Real workloads for tests: the Debian cloud guest and the OCI app images of images/debian.

They are built once per machine into /var/cache/skyport/test-images/<key>/
(`make test-images`, which `make test` runs before pytest).  A test asks for the
session fixture ``workload_images`` (registered in tests/conftest.py) and gets
their paths; when they are missing the test skips, or fails with the command to
run when ``CI`` is set (tests/hostcaps.py).  Nothing here builds: a cold build
takes minutes and belongs to make, not to a test's timing.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from compute.spec import ImageFormat, ImageRef
from images.debian import testimages
from tests.hostcaps import require


@dataclass(frozen=True)
class WorkloadImages:
    """Paths of one complete cache entry, plus its ``images.json``."""

    root: Path
    manifest: dict[str, Any]

    def path(self, name: str) -> Path:
        return self.root / str(self.manifest["files"][name]["file"])

    def sha256(self, name: str) -> str:
        return str(self.manifest["files"][name]["sha256"])

    @property
    def cloud(self) -> Path:
        """debian-cloud.qcow2: Debian 12, systemd, cloud-init 22.4, openssh-server; user ``debian``."""
        return self.path("debian-cloud")

    @property
    def nginx(self) -> Path:
        return self.path("nginx")

    @property
    def pyhttp(self) -> Path:
        return self.path("pyhttp")

    @property
    def pyhttp_docker(self) -> Path:
        return self.path("pyhttp-docker")

    @property
    def crashloop(self) -> Path:
        return self.path("crashloop")

    @property
    def devnodes(self) -> Path:
        return self.path("debian-devnodes")


def find() -> WorkloadImages | None:
    """The cache entry for the current builder sources, or None when it is not built."""
    entry = testimages.cached()
    if entry is None:
        return None
    return WorkloadImages(entry, json.loads((entry / testimages.MANIFEST).read_text()))


@pytest.fixture(scope="session")
def workload_images() -> WorkloadImages:
    found = find()
    require(
        found is not None,
        f"the test workload images (key {testimages.key()}) are not in {testimages.cache_root()}: "
        "run `make test-images` (images/debian/build.sh --cache; a few minutes once per machine)",
    )
    assert found is not None
    return found


# ------------------------------------------------------------------- reaching the Debian guest


def pick_subnet() -> ipaddress.IPv4Network:
    """A random /24 of this run's test pool (SKYPORT_TEST_NETWORK_POOL), apart from other runs'."""
    pool = ipaddress.IPv4Network(os.environ.get("SKYPORT_TEST_NETWORK_POOL", "198.19.224.0/19"))
    subnets = list(pool.subnets(new_prefix=24)) if pool.prefixlen <= 24 else [pool]
    return subnets[secrets.randbelow(len(subnets))]


def sshd_answers(address: str) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=1) as s:
            s.settimeout(2)
            return s.recv(64).startswith(b"SSH-2.0-")
    except OSError:
        return False


def ssh(key: Path, address: str, command: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run ``command`` as the guest's default user; ``timeout`` leaves room for a TCG guest on a
    loaded 2-core host (python3 and curl starting took over 60 s at load 8)."""
    return subprocess.run(
        ["ssh", "-i", str(key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
         f"debian@{address}", command],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def cloud_ref(path: Path, sha256: str) -> ImageRef:
    return ImageRef("debian-cloud", "12", ImageFormat.QCOW2, f"sha256:{sha256}", str(path))


def wait_ssh_login(key: Path, address: str, deadline: float) -> tuple[float, float]:
    """Wait until sshd answers, then until ``ssh -i key debian@address true`` works.

    Returns the monotonic times of both moments; raises TimeoutError naming what never came
    (sshd can answer a moment before cloud-init has written the key).
    """
    end = time.monotonic() + deadline
    while not sshd_answers(address):
        if time.monotonic() > end:
            raise TimeoutError(f"sshd on {address} did not answer within {deadline:.0f} s")
        time.sleep(0.5)
    banner = time.monotonic()
    while (result := ssh(key, address, "true")).returncode != 0:
        if time.monotonic() > end:
            raise TimeoutError(
                f"ssh debian@{address} refused within {deadline:.0f} s: {result.stderr.strip()}"
            )
        time.sleep(1)
    return banner, time.monotonic()
