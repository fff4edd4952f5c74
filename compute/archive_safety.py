"""Rules for the members of a container image layer, shared by the portal and the nodes.

The portal checks every layer of an uploaded image before it becomes
``active``; a node checks it again while it unpacks it (``compute.layers``).
Both apply the rules of this module, so an image the portal accepts is one
every node unpacks, and one a node would refuse ends ``failed`` at import
with the node's reason instead of failing every launch.

:class:`LayerPaths` follows the tree one layer builds, member by member, as
the node lays it out on disk (each layer in a directory of its own, later
members replacing earlier ones).  It refuses a member

* whose path passes through a symlink of the layer (``etc-link -> /etc``
  then ``etc-link/passwd``): it would be written wherever the link points,
  on the node's own file system for an absolute link;
* whose path passes through a file or a whiteout: there is no directory
  to write it into;
* that is a hard link to anything but a regular file the layer wrote
  earlier, or reached through a symlink (``x -> etc-link/shadow`` would
  link a host file into the image);
* that is a device node, a FIFO or has an unsafe name (absolute, ``..``).

One exception: the standard character devices debootstrap leaves in ``/dev``
(null, zero, full, random, urandom, tty, console, ptmx with their usual
numbers) are *skipped* by both sides, not refused (:func:`skipped_device`):
the runtime gives every container its own ``/dev``, so those entries are never
needed, and images made with debootstrap carry them.  Any other device node
(``dev/sda``, ``dev/mem``, a node outside ``/dev``) still refuses the layer.

Whiteout names are judged by ``compute.layers.whiteout_problem``, which both
sides apply as well; a whiteout here only records that the entry it hides is gone.

:class:`UnpackBudget` counts what a layer unpacks to while it is read,
without writing it: the uncompressed bytes of every layer of an image
together, the size of each file, and the number of entries, each against an
operator's limit (a 10 MB archive of gzipped zeros may unpack to 10 GiB).

Nothing here touches a file system or imports Django.
"""

from __future__ import annotations

import dataclasses
import tarfile
from pathlib import PurePosixPath
from typing import TypeAlias

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"

# What a path of the layer is, once the members so far are unpacked.  Directories are dicts of
# their entries, everything else one of these markers (kept small: a layer may have 10^6 entries).
_FILE = 1
_SYMLINK = 2
_WHITEOUT = 3
_Dir: TypeAlias = "dict[str, _Dir | int]"
_WHAT = {_FILE: "a file", _SYMLINK: "a symlink", _WHITEOUT: "a whiteout"}


def member_path(name: str) -> PurePosixPath | None:
    """The member's path relative to the layer root, or None when it is absolute or climbs with ``..``.

    ``.`` parts and empty parts are dropped; the root itself is ``PurePosixPath(".")``.
    """
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        return None
    parts = [x for x in p.parts if x not in (".", "")]
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


# path → (major, minor) of the character devices a layer may carry and nodes skip.
STANDARD_DEV_NODES = {
    "dev/null": (1, 3),
    "dev/zero": (1, 5),
    "dev/full": (1, 7),
    "dev/random": (1, 8),
    "dev/urandom": (1, 9),
    "dev/tty": (5, 0),
    "dev/console": (5, 1),
    "dev/ptmx": (5, 2),
}


def skipped_device(member: tarfile.TarInfo) -> bool:
    """Whether ``member`` is one of the standard ``/dev`` nodes that are skipped, not refused."""
    rel = member_path(member.name)
    return (
        member.ischr()
        and rel is not None
        and STANDARD_DEV_NODES.get(str(rel)) == (member.devmajor, member.devminor)
    )


