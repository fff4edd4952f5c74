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

Snapshots of a volume (docs/storage.md): a qcow2 volume keeps them inside
the file as internal snapshots tagged ``vs:<name>`` (``qemu-img snapshot``;
the ``vs:`` prefix keeps them apart from the snapshots libvirt writes into
an attached volume when its VM is snapshotted, whose names have no ``:``);
an ext4 volume's snapshots are sparse copies
``snapshots/<id>/<name>.ext4`` (``cp --reflink=auto --sparse=always``).
Both are taken only while nothing uses the volume: qemu-img's write lock
refuses a disk a running QEMU holds, and an ext4 file that backs a loop
device (a running container's mount) is refused here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
from pathlib import Path

from compute.spec import ID_RANGE_MIN, UUID_RE, SnapshotInfo, VolumeFormat

GIB = 1 << 30
QEMU_IMG_TIMEOUT = 120
TOOL_TIMEOUT = 600  # mkfs, e2fsck and resize2fs of a large sparse file
SUFFIXES = tuple(f".{f.value}" for f in VolumeFormat)
#: the tag prefix of a volume snapshot inside a qcow2 file (instance snapshots have no ':')
TAG_PREFIX = "vs:"
SNAPSHOT_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
LOOP_SYSFS = Path("/sys/block")


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
        self,
        volume_id: str,
        size_gb: int,
        fmt: VolumeFormat = VolumeFormat.QCOW2,
        owner: int = 0,
        origin: str = "",
    ) -> int:
        """Make an empty (sparse) volume of ``size_gb``; an existing volume is kept.  Returns its size.

        An ``ext4`` volume's root directory is owned by ``owner`` (the host
        uid/gid of root in the tenant's containers, never below 2^24), mode
        0755, with no blocks reserved for host root (the container's root is
        not host root, so reserved blocks would be unusable).  ``origin`` (the
        portal's request id) is stamped beside it (:meth:`stamp`).
        """
        existing = self.path(volume_id)
        if existing.is_file():
            if existing.suffix != f".{fmt.value}":
                raise VolumeError(
                    f"volume {volume_id} exists on this node as {existing.suffix[1:]}, not {fmt}"
                )
            if origin and not self.origin(volume_id):  # the first delivery stopped before its stamp
                self.stamp(volume_id, origin)
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
        if origin:
            self.stamp(volume_id, origin)
        return self.size(volume_id)

    def stamp(self, volume_id: str, origin: str) -> None:
        """Record which portal request made this copy (a create or a move's receive)."""
        path = self.root / f"{self.path(volume_id).stem}.origin"
        partial = path.with_name(path.name + ".partial")
        partial.write_text(origin)
        partial.replace(path)

    def origin(self, volume_id: str) -> str:
        """The request that made this copy ("" for a copy made before stamps existed)."""
        try:
            return (self.root / f"{self.path(volume_id).stem}.origin").read_text()
        except FileNotFoundError:
            return ""

    def drop(self, volume_id: str, origin: str) -> None:
        """Delete the copy a move left behind, only if it is the copy made by ``origin``.

        A drop delivered again long after (the broker redelivers) must not
        delete a newer copy that a later move brought back to this node.
        """
        if not self.exists(volume_id):
            return
        here = self.origin(volume_id)
        if here != origin:
            raise VolumeError(
                f"the copy of volume {volume_id} here was made by request {here or 'unknown'}, not "
                f"{origin or 'unknown'}: kept"
            )
        self.delete(volume_id)

    def delete(self, volume_id: str) -> None:
        """Remove the volume's file; a missing one is already deleted."""
        (self.root / f"{self.path(volume_id).stem}.origin").unlink(missing_ok=True)
        for fmt in VolumeFormat:
            path = self.path(volume_id, fmt)
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".partial").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.mountpoint(volume_id).rmdir()
        snaps = self._snapshot_dir(volume_id)
        if snaps.is_dir():
            for copy in snaps.iterdir():
                copy.unlink(missing_ok=True)
            snaps.rmdir()

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

    def export(self, volume_id: str, dest: Path) -> None:
        """Write the detached volume's content to ``dest`` as a standalone, compact qcow2.

        Both formats travel as qcow2: ``qemu-img convert`` copies only
        allocated clusters, so a sparse ext4 volume of 16 GiB with a few files
        in it is a few MiB on the wire, and :meth:`restore` makes it sparse again.
        """
        path = self._existing(volume_id)
        src_fmt = "raw" if path.suffix == ".ext4" else "qcow2"
        self._qemu_img("convert", "-f", src_fmt, "-O", "qcow2", str(path), str(dest))

    def restore(self, volume_id: str, fmt: VolumeFormat, src: Path) -> int:
        """Make the volume of ``fmt`` from an exported qcow2 ``src`` (write aside, then rename).

        Refused when the node has that volume already (a move never
        overwrites a copy, and a restore makes a new volume).  Returns the size.
        """
        if self.path(volume_id).is_file():
            raise VolumeError(f"volume {volume_id} already has a file on this node")
        info = json.loads(self._qemu_img("info", "--output=json", "-f", "qcow2", str(src)))
        if info.get("backing-filename") or info.get("format") != "qcow2":
            raise VolumeError(f"the content of volume {volume_id} is not a standalone qcow2")
        path = self.path(volume_id, fmt)
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        partial = path.with_name(path.name + ".partial")
        out_fmt = "raw" if fmt is VolumeFormat.EXT4 else "qcow2"
        try:
            self._qemu_img("convert", "-f", "qcow2", "-O", out_fmt, str(src), str(partial))
            partial.chmod(0o644 if fmt is VolumeFormat.QCOW2 else 0o600)
            if fmt is VolumeFormat.EXT4:
                self._tool("e2fsck", "-f", "-n", str(partial))  # a file system, intact
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        return self.size(volume_id)

    # -- snapshots ---------------------------------------------------------------------------

    def _snapshot_dir(self, volume_id: str) -> Path:
        self.path(volume_id)  # checks the id
        return self.root / "snapshots" / volume_id

    @staticmethod
    def _check_name(name: str) -> None:
        if not SNAPSHOT_NAME_RE.fullmatch(name):
            raise VolumeError(f"not a snapshot name: {name!r}")

    def _copy(self, volume_id: str, name: str) -> Path:
        return self._snapshot_dir(volume_id) / f"{name}.ext4"

    def _check_unused(self, path: Path) -> None:
        """Refuse an ext4 file that backs a loop device: a container has it mounted."""
        for backing in LOOP_SYSFS.glob("loop*/loop/backing_file"):
            with contextlib.suppress(OSError):
                if Path(backing.read_text().strip()) == path:
                    raise VolumeError(
                        f"volume {path.stem} is mounted by a running container ({backing.parent.parent.name})"
                    )

    def snapshots(self, volume_id: str, sizes: bool = True) -> list[SnapshotInfo]:
        """The volume's snapshots, oldest first, with the data each holds (0 without ``sizes``)."""
        path = self._existing(volume_id)
        if path.suffix == ".ext4":
            found = []
            snaps = self._snapshot_dir(volume_id)
            for copy in snaps.glob("*.ext4") if snaps.is_dir() else ():
                st = copy.stat()
                found.append(SnapshotInfo(copy.stem, st.st_mtime, st.st_blocks * 512))
            return sorted(found, key=lambda s: (s.created_at, s.name))
        info = json.loads(self._qemu_img("info", "-U", "--output=json", str(path)))
        found = []
        for snap in info.get("snapshots") or []:
            tag = str(snap.get("name", ""))
            if not tag.startswith(TAG_PREFIX):
                continue  # an instance snapshot libvirt wrote while the volume was attached
            when = int(snap.get("date-sec", 0)) + int(snap.get("date-nsec", 0)) / 1e9
            size = self._measure(path, tag) if sizes else 0
            found.append(SnapshotInfo(tag.removeprefix(TAG_PREFIX), when, size))
        return sorted(found, key=lambda s: (s.created_at, s.name))

    def _measure(self, path: Path, tag: str) -> int:
        """Bytes a qcow2 copy of snapshot ``tag`` would need: the data it holds (shared copy-on-write)."""
        out = self._qemu_img(
            "measure", "-U", "--output=json", "-O", "qcow2", "-l", f"snapshot.name={tag}", str(path)
        )
        return int(json.loads(out)["required"])

    def _has(self, volume_id: str, name: str) -> SnapshotInfo | None:
        return next((s for s in self.snapshots(volume_id, sizes=False) if s.name == name), None)

    def snapshot(self, volume_id: str, name: str) -> SnapshotInfo:
        """Take snapshot ``name`` of a volume nothing uses; an existing one is kept (idempotent)."""
        self._check_name(name)
        path = self._existing(volume_id)
        if path.suffix == ".ext4":
            copy = self._copy(volume_id, name)
            if not copy.is_file():
                self._check_unused(path)
                copy.parent.mkdir(parents=True, exist_ok=True)
                partial = copy.with_name(copy.name + ".partial")
                self._tool("cp", "--reflink=auto", "--sparse=always", "--", str(path), str(partial))
                try:
                    self._check_unused(path)  # a container that started meanwhile makes the copy worthless
                except VolumeError:
                    partial.unlink()
                    raise
                partial.chmod(0o600)
                partial.replace(copy)
            st = copy.stat()
            return SnapshotInfo(name, st.st_mtime, st.st_blocks * 512)
        taken = self._has(volume_id, name)
        if taken is None:
            self._qemu_img("snapshot", "-q", "-c", TAG_PREFIX + name, str(path))
            taken = self._has(volume_id, name)
            assert taken is not None
        return dataclasses.replace(taken, size_bytes=self._measure(path, TAG_PREFIX + name))

    def revert(self, volume_id: str, name: str) -> None:
        """Return a detached volume to snapshot ``name``; the snapshot stays, the size does not shrink.

        A snapshot taken before the volume was grown holds the smaller size
        (qcow2 keeps each snapshot's disk size; an ext4 copy is the smaller
        file): the reverted volume is grown back to the size it had, since
        volumes never shrink (the portal's size and quota stay true).
        """
        self._check_name(name)
        path = self._existing(volume_id)
        if self._has(volume_id, name) is None:
            raise VolumeError(f"volume {volume_id} has no snapshot {name!r}")
        size = self.size(volume_id)
        if path.suffix == ".ext4":
            self._check_unused(path)
            partial = path.with_name(path.name + ".partial")
            copy = self._copy(volume_id, name)
            self._tool("cp", "--reflink=auto", "--sparse=always", "--", str(copy), str(partial))
            partial.chmod(0o600)
            partial.replace(path)  # the old inode stays whole until the rename: no half-reverted volume
        else:
            self._qemu_img("snapshot", "-q", "-a", TAG_PREFIX + name, str(path))
        if self.size(volume_id) < size:
            self.grow(volume_id, -(-size // GIB))

    def delete_snapshot(self, volume_id: str, name: str) -> None:
        """Remove snapshot ``name``; a missing one is already deleted."""
        self._check_name(name)
        path = self._existing(volume_id)
        if path.suffix == ".ext4":
            self._copy(volume_id, name).unlink(missing_ok=True)
            return
        if self._has(volume_id, name) is not None:
            self._qemu_img("snapshot", "-q", "-d", TAG_PREFIX + name, str(path))

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
