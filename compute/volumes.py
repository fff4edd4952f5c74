"""Volumes on a node: one file per volume in ``<state_dir>/volumes/``, outside every instance.

A volume lives apart from the instances it is attached to, so deleting an
instance (which removes its own directory) leaves its volumes and their data
in place.  ``<id>.qcow2`` is a disk the VM driver attaches as a virtio disk;
``<id>.ext4`` is an ext4 file system in a sparse raw file whose root
directory belongs to the tenant's container root (``id_base``), which the
container driver loop-mounts under ``mnt/<id>`` and bind-mounts into the
container (its size is the file system's size).  Each operation
is idempotent by volume id, as the broker may deliver a request twice:
creating an existing volume keeps it (and its data), deleting a missing one
succeeds.  Files are written under a temporary name and renamed, so a crash
never leaves a half-made volume that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from pathlib import Path

from compute.spec import ID_RANGE_MIN, UUID_RE, VolumeFormat

GIB = 1 << 30
QEMU_IMG_TIMEOUT = 120
TOOL_TIMEOUT = 600  # mkfs, e2fsck and resize2fs of a large sparse file
SUFFIXES = tuple(f".{f.value}" for f in VolumeFormat)


class VolumeError(Exception):
    """A volume operation failed; the message is one sentence for the tenant."""


class VolumeStore:
    """The volume files of one node."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, volume_id: str, fmt: VolumeFormat | None = None) -> Path:
        """The volume's file: of ``fmt``, else whichever exists (a qcow2 name when none does)."""
        if not UUID_RE.fullmatch(volume_id):
            raise VolumeError(f"not a volume id: {volume_id!r}")
        if fmt is None:
            for suffix in SUFFIXES:
                if (self.root / f"{volume_id}{suffix}").is_file():
                    return self.root / f"{volume_id}{suffix}"
            fmt = VolumeFormat.QCOW2
        return self.root / f"{volume_id}.{fmt.value}"

    def mountpoint(self, volume_id: str) -> Path:
        """Where the container driver loop-mounts an ext4 volume while it sets up a container."""
        self.path(volume_id)  # checks the id
        return self.root / "mnt" / volume_id

    def format(self, volume_id: str) -> VolumeFormat:
        return VolumeFormat(self._existing(volume_id).suffix.removeprefix("."))

    def exists(self, volume_id: str) -> bool:
        return self.path(volume_id).is_file()

    def ids(self) -> list[str]:
        """Every volume file present, by id."""
        if not self.root.is_dir():
            return []
        names = (p.stem for p in self.root.iterdir() if p.suffix in SUFFIXES and p.is_file())
        return sorted(n for n in names if UUID_RE.fullmatch(n))

    def create(
        self, volume_id: str, size_gb: int, fmt: VolumeFormat = VolumeFormat.QCOW2, owner: int = 0
    ) -> int:
        """Make an empty (sparse) volume of ``size_gb``; an existing volume is kept.  Returns its size.

        An ``ext4`` volume's root directory is owned by ``owner`` (the host
        uid/gid of root in the tenant's containers, never below 2^24), mode
        0755, with no blocks reserved for host root (the container's root is
        not host root, so reserved blocks would be unusable).
        """
        existing = self.path(volume_id)
        if existing.is_file():
            if existing.suffix != f".{fmt.value}":
                raise VolumeError(
                    f"volume {volume_id} exists on this node as {existing.suffix[1:]}, not {fmt}"
                )
            return self.size(volume_id)
        path = self.path(volume_id, fmt)
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # QEMU (its own user under libvirt) must reach the files
        partial = path.with_name(path.name + ".partial")
        if fmt is VolumeFormat.QCOW2:
            self._qemu_img("create", "-q", "-f", "qcow2", str(partial), str(size_gb * GIB))
            partial.chmod(0o644)
        else:
            if owner < ID_RANGE_MIN:
                raise VolumeError(f"an ext4 volume belongs to a container id range, not to uid {owner}")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size_gb * GIB)  # sparse: no block is written yet
            finally:
                os.close(fd)
            self._tool(
                "mkfs.ext4", "-F", "-q", "-m", "0", "-L", volume_id[:16],
                "-E", f"root_owner={owner}:{owner}", str(partial),
            )  # fmt: skip
        partial.replace(path)
        return self.size(volume_id)

    def delete(self, volume_id: str) -> None:
        """Remove the volume's file; a missing one is already deleted."""
        for fmt in VolumeFormat:
            path = self.path(volume_id, fmt)
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".partial").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.mountpoint(volume_id).rmdir()

    def size(self, volume_id: str) -> int:
        """The virtual size in bytes (what the guest sees; an ext4 volume's file size)."""
        path = self._existing(volume_id)
        if path.suffix == ".ext4":
            return path.stat().st_size
        out = self._qemu_img("info", "-U", "--output=json", str(path))
        return int(json.loads(out)["virtual-size"])

    def grow(self, volume_id: str, size_gb: int) -> int:
        """Grow a detached volume to ``size_gb``; shrinking is refused.  Returns the new size.

        An ext4 volume is checked (``e2fsck -f``), its file extended (sparse)
        and the file system grown with ``resize2fs``; it is not mounted anywhere
        then, since only a detached volume is grown.
        """
        path = self._existing(volume_id)
        if size_gb * GIB < self.size(volume_id):
            raise VolumeError(f"volume {volume_id} is larger than {size_gb} GiB; volumes only grow")
        if path.suffix == ".ext4":
            self._tool("e2fsck", "-f", "-p", str(path), ok=(0, 1))  # 1: errors corrected
            os.truncate(path, size_gb * GIB)
            self._tool("resize2fs", str(path))
        else:
            self._qemu_img("resize", "-q", "-f", "qcow2", str(path), str(size_gb * GIB))
        return self.size(volume_id)

    @staticmethod
    def _tool(*argv: str, ok: tuple[int, ...] = (0,)) -> str:
        try:
            proc = subprocess.run(
                list(argv), check=False, capture_output=True, text=True, timeout=TOOL_TIMEOUT
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VolumeError(f"{argv[0]} failed: {exc}") from exc
        if proc.returncode not in ok:
            detail = re.sub(r"\s+", " ", (proc.stderr or proc.stdout).strip())[-300:]
            raise VolumeError(f"{argv[0]} failed: {detail}")
        return proc.stdout

    def _existing(self, volume_id: str) -> Path:
        path = self.path(volume_id)
        if not path.is_file():
            raise VolumeError(f"volume {volume_id} has no file on this node")
        return path

    @staticmethod
    def _qemu_img(*args: str) -> str:
        try:
            proc = subprocess.run(
                ["qemu-img", *args], check=False, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VolumeError(f"qemu-img {args[0]} failed: {exc}") from exc
        if proc.returncode != 0:
            detail = re.sub(r"\s+", " ", proc.stderr.strip())[-300:]
            raise VolumeError(f"qemu-img {args[0]} failed: {detail}")
        return proc.stdout
