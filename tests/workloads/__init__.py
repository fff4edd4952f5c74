"""Real workloads for tests: the Debian cloud guest and the OCI app images of images/debian.

They are built once per machine into /var/cache/skyport/test-images/<key>/
(`make test-images`, which `make test` runs before pytest).  A test asks for the
session fixture ``workload_images`` (registered in tests/conftest.py) and gets
their paths; when they are missing the test skips, or fails with the command to
run when ``CI`` is set (tests/hostcaps.py).  Nothing here builds: a cold build
takes minutes and belongs to make, not to a test's timing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

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
