"""Non-interactive exec: a command in a running instance → exit code and (capped) output.

For automation (``POST /api/v1/instances/{id}/exec/``): no terminal, stdout
and stderr merged in order, at most ``max_bytes`` kept (the rest is read and
dropped, so a chatty command cannot fill memory or block on a full pipe), and
killed at ``timeout``.  Runs in the worker that received the request; the
result goes straight back to the waiting portal request on a Redis list.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time

from compute.drivers.base import Driver, DriverError, InstanceNotFound, InvalidState, NotSupported
from compute.spec import ExecRequest, ExecResult

REPLY_TTL = 120  # seconds an unread reply stays on its list


def run(driver: Driver, request: ExecRequest) -> ExecResult:
    started = time.monotonic()
    try:
        argv = driver.exec_argv(request.instance_id, request.command, tty=False)
    except (InstanceNotFound, InvalidState, NotSupported, DriverError) as exc:
        return ExecResult(None, "", error=str(exc))
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    kept = bytearray()
    truncated = timed_out = False
    deadline = started + request.timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        room = request.max_bytes - len(kept)
        if len(chunk) > room:
            truncated = True
        kept += chunk[: max(room, 0)]
    if timed_out:
        # crun exec forwards the signal to the process in the container
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        code = proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait(5)
    proc.stdout.close()
    return ExecResult(
        None if timed_out else code,
        kept.decode(errors="replace"),
        truncated=truncated,
        timed_out=timed_out,
        seconds=round(time.monotonic() - started, 3),
    )
