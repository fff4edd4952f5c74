"""Opening a terminal on a node: the serial pty of a running VM, or a shell in a container.

A :class:`Terminal` is a file descriptor to read output from and write input
to, plus what to ask when it ends.  A VM's terminal is the host end of the pty
QEMU made for ``<serial type='pty'>`` (libvirt's ``virsh console`` uses the
same device through a stream); reading it does not stop libvirt's ``<log>``
copy.  A container's is the pty that ``crun exec --tty`` makes inside the
container: crun hands its master over a console socket (the OCI way, as
conmon does), so the shell's window size is the real one and no second pty
sits in between.  crun keeps running until the command exits and returns its
exit status.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import subprocess
import tempfile
import termios
import time
import tty
from pathlib import Path

from compute.drivers.base import DriverError


class Terminal:
    """One open terminal: ``fd`` is read and written; ``close`` ends what it started."""

    def __init__(self, fd: int, proc: subprocess.Popen[bytes] | None = None, what: str = "") -> None:
        self.fd = fd
        self.proc = proc
        self.what = what

    def exit_status(self) -> int | None:
        """The exit status of an exec'd command once it ended; None while it runs (or for a VM)."""
        return None if self.proc is None else self.proc.poll()

    def resize(self, cols: int, rows: int) -> None:
        if self.proc is None:  # a serial line has no window size
            return
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # closing the master hangs the shell up (SIGHUP), as closing an ssh session does
            with contextlib.suppress(OSError):
                os.close(self.fd)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            return
        with contextlib.suppress(OSError):
            os.close(self.fd)


def open_serial(path: str) -> Terminal:
    """Open the host end of a VM's serial pty in raw mode (no echo, no line editing on the host side)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise DriverError(f"cannot open the serial console {path}: {exc.strerror}") from exc
    tty.setraw(fd)
    return Terminal(fd, None, f"serial console {path}")


def open_exec(argv: tuple[str, ...], timeout: float = 10.0) -> Terminal:
    """Run ``argv`` (a ``crun exec --tty`` command line) and take the pty master crun sends back."""
    with tempfile.TemporaryDirectory(prefix="skyport-console-") as tmp:
        sock_path = str(Path(tmp) / "console.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.bind(sock_path)
            server.listen(1)
            cmd = [*argv[:3], f"--console-socket={sock_path}", *argv[3:]]
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            server.settimeout(0.05)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    conn, _ = server.accept()
                    break
                except TimeoutError:
                    if proc.poll() is None and time.monotonic() < deadline:
                        continue
                    proc.kill()
                    _, err = proc.communicate(timeout=5)
                    reason = err.decode(errors="replace").strip() or f"exit status {proc.returncode}"
                    raise DriverError(f"exec did not start: {reason}") from None
            with conn:
                conn.settimeout(timeout)
                _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
        finally:
            server.close()
    if not fds:
        proc.kill()
        raise DriverError("exec started but sent no terminal")
    os.set_blocking(fds[0], False)
    return Terminal(fds[0], proc, "exec " + " ".join(argv[-1:]))
