"""Checks an uploaded file before it may become an image artifact.

VM disks: ``qemu-img info`` must see qcow2 or raw (as declared), with no
backing file and no external data file, a virtual size within the limit,
and ``qemu-img check`` must find no corruption.

Container archives: an OCI image layout tar, or a ``docker save`` archive
that is converted to OCI.  Every member of the archive and of every layer
passes the rules of tarfile's ``data_filter`` (no absolute paths, no ``..``,
no links leaving the tree, no device nodes or FIFOs; the filter itself runs
too where the interpreter has it, Debian 12's 3.11.2 does not); the one exception is that a
symlink *inside a layer* may point at an absolute path, because the
container resolves it inside its own root (Debian's /etc/alternatives links
are absolute).  Set-id bits are allowed in the archive and dropped by nodes
when they unpack.  Every blob is verified against its digest; blobs are
staged in the store's ``tmp/`` and only renamed into place by the caller
once the whole archive is accepted.

Nothing here touches the database.  Every refusal is a :class:`Rejected`
whose message says precisely what is wrong.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import subprocess
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol

from compute import safejson
from compute.archive_safety import (
    LayerPaths,
    TooLarge,
    UnpackBudget,
    UnpackLimits,
    member_path,
    skipped_device,
)
from compute.layers import ImageError, image_config, whiteout_problem
from portal.images.store import BlobStore, is_digest

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
MAX_JSON = 4 << 20
_CHECK_DEST = "/nonexistent/skyport-check"

MEDIA_DISK = {"qcow2": "application/vnd.skyport.disk.qcow2", "raw": "application/vnd.skyport.disk.raw"}
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
_MANIFEST_TYPES = {MEDIA_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"}
_INDEX_TYPES = {MEDIA_INDEX, "application/vnd.docker.distribution.manifest.list.v2+json"}
_LAYER_TYPES = {
    MEDIA_LAYER,
    MEDIA_LAYER + "+gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
}


class Rejected(Exception):
    """The file cannot become an artifact; the message is the reason shown to the user."""


@dataclasses.dataclass
class StagedBlob:
    digest: str
    size: int
    media_type: str
    path: Path | None  # a file under the store's tmp/, or None when the store already has it


@dataclasses.dataclass
class Checked:
    """An accepted artifact: its format, its digest and the blobs that make it up."""

    format: str  # qcow2 | raw | oci
    digest: str  # the disk's sha256, or the OCI manifest's
    blobs: list[StagedBlob]
    virtual_size: int = 0
    detail: str = ""
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # the image's ImageConfig

    def discard(self) -> None:
        for blob in self.blobs:
            if blob.path is not None:
                blob.path.unlink(missing_ok=True)


def _json(data: bytes | str, what: str) -> Any:
    """``data`` parsed as JSON, or a :class:`Rejected` that names ``what`` and where it breaks."""
    try:
        return safejson.loads(data)
    except ValueError as exc:  # JSONDecodeError, TooDeep, and UnicodeDecodeError for bytes that are not UTF-8
        raise Rejected(f"{what} is not valid JSON: {exc}") from exc


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------------------- VM disks


def _qemu_img(timeout: float, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["qemu-img", *args], check=False, capture_output=True, text=True, timeout=timeout
        )
    except FileNotFoundError as exc:
        raise Rejected("qemu-img is not installed on the portal host; disks cannot be checked") from exc
    except subprocess.TimeoutExpired as exc:
        raise Rejected(f"qemu-img {args[0]} did not finish within {timeout:g} s") from exc


def check_disk(
    path: Path,
    digest: str,
    declared: str,
    max_virtual: int,
    timeout: float = 100.0,
    limit_source: str = "SKYPORT_IMAGE_MAX_VIRTUAL_BYTES",
) -> Checked:
    """Accept ``path`` as a VM disk of format ``declared`` (qcow2 or raw).

    Each qemu-img run is stopped after ``timeout`` seconds (the caller keeps
    both runs below the broker's visibility timeout).  ``limit_source`` says
    where ``max_virtual`` comes from, for the refusal.
    """
    proc = _qemu_img(timeout, "info", "--output=json", "-U", str(path))
    if proc.returncode != 0:
        raise Rejected(f"qemu-img info cannot read the file: {proc.stderr.strip()[-200:]}")
    info = _json(proc.stdout, "the output of qemu-img info")
    if not isinstance(info, dict):
        raise Rejected("qemu-img info printed no description of the file")
    seen = str(info.get("format", ""))
    if seen not in MEDIA_DISK:
        raise Rejected(f"qemu-img sees format '{seen}'; only qcow2 and raw disks are accepted")
    if seen != declared:
        raise Rejected(f"declared as {declared} but qemu-img sees {seen}")
    if "backing-filename" in info:
        raise Rejected(
            f"the qcow2 has a backing file ({info['backing-filename']}); "
            "upload a standalone image (qemu-img convert -O qcow2)"
        )
    data = info.get("format-specific", {}).get("data", {})
    if "data-file" in data:
        raise Rejected(f"the qcow2 uses an external data file ({data['data-file']})")
    if data.get("corrupt"):
        raise Rejected("the qcow2 is marked corrupt")
    virtual = int(info.get("virtual-size", 0))
    if virtual <= 0:
        raise Rejected("the disk has no virtual size")
    if virtual > max_virtual:
        raise Rejected(
            f"virtual size {virtual / 2**30:.1f} GiB exceeds the limit of {max_virtual / 2**30:g} GiB "
            f"({limit_source})"
        )
    if seen == "qcow2":
        check = _qemu_img(timeout, "check", "--output=json", "-U", "-f", "qcow2", str(path))
        if check.returncode not in (0, 3):  # 3: leaked clusters only, harmless
            try:
                result = json.loads(check.stdout)
                why = (
                    f"{result.get('corruptions', '?')} corruptions, "
                    f"{result.get('check-errors', 0)} check errors"
                )
            except ValueError:
                why = check.stderr.strip()[-200:] or f"exit code {check.returncode}"
            raise Rejected(f"qemu-img check finds the qcow2 damaged or truncated: {why}")
    size = path.stat().st_size
    return Checked(
        format=seen,
        digest=digest,
        blobs=[StagedBlob(digest, size, MEDIA_DISK[seen], path)],
        virtual_size=virtual,
        detail=f"{seen}, virtual size {virtual / 2**20:.0f} MiB, {size / 2**20:.1f} MiB stored",
    )


# -------------------------------------------------------------------------------- tar members


def _outside(path: str) -> bool:
    """Whether a relative path climbs above its root once normalised."""
    depth = 0
    for part in PurePosixPath(path).parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return True
    return False


def _data_filter_rules(member: tarfile.TarInfo) -> None:
    """The rules of tarfile's ``data_filter`` (PEP 706), for Pythons that lack it.

    Debian 12's Python 3.11.2 predates the filter; where the interpreter has
    it, :func:`_filter` runs it as well.
    """
    name = member.name
    if name.startswith("/"):
        raise Rejected(f"{name!r} is an absolute path")
    if _outside(name):
        raise Rejected(f"{name!r} would be extracted outside the destination")
    if member.issym() or member.islnk():
        target = member.linkname
        if target.startswith("/"):
            raise Rejected(f"{name!r} links to the absolute path {target!r}")
        base = str(PurePosixPath(name).parent) if member.issym() else "."
        if _outside(f"{base}/{target}"):
            raise Rejected(f"{name!r} links to {target!r}, outside the destination")
    elif not (member.isfile() or member.isdir()):
        raise Rejected(f"{name!r} is a special file")


def _filter(member: tarfile.TarInfo, where: str) -> None:
    if member.ischr() or member.isblk():
        raise Rejected(f"{where}: {member.name!r} is a device node")
    if member.isfifo():
        raise Rejected(f"{where}: {member.name!r} is a FIFO")
    try:
        _data_filter_rules(member)
    except Rejected as exc:
        raise Rejected(f"{where}: {exc}") from exc
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is not None:
        try:
            data_filter(member, _CHECK_DEST)
        except tarfile.TarError as exc:  # FilterError and its subclasses
            raise Rejected(f"{where}: {exc}") from exc


def check_layer_member(member: tarfile.TarInfo, layer: str) -> None:
    where = f"layer {layer[7:19]}"
    # the nodes' own rule (compute/layers.py), applied here first so the image fails with a reason
    problem = whiteout_problem(PurePosixPath(member.name).name)
    if problem is not None:
        raise Rejected(f"{where}: member {member.name!r}: {problem}")
    if member.issym():
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts:
            raise Rejected(f"{where}: unsafe path {member.name!r}")
        if not member.linkname.startswith("/") and _outside(f"{name.parent}/{member.linkname}"):
            raise Rejected(f"{where}: symlink {member.name!r} -> {member.linkname!r} leaves the image")
        return
    _filter(member, where)


class _Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Peeked:
    """``src`` with ``head``, bytes already read from it to sniff the compression, put back in front."""

    def __init__(self, head: bytes, src: _Reader) -> None:
        self.head = head
        self.src = src

    def read(self, n: int = -1, /) -> bytes:
        if not self.head:
            return self.src.read(n)
        if n < 0:
            data, self.head = self.head + self.src.read(n), b""
        else:
            data, self.head = self.head[:n], self.head[n:]
        return data


class _TeeReader:
    """Reads ``src``, writes what it read to ``out`` (if any) and hashes it."""

    def __init__(self, src: _Reader, out: IO[bytes] | None) -> None:
        self.src = src
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self.src.read(n)
        self.hash.update(data)
        self.size += len(data)
        if self.out is not None:
            self.out.write(data)
        return data

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


# ------------------------------------------------------------------------------ OCI archives


class _Archive:
    """The outer tar with every member checked once, read by name."""

    def __init__(self, tf: tarfile.TarFile) -> None:
        self.tf = tf
        self.members: dict[str, tarfile.TarInfo] = {}
        for m in tf.getmembers():
            _filter(m, "archive")
            self.members[str(PurePosixPath(m.name))] = m

    def open(self, name: str) -> IO[bytes]:
        m = self.members.get(str(PurePosixPath(name)))
        fh = self.tf.extractfile(m) if m is not None else None
        if fh is None:
            raise Rejected(f"archive lacks {name}")
        return fh

    def read_json(self, name: str) -> tuple[bytes, Any]:
        with self.open(name) as fh:
            data = fh.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise Rejected(f"{name} is larger than {MAX_JSON} bytes")
        return data, _json(data, name)


#: Without the portal's limits (portal/images/limits.py): bounds that only keep a checker's memory
#: and time finite.
UNLIMITED = UnpackLimits(total_bytes=2**50, file_bytes=2**50, files=10_000_000)


def check_archive(path: Path, store: BlobStore, limits: UnpackLimits = UNLIMITED) -> Checked:
    """Accept ``path`` as an OCI layout archive or a ``docker save`` archive; stage its blobs.

    What its layers unpack to is counted while they are read, against ``limits``.
    """
    budget = UnpackBudget(limits)
    try:
        tf = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as exc:
        # tarfile's own message lists every decompressor it tried ("ReadError('not a gzip
        # file') - method bz2 ..."): say what is wrong in words instead
        raise Rejected(
            "not a tar archive (plain, gzip, bzip2 or xz): an OCI image archive is a tar file, "
            "as written by `skopeo copy ... oci-archive:FILE` or `docker save`"
        ) from exc
    staged: list[StagedBlob] = []
    try:
        with tf:
            archive = _Archive(tf)
            if "index.json" in archive.members:
                result = _oci_layout(archive, store, staged, budget)
            elif "manifest.json" in archive.members:
                result = _docker_save(archive, store, staged, budget)
            else:
                raise Rejected(
                    "neither an OCI image layout (index.json) nor a docker save archive (manifest.json)"
                )
    except Rejected:
        Checked("oci", "", staged).discard()
        raise
    except (tarfile.TarError, OSError, EOFError) as exc:
        Checked("oci", "", staged).discard()
        raise Rejected(f"the archive is damaged or truncated: {exc}") from exc
    except BaseException:
        Checked("oci", "", staged).discard()
        raise
    return result


def _blob_name(digest: str) -> str:
    return f"blobs/sha256/{digest.removeprefix('sha256:')}"


def _stage_bytes(store: BlobStore, data: bytes, media_type: str, staged: list[StagedBlob]) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path: Path | None = None
    if store.has(digest):
        store.touch(digest)  # reused: keep it out of garbage collection until this import ends
    else:
        path = store.temp_path("blob")
        path.write_bytes(data)
    staged.append(StagedBlob(digest, len(data), media_type, path))
    return digest


def _stage_layer(
    store: BlobStore,
    src: IO[bytes] | None,
    digest: str,
    media_type: str,
    staged: list[StagedBlob],
    budget: UnpackBudget,
) -> tuple[StagedBlob, str]:
    """Copy one layer into tmp/ while hashing it and checking each of its members.

    Returns the staged blob and the layer's diff_id: the sha256 of the
    uncompressed tar, which the image config lists in ``rootfs.diff_ids``.
    With ``src`` None the layer is in the store already and is not read from
    the archive; it is read from the store instead, so this image's limits
    and the path rules apply to it as well.
    """
    if src is None:
        store.touch(digest)  # reused: keep it out of garbage collection until this import ends
        stored = store.path(digest)
        blob = StagedBlob(digest, stored.stat().st_size, media_type, None)
        staged.append(blob)
        return blob, _stored_diff_id(stored, digest, budget)
    path = store.temp_path("layer")
    blob = StagedBlob(digest, 0, media_type, path)
    staged.append(blob)
    with path.open("wb") as out:
        tee, diff_id = _scan_layer(src, out, digest, budget, f"layer {digest[7:19]}")
    blob.size = tee.size
    if tee.digest != digest:
        raise Rejected(f"layer {digest} does not match its digest (content is {tee.digest})")
    return blob, diff_id


class _Counted:
    """A layer's uncompressed tar stream, every byte read counted against the image's budget."""

    def __init__(self, src: _Reader, budget: UnpackBudget) -> None:
        self.src = src
        self.budget = budget

    def read(self, n: int = -1, /) -> bytes:
        data = self.src.read(n)
        self.budget.count_stream(len(data))
        return data


def _scan_layer(
    src: _Reader, out: IO[bytes] | None, digest: str, budget: UnpackBudget, where: str
) -> tuple[_TeeReader, str]:
    """Read one layer to its end: hash it (and copy it to ``out``), check every member with the
    nodes' rules, count what it unpacks to.  Returns the reader of the layer as stored (its
    digest and size) and the diff_id.  Nothing is unpacked or written but the copy."""
    tee = _TeeReader(src, out)
    head = tee.read(len(GZIP_MAGIC))
    body = _Peeked(head, tee)
    # GzipFile reads its file forward only (it seeks only when it is itself rewound).
    gunzip = gzip.GzipFile(fileobj=body, mode="rb") if head == GZIP_MAGIC else None  # type: ignore[call-overload]
    plain = _TeeReader(gunzip, None) if gunzip is not None else None
    stream = _Counted(plain or body, budget)
    paths = LayerPaths()  # the nodes' rule for symlinks and hard links (compute/archive_safety.py)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as layer:  # type: ignore[call-overload]
            for member in layer:
                if skipped_device(member):
                    budget.skipped.append(str(member_path(member.name)))
                    continue
                check_layer_member(member, digest)
                problem = paths.check(member)
                if problem is not None:
                    raise Rejected(f"{where}: {problem}")
                budget.count_member(member)
        while stream.read(CHUNK):  # the end of the stream: padding, the rest of the gzip stream
            pass
    except TooLarge as exc:
        raise Rejected(f"{where}: {exc}") from exc
    except tarfile.TarError as exc:
        raise Rejected(f"{where} is not a valid tar: {exc}") from exc
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise Rejected(f"{where} is not a valid gzip stream: {exc}") from exc
    while tee.read(CHUNK):  # anything after the end of the gzip stream counts for the digest too
        pass
    return tee, (plain or tee).digest


def _stored_diff_id(path: Path, digest: str, budget: UnpackBudget) -> str:
    """The diff_id of a stored layer, read again with this image's checks: its own digest, or the
    sha256 of its content once gunzipped."""
    with path.open("rb") as fh:
        _, diff_id = _scan_layer(fh, None, digest, budget, f"the stored layer {digest}")
    return diff_id


def _descriptor(value: Any, what: str) -> tuple[str, int, str]:
    if not isinstance(value, dict):
        raise Rejected(f"{what} is not a descriptor")
    digest, size, media = value.get("digest"), value.get("size", -1), value.get("mediaType", "")
    if not isinstance(digest, str) or not is_digest(digest):
        raise Rejected(f"{what} has no sha256 digest")
    if not isinstance(size, int) or size < 0:
        raise Rejected(f"{what} has no size")
    return digest, size, str(media)


def _read_blob(archive: _Archive, digest: str, size: int, what: str) -> bytes:
    if size > MAX_JSON:
        raise Rejected(f"{what} is larger than {MAX_JSON} bytes")
    with archive.open(_blob_name(digest)) as fh:
        data = fh.read(MAX_JSON + 1)
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != digest:
        raise Rejected(f"{what} {digest} does not match its digest (content is {got})")
    return data


def _pick_manifest(archive: _Archive, entries: Any) -> tuple[str, int]:
    if not isinstance(entries, list) or not entries:
        raise Rejected("index.json lists no manifest")
    where = "index.json"
    for _ in range(2):  # an index may point at one nested index
        descs = [(*_descriptor(e, f"{where} entry"), _platform(e, where)) for e in entries]
        amd64 = [
            d
            for d in descs
            if d[3].get("os", "linux") == "linux" and d[3].get("architecture", "amd64") == "amd64"
        ]
        if len(amd64) != 1:
            raise Rejected(f"index lists {len(amd64)} linux/amd64 manifests; exactly one is needed")
        digest, size, media, _ = amd64[0]
        if media not in _INDEX_TYPES:
            return digest, size
        nested = _json(_read_blob(archive, digest, size, "nested index"), f"the nested index {digest}")
        entries = nested.get("manifests") if isinstance(nested, dict) else None
        where = f"the nested index {digest[7:19]}"
        if not isinstance(entries, list) or not entries:
            raise Rejected("nested index lists no manifest")
    raise Rejected("indexes nested more than one level deep are not accepted")


def _platform(entry: dict[str, Any], where: str) -> dict[str, Any]:
    platform = entry.get("platform")
    if platform is None:
        return {}
    if not isinstance(platform, dict):
        raise Rejected(f"{where} entry {entry.get('digest')} has a platform that is not an object")
    return platform


def _oci_layout(
    archive: _Archive, store: BlobStore, staged: list[StagedBlob], budget: UnpackBudget
) -> Checked:
    _, index = archive.read_json("index.json")
    if not isinstance(index, dict):
        raise Rejected("index.json is not an object")
    digest, size = _pick_manifest(archive, index.get("manifests"))
    raw_manifest = _read_blob(archive, digest, size, "manifest")
    manifest = _json(raw_manifest, f"the manifest {digest}")
    if not isinstance(manifest, dict) or manifest.get("schemaVersion") != 2:
        raise Rejected("the manifest is not an image manifest (schemaVersion 2)")
    if manifest.get("mediaType", MEDIA_MANIFEST) not in _MANIFEST_TYPES:
        raise Rejected(f"unsupported manifest media type {manifest.get('mediaType')!r}")
    config_digest, config_size, _ = _descriptor(manifest.get("config"), "manifest config")
    config = _read_blob(archive, config_digest, config_size, "image config")
    diff_ids = _check_config(config)
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise Rejected("the manifest has no layer list")
    if len(layers) != len(diff_ids):
        raise Rejected(f"the manifest lists {len(layers)} layers but the config {len(diff_ids)} diff_ids")
    _stage_bytes(store, raw_manifest, MEDIA_MANIFEST, staged)
    _stage_bytes(store, config, MEDIA_CONFIG, staged)
    total = 0
    for i, layer in enumerate(layers):
        d, s, media = _descriptor(layer, f"layer {i}")
        if media not in _LAYER_TYPES:
            raise Rejected(f"layer {d[7:19]} has media type {media!r}; only tar and tar+gzip layers run here")
        if store.has(d):
            blob, diff_id = _stage_layer(store, None, d, media, staged, budget)
        else:
            with archive.open(_blob_name(d)) as fh:
                blob, diff_id = _stage_layer(store, fh, d, media, staged, budget)
        if blob.size != s:
            raise Rejected(f"layer {d[7:19]} is {blob.size} bytes, the manifest says {s}")
        if diff_id != diff_ids[i]:
            raise Rejected(
                f"layer {d[7:19]} unpacks to {diff_id}, "
                f"but the config's rootfs.diff_ids[{i}] is {diff_ids[i]}"
            )
        total += s
    detail = f"OCI image, {len(layers)} layers, {total / 2**20:.1f} MiB{_skipped_note(budget)}"
    return Checked("oci", digest, staged, detail=detail, config=runtime_config(config))


def runtime_config(config: bytes) -> dict[str, Any]:
    """The runtime part of an image config (what a node honours), as recorded on the artifact."""
    data = _json(config, "the image config")
    try:
        return dataclasses.asdict(image_config(data if isinstance(data, dict) else {}))
    except ImageError as exc:
        raise Rejected(str(exc)) from exc


def _check_config(config: bytes) -> list[str]:
    data = _json(config, "the image config")
    if not isinstance(data, dict):
        raise Rejected("the image config is not an object")
    if data.get("os", "linux") != "linux":
        raise Rejected(f"the image is for {data.get('os')!r}; nodes run linux containers")
    if data.get("architecture", "amd64") not in ("amd64", "x86_64"):
        raise Rejected(f"the image is for {data.get('architecture')!r}; nodes are amd64")
    rootfs = data.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) and is_digest(d) for d in diff_ids):
        raise Rejected("the image config has no rootfs.diff_ids")
    return [str(d) for d in diff_ids]


def _skipped_note(budget: UnpackBudget) -> str:
    if not budget.skipped:
        return ""
    names = ", ".join(sorted(set(budget.skipped)))
    return f"; {len(budget.skipped)} device nodes skipped (containers get their own /dev): {names}"


def _docker_save(
    archive: _Archive, store: BlobStore, staged: list[StagedBlob], budget: UnpackBudget
) -> Checked:
    """Convert a ``docker save`` archive (manifest.json, config, layer tars) to an OCI image."""
    _, entries = archive.read_json("manifest.json")
    if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
        n = len(entries) if isinstance(entries, list) else 0
        raise Rejected(f"the docker archive holds {n} images; save exactly one")
    entry = entries[0]
    config_name, layer_names = entry.get("Config"), entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list):
        raise Rejected("manifest.json has no Config or Layers")
    config, _ = archive.read_json(config_name)
    diff_ids = _check_config(config)
    if len(diff_ids) != len(layer_names):
        raise Rejected(
            f"manifest.json lists {len(layer_names)} layers but the config {len(diff_ids)} diff_ids"
        )
    config_digest = _stage_bytes(store, config, MEDIA_CONFIG, staged)
    descriptors = []
    for name, diff_id in zip(layer_names, diff_ids, strict=True):
        if not isinstance(name, str):
            raise Rejected("manifest.json lists a layer that is not a path")
        # A docker layer is an uncompressed tar, stored under its diff_id.
        if store.has(diff_id):
            blob, _ = _stage_layer(store, None, diff_id, MEDIA_LAYER, staged, budget)
        else:
            with archive.open(name) as fh:
                blob, _ = _stage_layer(store, fh, diff_id, MEDIA_LAYER, staged, budget)
        descriptors.append({"mediaType": MEDIA_LAYER, "digest": blob.digest, "size": blob.size})
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": descriptors,
    }
    raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    digest = _stage_bytes(store, raw, MEDIA_MANIFEST, staged)
    total = sum(d["size"] for d in descriptors)  # type: ignore[misc]
    return Checked(
        "oci",
        digest,
        staged,
        detail=f"docker archive converted to OCI, {len(descriptors)} layers, {total / 2**20:.1f} MiB"
        f"{_skipped_note(budget)}",
        config=runtime_config(config),
    )
