"""Supervision of containers: conmon as each container's parent, and signals by pidfd.

conmon reaps the container's PID 1 and writes its exit code to a file, so a
container's result outlives the worker that started it.  The worker starts
conmon with plain ``subprocess.Popen`` (vfork), waits on conmon's sync pipe
for crun's create to finish, and never captures pipes of a detached
container.  Signals go through pidfds, so a recycled PID is never hit.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from compute.drivers.base import DriverError
from compute.drivers.common import read_int, tail

CREATE_TIMEOUT = 15.0
LOG_MAX_BYTES = 2 << 20  # conmon starts a container's log afresh beyond this (the node keeps one more)


def create(
    runtime: str,
    crun_root: Path,
    cid: str,
    bundle: Path,
    state: Path,
    pidfile: Path,
    log: Path,
    log_max_bytes: int = LOG_MAX_BYTES,
    meanwhile: Callable[[], None] | None = None,
) -> None:
    """Create container ``cid`` from ``bundle`` under a new conmon; its files go to ``state``.

    The container's stdout and stderr go to ``log`` in conmon's ``k8s-file``
    format (each line with its time and stream, :mod:`compute.logs`), started
    afresh by conmon at ``log_max_bytes``; conmon's own messages go to
    ``state/conmon.log``.  Returns once crun has created the container (PID 1
    waits for ``start``); raises :class:`DriverError` with the reason when it could not.

    ``meanwhile`` runs in this thread while conmon and crun work (a cold
    ``crun create`` spends most of its time waiting in the kernel: its first
    cgroup migration waits for an RCU grace period).  Its error is raised
    once the create has finished either way, so the caller's undo finds a
    container to delete, not one still being made.
    """
    own = state / "conmon.log"
    r, w = os.pipe()
    try:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "_OCI_SYNCPIPE": str(w)}
        cmd = [
            "conmon", "--api-version", "1", "-c", cid, "-u", cid, "-n", cid,
            "-r", shutil.which(runtime) or runtime,
            "-b", str(bundle), "-p", str(pidfile),
            "--persist-dir", str(state), "--exit-dir", str(state),
            "--conmon-pidfile", str(state / "conmon.pid"),
            "--socket-dir-path", str(state),
            "-l", f"k8s-file:{log}", "--log-size-max", str(log_max_bytes), "--log-level", "error",
            "--runtime-arg", f"--root={crun_root}",
        ]  # fmt: skip
        with own.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                pass_fds=(w,),
                cwd=state.parent,
            )
        os.close(w)
        w = -1
        error: BaseException | None = None
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException as exc:  # raised below, after the create has finished
                error = exc
        data = b""
        deadline = time.monotonic() + CREATE_TIMEOUT
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                raise DriverError(f"conmon did not create {cid} within {CREATE_TIMEOUT:.0f} s")
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
        proc.wait(timeout=CREATE_TIMEOUT)
        if error is not None:
            raise error
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    reply: dict[str, Any] = {}
    with contextlib.suppress(ValueError, IndexError):
        first = json.loads(data.decode().splitlines()[0])
        reply = first if isinstance(first, dict) else {}
    pid = reply.get("data")
    if not isinstance(pid, int) or pid <= 0:
        why = str(reply.get("message") or "").strip() or tail(own, 400) or tail(log, 400) or ""
        raise DriverError(f"crun could not create {cid}: {why.strip()}")


def is_conmon(pid: int, cid: str) -> bool:
    """Whether ``pid`` is the conmon of container ``cid`` (not a recycled PID)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return bool(cmdline) and cmdline[0].endswith(b"conmon") and cid.encode() in cmdline


def alive(state: Path, cid: str) -> bool:
    """Whether the conmon that ``create`` started with this state directory still runs."""
    pid = read_int(state / "conmon.pid")
    return pid is not None and is_conmon(pid, cid)


def kill(state: Path, cid: str) -> None:
    """Kill the container's conmon (if it still runs) and wait up to 2 s for it to go."""
    pid = read_int(state / "conmon.pid")
    if pid is not None and is_conmon(pid, cid):
        with pidfd(pid) as fd:
            if fd is not None:
                send(fd, signal.SIGKILL)
                select.select([fd], [], [], 2.0)


@contextlib.contextmanager
def pidfd(pid: int) -> Iterator[int | None]:
    """A pidfd of ``pid``, or None when the process is gone."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def handles(pid: int, sig: int) -> bool:
    """Whether ``pid`` has installed a handler for ``sig`` (SigCgt in its status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        pass
    return False


def send(fd: int, sig: int) -> None:
    """Signal the process behind pidfd ``fd``; one that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(fd, sig)
