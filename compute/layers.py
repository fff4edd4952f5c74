"""OCI image archives → per-layer unpacked directories, shared by every image.

An archive is an OCI image layout in a tar (``index.json``, ``blobs/``).  Each
layer is unpacked once per digest into ``<state_dir>/layers/<hex>`` and made
read-only by convention: containers stack these directories as overlay lower
dirs, so two images with the same base layer store it once.  Layer whiteouts
(``.wh.name``, ``.wh..wh..opq``) become overlay whiteouts (0:0 character
device, ``trusted.overlay.opaque`` xattr); a whiteout only ever hides one
entry strictly inside the layer being unpacked (``.wh.``, ``.wh..`` and
``.wh...`` refuse the layer).

Images come either from a local archive (:meth:`LayerStore.unpack`, the
node's own tests) or from the portal's blob endpoint by manifest digest
(:meth:`LayerStore.pull`), which downloads only the layers the store lacks.

Archive and layer members are validated before anything is written: no
absolute paths, no ``..``, no device nodes or FIFOs, no links leaving the
layer, no writes through symlinks; set-uid and set-gid bits are dropped.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import stat
import tarfile
import threading
import uuid
from pathlib import Path, PurePosixPath
from typing import IO, Any

from compute import fetch, safejson
from compute.archive_safety import OPAQUE, WHITEOUT, LayerPaths, member_path, skipped_device

_lock = threading.Lock()


class ImageError(Exception):
    """An image archive is malformed, unsafe or does not match its digest."""


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """The parts of an OCI image config the container driver uses."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str = "/"
    user: str = ""  # name or uid[:gid], resolved inside the image (compute/passwd.py)
    exposed_ports: tuple[str, ...] = ()  # "80/tcp"
    stop_signal: str = ""  # "SIGQUIT"


@dataclasses.dataclass(frozen=True)
class UnpackedImage:
    """Layer directories bottom first, plus the image config."""

    layers: tuple[Path, ...]
    config: ImageConfig

    @property
    def lowerdir(self) -> str:
        """overlay ``lowerdir=`` value: top layer first."""
        return ":".join(str(p) for p in reversed(self.layers))


def _safe_name(name: str) -> PurePosixPath:
    p = member_path(name)
    if p is None:
        raise ImageError(f"unsafe path in archive: {name!r}")
    return p


