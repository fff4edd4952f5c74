"""OCI layers and archives from Debian root file systems (no registry, no umoci, no Docker).

A layer is a tar of a tree (the base) or of what changed between two trees
(an app: the base copied, packages installed on top): new and changed entries,
plus ``.wh.<name>`` whiteouts for entries removed.  "Changed" is rsync's quick
check (type, mode, owner, size, mtime, link target), which is exact here
because the app tree starts as a ``cp -a`` of the base.  Both sides pass the
same filter, which drops what an image does not need (documentation, apt
lists and caches, logs, the build's policy-rc.d and resolver) and the device
nodes debootstrap leaves in ``/dev``, as real image builders do, unless a
layer is asked to keep them.

Archives are OCI image layouts in a tar (``oci-layout``, ``index.json``,
``blobs/sha256/…``, like images/sample_container) or ``docker save`` archives
(``manifest.json``, ``<id>.json`` config, ``<id>/layer.tar``).  Layers are
streamed through files, never held in memory.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

EPOCH = 1_700_000_000  # mtimes are clamped to this, so rebuilds of the same packages give the same bytes
CHUNK = 1 << 20
CREATED = "2023-11-14T22:13:20Z"

# Directories whose whole content an image leaves out (the directory itself stays).
_EMPTIED = (
    "proc",
    "sys",
    "tmp",
    "var/tmp",
    "usr/share/man",
    "usr/share/info",
    "usr/share/groff",
    "usr/share/lintian",
    "usr/share/linda",
    "usr/share/locale",
)
# Directories whose regular files are left out; sub-directories and symlinks stay (apt and dpkg
# recreate the files; nginx needs /var/log/nginx, its log links to /dev/stdout, and /run).
_NO_FILES = ("var/log", "run", "var/cache/apt", "var/lib/apt/lists")
_DROPPED = {"usr/sbin/policy-rc.d", "etc/resolv.conf", "etc/hostname"}


def keep(rel: str, is_file: bool, keep_dev: bool = False) -> bool:
    """Whether the tree entry ``rel`` (posix, relative to the root) belongs in an image."""
    if rel in _DROPPED:
        return False
    if rel.endswith("-old") and rel.startswith(("var/cache/debconf/", "var/lib/dpkg/")):
        return False
    if rel.startswith("dev/"):
        return keep_dev
    for d in _EMPTIED:
        if rel.startswith(d + "/"):
            return False
    for d in _NO_FILES:
        if rel.startswith(d + "/"):
            return not is_file
    if rel.startswith("usr/share/doc/"):  # documentation goes, licences stay
        return not is_file or rel.endswith("/copyright")
    return True


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer: its uncompressed tar (``diff_id``) and its gzip blob (``digest``)."""

    tar: Path
    diff_id: str
    gz: Path
    digest: str
    size: int  # of the gzip blob
    entries: int
    devices: int  # character/block device nodes carried (only when asked to keep /dev)


class _Hashing(io.RawIOBase):
    """A write-only file that hashes and counts what passes through to ``out``."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.h = hashlib.sha256()
        self.n = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.n

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.h.update(data)
        self.n += len(data)
        self.out.write(data)
        return len(data)


def _entries(root: Path, rel: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under ``root`` (not the root itself), sorted, parents before children."""
    base = root / rel if rel else root
    for name in sorted(os.listdir(base)):
        r = f"{rel}/{name}" if rel else name
        st = os.lstat(root / r)
        yield r, st
        if stat.S_ISDIR(st.st_mode):
            yield from _entries(root, r)


def _same(a: os.stat_result, b: os.stat_result, pa: Path, pb: Path) -> bool:
    if stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode):
        return False
    if (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid):
        return False
    if stat.S_ISDIR(a.st_mode):
        return True  # a directory's own mtime changes with its children; its children decide
    if stat.S_ISLNK(a.st_mode):
        return os.readlink(pa) == os.readlink(pb)
    if stat.S_ISCHR(a.st_mode) or stat.S_ISBLK(a.st_mode):
        return a.st_rdev == b.st_rdev
    return (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)


def _diff(lower: Path, upper: Path, keep_dev: bool) -> list[tuple[str, os.stat_result | None]]:
    """Entries of ``upper`` that are new or changed against ``lower``, with whiteouts.

    A ``None`` stat marks a whiteout.  Directories appear when they changed or
    hold something that did, so every entry's parent is in the layer.
    """
    out: list[tuple[str, os.stat_result | None]] = []

    def walk(rel: str) -> bool:
        up_dir, low_dir = (upper / rel, lower / rel) if rel else (upper, lower)
        ups = {n for n in os.listdir(up_dir)}
        lows = {n for n in os.listdir(low_dir)} if low_dir.is_dir() and not low_dir.is_symlink() else set()
        start = len(out)
        for name in sorted(ups | lows):
            r = f"{rel}/{name}" if rel else name
            if name not in ups:
                if keep(r, stat.S_ISREG(os.lstat(low_dir / name).st_mode), keep_dev):
                    out.append((f"{rel}/.wh.{name}" if rel else f".wh.{name}", None))
                continue
            st = os.lstat(upper / r)
            is_dir = stat.S_ISDIR(st.st_mode)
            if not keep(r, stat.S_ISREG(st.st_mode), keep_dev):
                continue
            old = os.lstat(lower / r) if name in lows else None
            changed = old is None or not _same(old, st, lower / r, upper / r)
            if is_dir:
                mark = len(out)
                out.append((r, st))
                if not walk(r) and not changed:
                    del out[mark]
            elif changed:
                out.append((r, st))
        return len(out) > start

    walk("")
    return out


