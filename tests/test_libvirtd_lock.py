"""The libvirtd lock of tests/run's lanes: shared holders exclude the one that kills libvirtd."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import hostcaps
from tests.hostcaps import libvirtd_lock

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o600)
fcntl.flock(fd, fcntl.LOCK_SH)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_shared_holders_keep_the_killer_waiting_and_then_let_it_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = tmp_path / "libvirtd.lock"
    monkeypatch.setattr(hostcaps, "LIBVIRTD_LOCK", lock)
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        with libvirtd_lock(alone=False):  # another sharer gets in at once
            pass
        with (
            pytest.raises(pytest.fail.Exception, match="still held after 1 s"),
            libvirtd_lock(alone=True, timeout=1.0),
        ):
            pass
        t0 = time.monotonic()
        with libvirtd_lock(alone=True, timeout=30.0):  # in once the other lane's test has ended
            waited = time.monotonic() - t0
        assert 0.5 < waited < 10, waited
    finally:
        other.kill()
        other.wait()