def _sha256_file(fh: IO[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
    return "sha256:" + h.hexdigest()


def verify_digest(path: Path, digest: str) -> None:
    with path.open("rb") as fh:
        got = _sha256_file(fh)
    if got != digest:
        raise ImageError(f"{path.name}: digest {got} does not match {digest}")


class LayerStore:
    """Unpacks OCI archives into ``<root>/layers/<hex>``, once per layer digest."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "layers"

    def layer_dir(self, digest: str) -> Path:
        return self.root / digest.split(":", 1)[1]

    def layers(self) -> list[str]:
        """Digests of the complete layers in the store."""
        if not self.root.exists():
            return []
        return sorted(f"sha256:{p.name}" for p in self.root.iterdir() if not p.name.startswith("."))

    def unpack(self, archive: Path, digest: str | None = None) -> UnpackedImage:
        """Unpack ``archive`` (checked against ``digest`` if given); idempotent.

        With a digest, the result is remembered in ``layers/.images/<hex>.json``
        so later spawns of the same artifact read neither the archive nor its
        layers again.
        """
        memo = self._memo_path(digest)
        known = self._known(memo)
        if known is not None:
            return known
        if digest is not None:
            verify_digest(archive, digest)
        self.root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r:") as outer:
            members: dict[str, tarfile.TarInfo] = {}
            for m in outer.getmembers():
                name = str(_safe_name(m.name))
                if not (m.isfile() or m.isdir()):
                    raise ImageError(f"archive member {m.name!r} is not a file or directory")
                members[name] = m

            def blob(d: str) -> bytes:
                hexd = d.split(":", 1)[1] if ":" in d else ""
                m = members.get(f"blobs/sha256/{hexd}")
                fh = outer.extractfile(m) if m else None
                if fh is None:
                    raise ImageError(f"archive lacks blob {d}")
                data = fh.read()
                if "sha256:" + hashlib.sha256(data).hexdigest() != d:
                    raise ImageError(f"blob {d} does not match its digest")
                return data

            index = _read_json(outer, members, "index.json")
            manifests = index.get("manifests") or []
            if len(manifests) != 1:
                raise ImageError("index.json must list exactly one manifest")
            manifest = _json_object(blob(manifests[0]["digest"]), "manifest")
            config = _json_object(blob(_manifest_config(manifest)), "image config")
            dirs = []
            for d in _manifest_layers(manifest):
                dest = self.layer_dir(d)
                if not dest.exists():
                    lm = members.get(f"blobs/sha256/{d.split(':', 1)[1]}")
                    fh = outer.extractfile(lm) if lm else None
                    if fh is None:
                        raise ImageError(f"archive lacks layer {d}")
                    self._unpack_layer(fh, d, dest)
                dirs.append(dest)
        return self._remember(memo, UnpackedImage(tuple(dirs), image_config(config)))

    def pull(self, manifest_url: str, digest: str) -> UnpackedImage:
        """Fetch an image from the portal's blob endpoint: manifest, config, then missing layers.

        Each layer is downloaded only when its directory is not in the store,
        and verified while it is unpacked; a second image sharing a base layer
        downloads only its own layers.
        """
        memo = self._memo_path(digest)
        known = self._known(memo)
        if known is not None:
            return known
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            manifest = _json_object(fetch.fetch_bytes(manifest_url, digest), "manifest")
            config_digest = _manifest_config(manifest)
            config_url = fetch.blob_url(manifest_url, config_digest)
            config = _json_object(fetch.fetch_bytes(config_url, config_digest), "image config")
            dirs = []
            for d in _manifest_layers(manifest):
                dest = self.layer_dir(d)
                if not dest.exists():
                    with fetch.open_url(fetch.blob_url(manifest_url, d)) as fh:
                        self._unpack_layer(fh, d, dest)
                    fetch.downloads.add(d)
                dirs.append(dest)
        except fetch.FetchError as exc:
            raise ImageError(str(exc)) from exc
        return self._remember(memo, UnpackedImage(tuple(dirs), image_config(config)))

    def _memo_path(self, digest: str | None) -> Path | None:
        return self.root / ".images" / f"{digest.split(':', 1)[1]}.json" if digest else None

    @staticmethod
    def _known(memo: Path | None) -> UnpackedImage | None:
        if memo is None or not memo.exists():
            return None
        known = _load_memo(memo)
        if known is not None and all(p.is_dir() for p in known.layers):
            return known
        return None

    @staticmethod
    def _remember(memo: Path | None, image: UnpackedImage) -> UnpackedImage:
        if memo is not None:
            memo.parent.mkdir(exist_ok=True)
            tmp = memo.with_name(f".{memo.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_text(
                json.dumps(
                    {"layers": [str(p) for p in image.layers], "config": dataclasses.asdict(image.config)}
                )
            )
            os.replace(tmp, memo)
        return image

    def _unpack_layer(self, fh: IO[bytes], digest: str, dest: Path) -> None:
        tmp = self.root / f".tmp-{dest.name[:12]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(mode=0o755)
        try:
            h = hashlib.sha256()
            reader = _HashingReader(fh, h)
            paths = LayerPaths()  # the rule the portal applied at import (compute/archive_safety.py)
            with tarfile.open(fileobj=reader, mode="r|*") as tf:  # type: ignore[call-overload]
                for m in tf:
                    if skipped_device(m):  # debootstrap's /dev nodes: the runtime makes its own
                        continue
                    problem = paths.check(m)
                    if problem is not None:
                        raise ImageError(f"layer {digest}: {problem}")
                    _extract_member(tf, m, tmp)
            # Read the rest (tar padding) so the digest covers the whole blob.
            while reader.read(1 << 20):
                pass
            if "sha256:" + h.hexdigest() != digest:
                raise ImageError(f"layer {digest} does not match its digest")
            os.chmod(tmp, 0o755)  # noqa: S103 - a rootfs layer must be world-readable
            # The rename publishes a complete layer; a crash leaves only .tmp-*.
            with _lock:
                if dest.exists():
                    shutil.rmtree(tmp)
                    return
                try:
                    os.rename(tmp, dest)
                except OSError as exc:
                    # Another pool process published the same layer since the check above
                    # (the lock orders only this process's threads): keep theirs.
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not dest.is_dir():
                        raise
                    shutil.rmtree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def remove_unused(self, keep: set[str]) -> None:
        """Delete layers not in ``keep`` (digests); callers know which are in use."""
        for d in self.layers():
            if d not in keep:
                shutil.rmtree(self.layer_dir(d), ignore_errors=True)


class _HashingReader:
    def __init__(self, fh: IO[bytes], h: Any) -> None:
        self._fh = fh
        self._h = h

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._h.update(data)
        return data


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = safejson.loads(data)
    except ValueError as exc:  # not JSON, or nested too deep (TooDeep)
        raise ImageError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ImageError(f"{what} is not a JSON object")
    return value


def _manifest_config(manifest: dict[str, Any]) -> str:
    config = manifest.get("config")
    digest = config.get("digest") if isinstance(config, dict) else None
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        raise ImageError("manifest has no sha256 config digest")
    return digest


def _manifest_layers(manifest: dict[str, Any]) -> list[str]:
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ImageError("manifest has no layer list")
    digests = [layer.get("digest") if isinstance(layer, dict) else None for layer in layers]
    for d in digests:
        if not (isinstance(d, str) and len(d) == 71 and d.startswith("sha256:")):
            raise ImageError(f"manifest lists a layer without a sha256 digest: {d!r}")
    return [str(d) for d in digests]


def _read_json(outer: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str) -> dict[str, Any]:
    m = members.get(name)
    fh = outer.extractfile(m) if m else None
    if fh is None:
        raise ImageError(f"archive lacks {name}")
    return _json_object(fh.read(), name)


def _load_memo(path: Path) -> UnpackedImage | None:
    try:
        data = json.loads(path.read_text())
        c = data["config"]
        config = ImageConfig(
            entrypoint=tuple(c["entrypoint"]),
            cmd=tuple(c["cmd"]),
            env=tuple((str(k), str(v)) for k, v in c["env"]),
            working_dir=str(c["working_dir"]),
            user=str(c.get("user", "")),
            exposed_ports=tuple(str(p) for p in c.get("exposed_ports", ())),
            stop_signal=str(c.get("stop_signal", "")),
        )
        return UnpackedImage(tuple(Path(p) for p in data["layers"]), config)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def image_config(config: dict[str, Any]) -> ImageConfig:
    """The runtime part of an OCI (or docker-save: same keys) image config."""
    c = config.get("config") or {}
    if not isinstance(c, dict):
        raise ImageError("image config: 'config' is not an object")
    env = []
    for item in c.get("Env") or []:
        k, _, v = str(item).partition("=")
        env.append((k, v))
    ports = c.get("ExposedPorts") or {}
    return ImageConfig(
        entrypoint=tuple(str(x) for x in c.get("Entrypoint") or ()),
        cmd=tuple(str(x) for x in c.get("Cmd") or ()),
        env=tuple(env),
        working_dir=str(c.get("WorkingDir") or "/"),
        user=str(c.get("User") or ""),
        exposed_ports=tuple(sorted(str(p) for p in ports)) if isinstance(ports, dict) else (),
        stop_signal=str(c.get("StopSignal") or ""),
    )


def _inside(root: Path, path: Path) -> bool:
    real = os.path.realpath(path)
    return real == str(root) or real.startswith(str(root) + os.sep)


def _extract_member(tf: tarfile.TarFile, m: tarfile.TarInfo, root: Path) -> None:  # noqa: PLR0912
    rel = _safe_name(m.name)
    if rel == PurePosixPath("."):
        if m.isdir():
            return
        raise ImageError(f"layer member {m.name!r} has no name")
    if m.ischr() or m.isblk() or m.isfifo() or not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
        raise ImageError(f"layer member {m.name!r}: device nodes and FIFOs are not allowed")
    target = root / rel
    parent = target.parent
    # Never write through a symlink: every parent must resolve inside the layer.
    if not _inside(root.resolve(), parent):
        raise ImageError(f"layer member {m.name!r} would be written outside the layer")
    parent.mkdir(parents=True, exist_ok=True)
    base = rel.name
    if base == OPAQUE:
        os.setxattr(parent, "trusted.overlay.opaque", b"y")
        return
    if base.startswith(WHITEOUT):
        victim = _whiteout_victim(root, parent, m.name, base)
        _remove(victim)
        os.mknod(victim, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        return
    if target.is_symlink() or (target.exists() and not (m.isdir() and target.is_dir())):
        _remove(target)
    # Set-id bits are dropped (as tarfile's data filter does); the sticky bit stays.
    mode = m.mode & 0o1777
    if m.isdir():
        target.mkdir(exist_ok=True)
        os.chmod(target, mode)
    elif m.issym():
        os.symlink(m.linkname, target)
    elif m.islnk():
        src = root / _safe_name(m.linkname)
        if src.is_symlink() or not _inside(root.resolve(), src) or not src.is_file():
            raise ImageError(f"hard link {m.name!r} → {m.linkname!r} leaves the layer")
        os.link(src, target)
    else:
        fh = tf.extractfile(m)
        if fh is None:
            raise ImageError(f"cannot read {m.name!r}")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(fh, out)
        os.chmod(target, mode)
    if not m.islnk():
        os.lchown(target, m.uid, m.gid)
        if m.isfile():
            os.chmod(target, mode)  # chown may change the mode of some files; set it again
        if not m.issym():
            os.utime(target, (m.mtime, m.mtime))


def whiteout_problem(base: str) -> str | None:
    """Why the whiteout file name ``base`` (``.wh.<name>``) is unsafe, or None.

    A whiteout hides exactly one entry of the directory it sits in: ``<name>``
    must be a plain file name.  ``.wh.`` (nothing), ``.wh..`` (the directory
    itself) and ``.wh...`` (its parent) would remove the directory that holds
    the whiteout or the one above it, which at the top of a layer is the
    layer itself or the whole layer store.  ``.wh..wh.*`` names other than
    the opaque marker are AUFS metadata, which no OCI image needs.
    """
    if not base.startswith(WHITEOUT) or base == OPAQUE:
        return None
    name = base[len(WHITEOUT) :]
    if name == "":
        return f"whiteout {base!r} names no entry"
    if name == ".":
        return f"whiteout {base!r} would hide the directory it is in"
    if name == "..":
        return f"whiteout {base!r} would hide the directory above it"
    if "/" in name or "\x00" in name:
        return f"whiteout {base!r} names a path, not a file"
    if name.startswith(WHITEOUT):
        return f"whiteout {base!r} is AUFS metadata, which is not supported"
    return None


def _whiteout_victim(root: Path, parent: Path, member: str, base: str) -> Path:
    """The entry a whiteout member hides; always strictly inside the layer ``root``."""
    problem = whiteout_problem(base)
    if problem is not None:
        raise ImageError(f"layer member {member!r}: {problem}")
    real_root = os.path.realpath(root)
    victim = os.path.join(os.path.realpath(parent), base[len(WHITEOUT) :])
    if not victim.startswith(real_root + os.sep):
        raise ImageError(f"layer member {member!r} would remove something outside the layer")
    return Path(victim)


def _remove(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