class LayerPaths:
    """The tree one layer has built so far; :meth:`check` judges and records the next member."""

    def __init__(self) -> None:
        self.root: _Dir = {}

    def _parent(self, rel: PurePosixPath, shown: str) -> tuple[_Dir | None, str | None]:
        """The directory ``rel`` goes into (made as the node's ``mkdir -p`` would), or why there is none."""
        cur = self.root
        walked = PurePosixPath()
        for part in rel.parts[:-1]:
            walked /= part
            entry = cur.get(part)
            if entry is None:
                entry = cur[part] = {}
            if not isinstance(entry, dict):
                if entry == _SYMLINK:
                    return None, f"{shown!r} would be written through the symlink {str(walked)!r}"
                return None, f"{shown!r} would be written inside {str(walked)!r}, which is {_WHAT[entry]}"
            cur = entry
        return cur, None

    def _lookup(self, rel: PurePosixPath) -> object | None:
        """What ``rel`` is now, or None (absent, or reached through something that is not a directory)."""
        cur: object = self.root
        for part in rel.parts:
            if not isinstance(cur, dict):
                return None
            cur = cur.get(part)
        return cur

    def check(self, member: tarfile.TarInfo) -> str | None:
        """Why ``member`` may not be unpacked after the members seen so far, or None (then recorded)."""
        rel = member_path(member.name)
        if rel is None:
            return f"unsafe path {member.name!r}"
        if rel == PurePosixPath("."):
            return None if member.isdir() else f"member {member.name!r} has no name"
        if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            return f"{member.name!r} is a device node, FIFO or other special file"
        parent, problem = self._parent(rel, member.name)
        if parent is None:
            return problem
        base = rel.name
        if base.startswith(WHITEOUT):
            self._whiteout(parent, base)
        elif member.islnk():
            problem = self._hard_link_problem(member)
            if problem is None:
                parent[base] = _FILE
        elif member.isdir():
            if not isinstance(parent.get(base), dict):
                parent[base] = {}  # a directory over a file or link replaces it; over a directory, merges
        else:
            parent[base] = _SYMLINK if member.issym() else _FILE
        return problem

    @staticmethod
    def _whiteout(parent: _Dir, base: str) -> None:
        """The opaque marker only marks its directory; a whiteout replaces the entry it hides (and
        everything below it) with itself."""
        hidden = base[len(WHITEOUT) :]
        if base != OPAQUE and hidden not in ("", ".", "..") and not hidden.startswith(WHITEOUT):
            parent[hidden] = _WHITEOUT

    def _hard_link_problem(self, member: tarfile.TarInfo) -> str | None:
        target = member_path(member.linkname)
        if target is None or target == PurePosixPath("."):
            return f"hard link {member.name!r} -> {member.linkname!r} leaves the layer"
        holder, problem = self._parent(target, member.linkname)
        if holder is None:
            return f"hard link {member.name!r} -> {member.linkname!r}: {problem}"
        if self._lookup(target) != _FILE:
            return (
                f"hard link {member.name!r} -> {member.linkname!r} does not point at a regular file "
                "written earlier in this layer"
            )
        return None


class TooLarge(Exception):
    """An image unpacks to more than a limit allows; the message says which and how to change it."""


@dataclasses.dataclass(frozen=True)
class UnpackLimits:
    """What one image may unpack to, with where each limit comes from (for the refusal)."""

    total_bytes: int
    file_bytes: int
    files: int
    total_source: str = "SKYPORT_IMAGE_MAX_UNPACKED_BYTES"
    file_source: str = "SKYPORT_IMAGE_MAX_FILE_BYTES"
    files_source: str = "SKYPORT_IMAGE_MAX_FILES"


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class UnpackBudget:
    """Counts what the layers of one image unpack to, against :class:`UnpackLimits`.

    ``count_stream`` is fed the uncompressed bytes of each layer's tar as
    they are read (headers and padding included: the most a node writes), so
    a decompression bomb is stopped at the limit, not at its end.
    """

    def __init__(self, limits: UnpackLimits) -> None:
        self.limits = limits
        self.total = 0
        self.files = 0
        self.skipped: list[str] = []  # standard /dev nodes left out (skipped_device)

    def count_stream(self, n: int) -> None:
        self.total += n
        if self.total > self.limits.total_bytes:
            raise TooLarge(
                f"the image unpacks to more than {_size(self.limits.total_bytes)} "
                f"({self.limits.total_source})"
            )

    def count_member(self, member: tarfile.TarInfo) -> None:
        self.files += 1
        if self.files > self.limits.files:
            limit, source = self.limits.files, self.limits.files_source
            raise TooLarge(f"the image has more than {limit} entries ({source})")
        if member.isfile() and member.size > self.limits.file_bytes:
            raise TooLarge(
                f"{member.name!r} unpacks to {_size(member.size)}, more than "
                f"{_size(self.limits.file_bytes)} ({self.limits.file_source})"
            )
