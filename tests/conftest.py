from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from tests import netcleanup
from tests.hostcaps import libvirtd_lock

# The Debian cloud guest and OCI app images (tests/workloads), for any test that names the fixture.
from tests.workloads import workload_images  # noqa: F401

_pool_mark: list[socket.socket] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    """Claim the run's tenant network pool; alone on it, first sweep what killed runs left there."""
    pool = settings.SKYPORT_NETWORK_POOL
    mark, alone = netcleanup.claim_test_pool(pool)
    _pool_mark.append(mark)
    if not alone or os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("nft")):
        return
    try:
        removed = netcleanup.sweep_stale(pool)
    except netcleanup.PoolTaken as exc:
        pytest.exit(f"tests: {exc}", returncode=4)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for what in removed:
        if reporter is not None:
            reporter.write_line(f"tests: removed a killed run's leftover in {pool}: {what}")


@pytest.fixture(autouse=True, scope="session")
def _private_image_store() -> Iterator[None]:
    """The run's own image store (settings_test names it by PID); gone when the run ends."""
    yield
    store = Path(settings.SKYPORT_IMAGE_STORE)
    if store.name.startswith("test-store-"):
        shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(autouse=True)
def _beside_the_faults() -> Iterator[None]:
    """tests/run runs a few host tests in its other lanes, beside the host lane's tests/faults,
    whose libvirtd test kills the host's libvirtd: there (SKYPORT_TESTS_BESIDE_FAULTS set) each
    test holds the libvirtd lock shared, which that test takes alone (tests/hostcaps.py)."""
    if not os.environ.get("SKYPORT_TESTS_BESIDE_FAULTS"):
        yield
        return
    with libvirtd_lock(alone=False):
        yield
