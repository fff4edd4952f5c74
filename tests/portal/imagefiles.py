"""Builders of small, real image files for the images tests: qcow2 disks, OCI and docker archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

Member = Callable[[tarfile.TarFile], None]


def qcow2(path: Path, size: str = "16M", backing: str | None = None) -> Path:
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        cmd += ["-b", backing, "-F", "raw"]
    subprocess.run([*cmd, str(path), size], check=True)
    return path


def add_file(name: str, data: bytes, mode: int = 0o644) -> Member:
    def add(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), mode, 1_700_000_000
        tf.addfile(info, io.BytesIO(data))

    return add


def add_special(name: str, kind: bytes, linkname: str = "", major: int = 8, minor: int = 0) -> Member:
    def add(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mtime = kind, linkname, 1_700_000_000
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = major, minor
        tf.addfile(info)

    return add


def tar_bytes(*members: Member) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for add in members:
            add(tf)
    return buf.getvalue()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_for(layers: list[bytes], cmd: tuple[str, ...] = ("/bin/sh",)) -> bytes:
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [digest(x) for x in layers]},
        },
        sort_keys=True,
    ).encode()


def oci_archive(
    path: Path, layers: list[bytes], *outer_extra: Member, config: bytes | None = None, gzipped: bool = False
) -> Path:
    """An OCI image layout tar, its layers uncompressed or (``gzipped``) tar+gzip.

    The config's ``rootfs.diff_ids`` are the digests of the uncompressed layers.
    """
    config = config if config is not None else config_for(layers)
    media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gzipped else "")
    if gzipped:
        layers = [gzip.compress(x, mtime=0) for x in layers]
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest(config),
                "size": len(config),
            },
            "layers": [{"mediaType": media, "digest": digest(x), "size": len(x)} for x in layers],
        }
    ).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [descriptor(manifest)]}).encode()
    return layout_archive(path, index, [config, manifest, *layers], *outer_extra)


def descriptor(
    blob: bytes, media: str = "application/vnd.oci.image.manifest.v1+json", **extra: object
) -> dict[str, object]:
    return {"mediaType": media, "digest": digest(blob), "size": len(blob), **extra}


def layout_archive(path: Path, index: bytes, blobs: list[bytes], *outer_extra: Member) -> Path:
    """An OCI image layout tar with this ``index.json`` (raw bytes, valid or not) and these blobs."""
    members: list[Member] = [
        add_file("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
        add_file("index.json", index),
    ]
    members += [add_file(f"blobs/sha256/{d[7:]}", b) for d, b in {digest(b): b for b in blobs}.items()]
    path.write_bytes(tar_bytes(*members, *outer_extra))
    return path


def docker_archive(path: Path, layers: list[bytes]) -> Path:
    """A classic ``docker save`` archive: manifest.json, <config>.json, <id>/layer.tar."""
    config = config_for(layers)
    names = [f"{digest(x)[7:]}/layer.tar" for x in layers]
    manifest = json.dumps([{"Config": f"{digest(config)[7:]}.json", "RepoTags": ["app:1"], "Layers": names}])
    members = [add_file("manifest.json", manifest.encode()), add_file(f"{digest(config)[7:]}.json", config)]
    members += [add_file(n, x) for n, x in zip(names, layers, strict=True)]
    path.write_bytes(tar_bytes(*members))
    return path


BASE = tar_bytes(add_file("bin/sh", b"#!fake shell\n", 0o755), add_file("etc/os-release", b"ID=skyport\n"))
APP_A = tar_bytes(add_file("app/a.txt", b"application A\n"))
APP_B = tar_bytes(add_file("app/b.txt", b"application B\n"))
