"""Run a command while holding this network namespace's one-test-run lock; wait while another holds it.

``tests/run`` re-runs itself under this.  Two whole runs at once would share Redis databases 5 and
6, libvirtd and the tenant network pools: the second run's first network collides with the first
run's bridge.  What two runs share is the network namespace (a CI job in its own file-system view
on a machine where a developer's run still goes shares it too), so the lock is an abstract unix
socket, which lives in the network namespace and dies with its holder: no lock file to go stale.

Usage: runlock.py COMMAND [ARG...]; exits with COMMAND's status.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

NAME = "\0skyport-tests-run"


def holder_pids() -> str:
    """Best effort: the PIDs that hold the lock (from /proc/net/unix inodes), for the message."""
    inodes = set()
    try:
        with open("/proc/net/unix") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == "@" + NAME[1:]:
                    inodes.add(parts[6])
    except OSError:
        return "?"
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    pids.add(pid)
        except OSError:
            continue
    return ", ".join(sorted(pids)) or "?"


def main(argv: list[str]) -> int:
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    waited = None
    while True:
        try:
            lock.bind(NAME)
            break
        except OSError:
            if waited is None:
                waited = time.monotonic()
                print(
                    f"tests/run: another test run in this network namespace (PID {holder_pids()}) "
                    "is going; waiting for it to end",
                    file=sys.stderr,
                    flush=True,
                )
            time.sleep(2)
    if waited is not None:
        print(
            f"tests/run: waited {time.monotonic() - waited:.0f} s for the other run",
            file=sys.stderr,
            flush=True,
        )
    env = dict(os.environ, SKYPORT_TESTS_RUN_LOCKED="1")
    try:
        return subprocess.call(argv, env=env)  # the lock socket is not inherited
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
