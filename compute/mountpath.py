"""Where a container volume may be mounted: the rules shared by the portal (400) and the node.

A mount path is absolute and normalised (no ``.``, ``..``, ``//`` or
trailing ``/``), at most 255 bytes of printable characters without ``,`` or
``:`` (OCI mount options and overlay strings use them), and not a place the
runtime or the image's system needs:

- ``/`` itself;
- ``/proc``, ``/sys``, ``/dev`` and ``/tmp`` **and everything under them**:
  the kernel's file systems and the runtime's own tmpfs mounts;
- the system directories themselves (**exactly**; a subdirectory such as
  ``/etc/nginx/conf.d`` or ``/var/lib/postgresql`` is fine): ``/bin``,
  ``/boot``, ``/etc``, ``/lib``, ``/lib32``, ``/lib64``, ``/libx32``,
  ``/sbin``, ``/usr`` and its ``bin``/``sbin``/``lib``/``lib64``/``local``,
  ``/var``, ``/run``, ``/var/run``, ``/root``;
- the files the runtime or the node writes: ``/etc/resolv.conf``,
  ``/etc/hosts``, ``/etc/hostname``, ``/etc/passwd``, ``/etc/group``,
  ``/etc/shadow``.

The node also refuses a path whose components are symbolic links in the
container's file system (``compute.drivers.container``), so a link planted in
an image or by the container cannot lead a mount out of its rootfs.
"""

from __future__ import annotations

import posixpath
import re

MAX_MOUNT_PATH = 255

#: the path and everything under it
DENIED_TREES = ("/proc", "/sys", "/dev", "/tmp")  # noqa: S108 (paths inside the container)
#: exactly these paths (their subdirectories are allowed)
DENIED_EXACT = frozenset(
    {
        "/bin", "/boot", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/sbin", "/usr", "/usr/bin",
        "/usr/sbin", "/usr/lib", "/usr/lib64", "/usr/local", "/var", "/run", "/var/run", "/root",
        "/etc/resolv.conf", "/etc/hosts", "/etc/hostname", "/etc/passwd", "/etc/group", "/etc/shadow",
    }
)  # fmt: skip

_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f,:]+")


class MountPathError(ValueError):
    """The mount path is refused; the message is one sentence for the tenant."""


def check_mount_path(path: object) -> str:
    """Return ``path`` if a volume may be mounted there, else raise :class:`MountPathError` saying why."""
    if not isinstance(path, str) or not path:
        raise MountPathError("mount_path must be a non-empty string such as /data")
    if len(path.encode()) > MAX_MOUNT_PATH:
        raise MountPathError(f"mount_path is longer than {MAX_MOUNT_PATH} bytes")
    if not _PRINTABLE.fullmatch(path):
        raise MountPathError("mount_path may not contain control characters, ',' or ':'")
    if not path.startswith("/"):
        raise MountPathError(f"mount_path {path!r} must be absolute (start with /)")
    parts = path.split("/")[1:]
    if ".." in parts:
        raise MountPathError(f"mount_path {path!r} may not contain '..'")
    if posixpath.normpath(path) != path or "" in parts[:-1] or "." in parts:
        raise MountPathError(f"mount_path {path!r} is not normalised; write {posixpath.normpath(path)!r}")
    if path == "/":
        raise MountPathError("mount_path may not be / (the container's root file system)")
    for tree in DENIED_TREES:
        if path == tree or path.startswith(tree + "/"):
            raise MountPathError(f"mount_path {path!r} is under {tree}, which the container runtime provides")
    if path in DENIED_EXACT:
        raise MountPathError(
            f"mount_path {path!r} would hide a system directory or file of the image; use a subdirectory "
            "or another path such as /data"
        )
    return path


def overlaps(a: str, b: str) -> bool:
    """Whether one mount path is the other or inside it (two volumes there would hide each other)."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")
