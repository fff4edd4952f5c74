"""One lock for the host's network configuration, held across processes.

A compute worker's pool processes (and any other worker on the host) share
one kernel: two creates for the same tenant network may both find its bridge,
address or VXLAN device missing and both add it.  Every read-then-change of
links and addresses runs under this lock (``flock`` on a file under
``/run/lock``), so the second one finds the first one's work.  Each holder
opens the file anew, so threads of one process exclude each other too: a
flock belongs to the open file, not to the process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = Path(os.environ.get("SKYPORT_NETWORK_LOCK", "/run/lock/skyport-network.lock"))


@contextlib.contextmanager
def host_lock() -> Iterator[None]:
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock
