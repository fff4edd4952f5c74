"""Process-wide namespace set-up for running crun on a cgroup v1 hybrid host.

crun 1.8.1 refuses hybrid cgroups.  It stops looking at the hybrid part when
``/sys/fs/cgroup/unified`` is an empty directory, so the process that spawns
crun gets a private mount namespace with an empty tmpfs over it.  Only the
calling thread changes namespace (``unshare`` of the mount namespace implies
``CLONE_FS``), so call :func:`enter_private_mount_ns` from the thread that
will spawn crun, once, at worker start; threads started later inherit it.

Also wraps the few syscalls Python 3.11 lacks (``mount``, ``umount2``,
``unshare``, ``setns``) through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
PR_SET_CHILD_SUBREAPER = 36

UNIFIED = Path("/sys/fs/cgroup/unified")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(value: str | os.PathLike[str] | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(
    source: str | None,
    target: str | os.PathLike[str],
    fstype: str | None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), f"mount {target}")


def umount(target: str | os.PathLike[str], flags: int = MNT_DETACH) -> None:
    _check(_libc.umount2(_b(target), flags), f"umount {target}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def set_child_subreaper() -> None:
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a mount point in this thread's mount namespace."""
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/thread-self/mountinfo", "rb") as fh:
        for line in fh:
            fields = line.split(b" ")
            if len(fields) > 4 and _unescape(fields[4]) == target:
                return True
    return False


def _unescape(field: bytes) -> bytes:
    return (
        field.replace(b"\\040", b" ")
        .replace(b"\\011", b"\t")
        .replace(b"\\012", b"\n")
        .replace(b"\\134", b"\\")
    )


def hybrid_hidden() -> bool:
    """Whether crun, spawned from this thread, sees no cgroup2 hybrid mount."""
    fstype = None
    with open("/proc/thread-self/mountinfo", "rb") as fh:
        for line in fh:
            left, _, right = line.partition(b" - ")
            fields = left.split(b" ")
            if len(fields) > 4 and fields[4] == b"/sys/fs/cgroup/unified":
                fstype = right.split(b" ", 1)[0]  # the last mount there wins
    return fstype != b"cgroup2"


def enter_private_mount_ns() -> None:
    """Give this thread a private mount namespace hiding the cgroup2 hybrid mount.

    Idempotent per thread; cheap enough to call before every operation.
    Mounts made afterwards by this thread (overlays, netns bind mounts) are
    invisible to the rest of the host.
    """
    if hybrid_hidden():
        return
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Writable: crun mkdirs its cgroup there too (harmless, private tmpfs).
    mount("skyport-nounified", UNIFIED, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64m,mode=755")


def forget_unified(cgroup_path: str) -> None:
    """Remove what crun wrote for ``cgroup_path`` into the private tmpfs.

    crun still creates its cgroup dir (with a ``cgroup.procs`` file) under
    the covered ``unified`` mount; without this the tmpfs fills up after a
    few hundred containers.
    """
    if not hybrid_hidden():
        return
    target = UNIFIED / cgroup_path.lstrip("/")
    if UNIFIED in target.parents:
        shutil.rmtree(target, ignore_errors=True)
