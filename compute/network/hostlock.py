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

from compute.config import NodeConfig

#: the lock file; None: ``SKYPORT_NETWORK_LOCK`` through the node's settings (tests set a path)
LOCK_FILE: Path | None = None


@contextlib.contextmanager
def host_lock() -> Iterator[None]:
    path = LOCK_FILE or NodeConfig.from_env().network_lock
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock
