"""Idmapped mounts: image layers seen through a container's uid range without copying them.

Every container runs in a user namespace whose root is host uid ``base``
(one 65536-id range per tenant, docs/container-driver.md).  Image layers
stay on disk with the owners the image gave them (root's files are uid 0)
and are shared by every range; each start clones a layer directory with
``open_tree(OPEN_TREE_CLONE)``, marks the clone idmapped with
``mount_setattr(MOUNT_ATTR_IDMAP)`` and hands the detached clone to overlay
as ``lowerdir=/proc/self/fd/<n>``.
Through that mount a file of on-disk uid *n* belongs to host uid
``base + n``, so the overlay built on top shows the container's root its own
files and the host an unprivileged owner.

The mapping comes from a user namespace fd: one per range, made once per
process by a short-lived ``unshare --user`` child whose maps we write, and
kept open (an open ns fd keeps the namespace alive after the child exits).
Python 3.11 has none of these syscalls: ctypes, x86_64 numbers.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import time
from pathlib import Path

from compute.spec import ID_RANGE_SIZE

_SYS_OPEN_TREE = 428
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_OPEN_TREE_CLONE = 1
_MOUNT_ATTR_IDMAP = 0x00100000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


_lock = threading.Lock()
_userns: dict[tuple[int, int], int] = {}


def userns_fd(base: int, size: int = ID_RANGE_SIZE) -> int:
    """An fd of a user namespace mapping ids ``0..size-1`` to ``base..``; cached per process.

    The fd belongs to this module; callers must not close it.
    """
    key = (base, size)
    with _lock:
        fd = _userns.get(key)
        if fd is not None:
            return fd
        fd = _make_userns(base, size)
        _userns[key] = fd
        return fd


def _make_userns(base: int, size: int) -> int:
    # A child that unshares its user namespace and waits on stdin; we write its
    # maps (root may map any range), open its namespace and let it go.  Popen
    # vforks, so this stays cheap in a large worker.
    child = subprocess.Popen(
        ["unshare", "--user", "--", "cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        own = os.readlink("/proc/self/ns/user")
        proc = Path(f"/proc/{child.pid}")
        deadline = time.monotonic() + 5.0
        while os.readlink(proc / "ns" / "user") == own:
            if child.poll() is not None or time.monotonic() > deadline:
                raise OSError(f"unshare --user did not make a user namespace (exit {child.poll()})")
            time.sleep(0.0005)
        (proc / "uid_map").write_text(f"0 {base} {size}\n")
        (proc / "setgroups").write_text("deny")
        (proc / "gid_map").write_text(f"0 {base} {size}\n")
        return os.open(proc / "ns" / "user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=5)


def open_idmapped(source: Path, base: int) -> int:
    """A detached idmapped clone of directory ``source``, shifted by ``base``, as an fd.

    The caller closes it.  A mount that uses it by ``/proc/self/fd/<fd>``
    (overlay ``lowerdir=``) keeps the clone alive after the fd is closed, and
    the host path of the layer never shows in anyone's mountinfo.
    """
    ns = userns_fd(base)
    fd = _check(
        _libc.syscall(
            _SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(source), ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC)
        ),
        f"open_tree {source}",
    )
    try:
        attr = _MountAttr(_MOUNT_ATTR_IDMAP, 0, 0, ns)
        _check(
            _libc.syscall(
                _SYS_MOUNT_SETATTR,
                fd,
                b"",
                ctypes.c_uint(_AT_EMPTY_PATH),
                ctypes.byref(attr),
                ctypes.sizeof(attr),
            ),
            f"mount_setattr idmap {source}",
        )
    except BaseException:
        os.close(fd)
        raise
    return fd
