"""Host capability checks for tests that run for real (root, libvirtd, crun).

Outside CI a missing capability skips the test with the reason.  With ``CI``
set it fails the test instead: CI must never pass by skipping real tests.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def require(ok: bool, what: str) -> None:
    """Skip (locally) or fail (in CI) unless ``ok``; ``what`` names the need."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"host capability missing in CI: {what}", pytrace=False)
    pytest.skip(f"host capability missing: {what}")


def require_root() -> None:
    require(os.geteuid() == 0, "root (run the suite as root, as `make test` does)")


def require_binary(name: str) -> None:
    require(shutil.which(name) is not None, f"{name} on PATH (installed by `make test`)")


def require_libvirtd(uri: str = "qemu:///system") -> None:
    require_root()
    try:
        import libvirt

        conn = libvirt.open(uri)
        conn.close()
        ok, why = True, ""
    except Exception as exc:  # libvirt raises libvirtError or ImportError
        ok, why = False, str(exc)
    require(ok, f"a running libvirtd at {uri} (`make test` starts one): {why}")


#: tests/run runs some libvirt tests in another lane than tests/faults, whose libvirtd test kills
#: the host's libvirtd: that test holds this lock alone, the others share it (flock, released
#: when the holder exits, however it ends)
LIBVIRTD_LOCK = Path("/run/skyport-tests-libvirtd.lock")


@contextmanager
def libvirtd_lock(alone: bool, timeout: float = 900.0) -> Iterator[None]:
    """Hold the host libvirtd's test lock: shared while a test uses libvirtd, ``alone`` while one
    kills it.  Waits up to ``timeout`` seconds, then fails the test saying who holds it."""
    fd = os.open(LIBVIRTD_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if alone else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"{LIBVIRTD_LOCK} still held after {timeout:.0f} s by another test lane",
                        pytrace=False,
                    )
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)  # releases the lock