def _tarinfo(root: Path, rel: str, st: os.stat_result | None) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(rel)
    ti.mtime = min(int(st.st_mtime), EPOCH) if st is not None else EPOCH
    ti.uname = ti.gname = ""
    if st is None:  # whiteout: an empty regular file
        ti.mode = 0o644
        return ti
    ti.mode = stat.S_IMODE(st.st_mode)
    ti.uid, ti.gid = st.st_uid, st.st_gid
    if stat.S_ISDIR(st.st_mode):
        ti.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        ti.type = tarfile.SYMTYPE
        ti.linkname = os.readlink(root / rel)
    elif stat.S_ISREG(st.st_mode):
        ti.size = st.st_size
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        ti.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(st.st_mode):
        ti.type = tarfile.FIFOTYPE
    else:
        raise ValueError(f"{rel}: sockets do not go into images")
    return ti


def write_layer(
    root: Path, out_dir: Path, name: str, lower: Path | None = None, keep_dev: bool = False
) -> Layer:
    """The layer of tree ``root`` (against ``lower`` when given) as ``out_dir/name.tar`` and ``.tar.gz``."""
    if lower is None:
        entries: list[tuple[str, os.stat_result | None]] = [
            (r, st) for r, st in _entries(root) if keep(r, stat.S_ISREG(st.st_mode), keep_dev)
        ]
    else:
        entries = _diff(lower, root, keep_dev)
    tar_path, gz_path = out_dir / f"{name}.tar", out_dir / f"{name}.tar.gz"
    first_path: dict[tuple[int, int], str] = {}
    devices = 0
    with tar_path.open("wb") as raw:
        hashing = _Hashing(raw)
        with tarfile.open(fileobj=hashing, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for rel, st in entries:
                ti = _tarinfo(root, rel, st)
                if st is not None and ti.isfile() and st.st_nlink > 1:
                    # A hard link points at the first path of its inode *in this layer*, never at a
                    # lower layer's file (that would be a link leaving the layer).
                    key = (st.st_dev, st.st_ino)
                    if key in first_path:
                        ti.type, ti.linkname, ti.size = tarfile.LNKTYPE, first_path[key], 0
                    else:
                        first_path[key] = rel
                devices += ti.ischr() or ti.isblk()
                if ti.isfile() and st is not None:
                    with (root / rel).open("rb") as fh:
                        tf.addfile(ti, fh)
                else:
                    tf.addfile(ti)
        diff_id = "sha256:" + hashing.h.hexdigest()
    with tar_path.open("rb") as src, gz_path.open("wb") as dst:
        gz_hash = _Hashing(dst)
        with gzip.GzipFile(filename="", fileobj=gz_hash, mode="wb", mtime=0, compresslevel=6) as g:
            shutil.copyfileobj(src, g, CHUNK)
    return Layer(
        tar_path, diff_id, gz_path, "sha256:" + gz_hash.h.hexdigest(), gz_hash.n, len(entries), devices
    )


def image_config(layers: list[Layer], config: dict[str, Any], history: list[str]) -> bytes:
    """The OCI image config JSON: ``config`` (Entrypoint, Cmd, …) over ``layers``."""
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "created": CREATED,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": CREATED, "created_by": h} for h in history],
    }
    return json.dumps(doc, sort_keys=True, indent=1).encode()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mtime = kind, size, EPOCH
    ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    ti.uname = ti.gname = ""
    return ti


def _publish(tmp: Path, out: Path) -> str:
    """Rename ``tmp`` to ``out``; returns the archive's sha256 (hex)."""
    h = hashlib.sha256()
    with tmp.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    tmp.chmod(0o644)
    os.replace(tmp, out)
    return h.hexdigest()


def write_oci_archive(out: Path, ref: str, layers: list[Layer], config: bytes) -> str:
    """An OCI image layout tar at ``out``; returns its sha256 (hex)."""
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _sha(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer.digest,
                    "size": layer.size,
                }
                for layer in layers
            ],
        },
        sort_keys=True,
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _sha(manifest),
                    "size": len(manifest),
                    "annotations": {"org.opencontainers.image.ref.name": ref},
                    "platform": {"architecture": "amd64", "os": "linux"},
                }
            ],
        },
        sort_keys=True,
    ).encode()
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(_info("oci-layout", 30), io.BytesIO(b'{"imageLayoutVersion":"1.0.0"}'))
        tf.addfile(_info("index.json", len(index)), io.BytesIO(index))
        tf.addfile(_info("blobs", kind=tarfile.DIRTYPE))
        tf.addfile(_info("blobs/sha256", kind=tarfile.DIRTYPE))
        for digest, data in ((_sha(manifest), manifest), (_sha(config), config)):
            tf.addfile(_info(f"blobs/sha256/{digest[7:]}", len(data)), io.BytesIO(data))
        for layer in layers:
            with layer.gz.open("rb") as fh:
                tf.addfile(_info(f"blobs/sha256/{layer.digest[7:]}", layer.size), fh)
    return _publish(tmp, out)


def write_docker_archive(out: Path, tag: str, layers: list[Layer], config: bytes) -> str:
    """A ``docker save`` archive at ``out`` (uncompressed layers); returns its sha256 (hex)."""
    config_name = f"{_sha(config)[7:]}.json"
    layer_names = [f"{layer.diff_id[7:]}/layer.tar" for layer in layers]
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]).encode()
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for layer, name in zip(layers, layer_names, strict=True):
            tf.addfile(_info(name.split("/")[0], kind=tarfile.DIRTYPE))
            with layer.tar.open("rb") as fh:
                tf.addfile(_info(name, layer.tar.stat().st_size), fh)
        tf.addfile(_info(config_name, len(config)), io.BytesIO(config))
        tf.addfile(_info("manifest.json", len(manifest)), io.BytesIO(manifest))
    return _publish(tmp, out)
