"""Volumes on a node: one qcow2 file per volume in ``<state_dir>/volumes/``, outside every instance.

A volume lives apart from the instances it is attached to, so deleting an
instance (which removes its own directory) leaves its volumes and their data
in place; the VM driver attaches the file as a virtio disk.  Each operation
is idempotent by volume id, as the broker may deliver a request twice:
creating an existing volume keeps it (and its data), deleting a missing one
succeeds.  Files are written under a temporary name and renamed, so a crash
never leaves a half-made volume that looks complete.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from compute.spec import UUID_RE

GIB = 1 << 30
QEMU_IMG_TIMEOUT = 120


class VolumeError(Exception):
    """A volume operation failed; the message is one sentence for the tenant."""


class VolumeStore:
    """The volume files of one node."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, volume_id: str) -> Path:
        if not UUID_RE.fullmatch(volume_id):
            raise VolumeError(f"not a volume id: {volume_id!r}")
        return self.root / f"{volume_id}.qcow2"

    def exists(self, volume_id: str) -> bool:
        return self.path(volume_id).is_file()

    def ids(self) -> list[str]:
        """Every volume file present, by id."""
        if not self.root.is_dir():
            return []
        names = (p.name.removesuffix(".qcow2") for p in self.root.glob("*.qcow2"))
        return sorted(n for n in names if UUID_RE.fullmatch(n))

    def create(self, volume_id: str, size_gb: int) -> int:
        """Make an empty (sparse) qcow2 of ``size_gb``; an existing volume is kept.  Returns its size."""
        path = self.path(volume_id)
        if path.is_file():
            return self.size(volume_id)
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # QEMU (its own user under libvirt) must reach the files
        partial = path.with_name(path.name + ".partial")
        self._qemu_img("create", "-q", "-f", "qcow2", str(partial), str(size_gb * GIB))
        partial.chmod(0o644)
        partial.replace(path)
        return self.size(volume_id)

    def delete(self, volume_id: str) -> None:
        """Remove the volume's file; a missing one is already deleted."""
        path = self.path(volume_id)
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".partial").unlink(missing_ok=True)

    def size(self, volume_id: str) -> int:
        """The virtual size in bytes (what the guest sees)."""
        out = self._qemu_img("info", "-U", "--output=json", str(self._existing(volume_id)))
        return int(json.loads(out)["virtual-size"])

    def grow(self, volume_id: str, size_gb: int) -> int:
        """Grow a detached volume to ``size_gb``; shrinking is refused.  Returns the new size."""
        path = self._existing(volume_id)
        if size_gb * GIB < self.size(volume_id):
            raise VolumeError(f"volume {volume_id} is larger than {size_gb} GiB; volumes only grow")
        self._qemu_img("resize", "-q", "-f", "qcow2", str(path), str(size_gb * GIB))
        return self.size(volume_id)

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
