"""An image's ``User`` (name or uid[:gid]) resolved inside the image, as Docker does.

The image's ``/etc/passwd`` and ``/etc/group`` are read from the container's
mounted rootfs by the worker (host root), so every path component is opened
with ``O_NOFOLLOW`` from the rootfs: an image whose ``/etc`` or
``/etc/passwd`` is a symlink (to a host file, say) is treated as having no
such file, never followed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from pathlib import Path

MAX_FILE = 4 << 20  # bytes read of /etc/passwd or /etc/group


class UnknownUser(ValueError):
    """The user or group is not in the image and is not numeric."""


@dataclasses.dataclass(frozen=True)
class User:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str = "/"


def read_in_root(root: Path, rel: str) -> str | None:
    """Text of ``root/rel`` without following any symlink; None when absent or not a file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(root, flags | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        parts = [p for p in rel.split("/") if p]
        for part in parts[:-1]:
            nfd = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        ffd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)
        with os.fdopen(ffd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return None
            return fh.read(MAX_FILE).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _table(text: str | None) -> list[list[str]]:
    rows = []
    for line in (text or "").splitlines():
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def _id(value: str) -> int | None:
    return int(value) if value.isdigit() and len(value) <= 10 else None


def resolve(root: Path, spec: str) -> User:
    """``spec`` (``""``, ``name``, ``uid``, ``name:group``, ``uid:gid``) → ids inside the image.

    Like Docker: an empty spec is root; a numeric uid need not exist in
    ``/etc/passwd`` (its gid is then 0); a name must; supplementary groups
    come from ``/etc/group`` membership of the user's name.
    """
    user, _, group = spec.partition(":")
    passwd = _table(read_in_root(root, "etc/passwd"))
    uid = _id(user) if user else 0
    gid = 0
    name = ""
    home = "/"
    entry = None
    for row in passwd:
        if len(row) >= 4 and ((uid is None and row[0] == user) or (uid is not None and _id(row[2]) == uid)):
            entry = row
            break
    if entry is not None:
        name = entry[0]
        uid = _id(entry[2])
        gid = _id(entry[3]) or 0
        home = entry[5] if len(entry) >= 6 and entry[5].startswith("/") else "/"
    elif uid is None:
        raise UnknownUser(f"user {user!r} is not in the image's /etc/passwd")
    assert uid is not None
    groups = _table(read_in_root(root, "etc/group"))
    if group:
        g = _id(group)
        if g is None:
            found = [r for r in groups if len(r) >= 3 and r[0] == group]
            if not found or _id(found[0][2]) is None:
                raise UnknownUser(f"group {group!r} is not in the image's /etc/group")
            g = _id(found[0][2])
        assert g is not None
        gid = g
    members = [r for r in groups if len(r) >= 4 and name and name in r[3].split(",")]
    extra = sorted({gi for r in members if (gi := _id(r[2])) is not None and gi != gid})
    return User(uid, gid, tuple(extra), home)
