"""Base images cached by digest on the node, and per-VM qcow2 overlays.

A cached base is ``<root>/<sha256 hex>.<format>``, written once through a
temporary file, verified, then renamed into place and never modified (VMs'
overlays point at it).  Sources are absolute local paths (sample images) or
http(s) URLs, both streamed through sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any

from compute import fetch
from compute.spec import ImageFormat, ImageRef

CHUNK = 1 << 20


class ImageError(Exception):
    """An image could not be fetched, verified or used; one sentence."""


def qemu_img_info(path: Path) -> dict[str, Any]:
    proc = subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(path)], check=False, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise ImageError(f"qemu-img info {path.name} failed: {proc.stderr.strip()[-300:]}")
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


class ImageCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, ref: ImageRef) -> Path:
        return self.root / f"{ref.digest.removeprefix('sha256:')}.{ref.format.value}"

    def fetch(self, ref: ImageRef, timeout: float = 300.0) -> Path:
        """Path of the verified cached base for ``ref``, fetching it if missing."""
        if ref.format not in (ImageFormat.QCOW2, ImageFormat.RAW):
            raise ImageError(f"image {ref.name}: format {ref.format.value} is not a VM disk")
        dest = self.path_for(ref)
        if dest.exists():
            return dest
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        fd, tmpname = tempfile.mkstemp(prefix=".fetch-", dir=self.root)
        tmp = Path(tmpname)
        try:
            with os.fdopen(fd, "wb") as out:
                digest = self._copy(ref, out, timeout)
            if f"sha256:{digest}" != ref.digest:
                raise ImageError(f"image {ref.name}: sha256 mismatch (got {digest})")
            self._check_disk(ref, tmp)
            tmp.chmod(0o644)
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    @staticmethod
    def _copy(ref: ImageRef, out: IO[bytes], timeout: float) -> str:
        h = hashlib.sha256()
        loc = ref.location
        try:
            if loc.startswith(("http://", "https://")):
                with fetch.open_url(loc, timeout) as src:
                    _pump(src, out, h)
                fetch.downloads.add(ref.digest)
            elif os.path.isabs(loc):
                with open(loc, "rb") as src:
                    _pump(src, out, h)
            else:
                raise ImageError(f"image {ref.name}: location must be an absolute path or http(s) URL")
        except fetch.FetchError as exc:
            raise ImageError(f"image {ref.name}: {exc}") from exc
        except OSError as exc:
            raise ImageError(f"image {ref.name}: cannot read {loc}: {exc}") from exc
        return h.hexdigest()

    def digests(self) -> list[str]:
        """Digests of the verified bases in the cache."""
        if not self.root.is_dir():
            return []
        return sorted(
            f"sha256:{p.name.split('.', 1)[0]}" for p in self.root.iterdir() if not p.name.startswith(".")
        )

    @staticmethod
    def _check_disk(ref: ImageRef, path: Path) -> None:
        # A qcow2 with a backing file could make QEMU open any host file.
        info = qemu_img_info(path)
        if info.get("format") != ref.format.value:
            raise ImageError(f"image {ref.name}: is {info.get('format')}, not {ref.format.value}")
        if "backing-filename" in info or "data-file" in info.get("format-specific", {}).get("data", {}):
            raise ImageError(f"image {ref.name}: has a backing or external data file")


def _pump(src: IO[bytes], out: IO[bytes], h: Any) -> None:
    while chunk := src.read(CHUNK):
        h.update(chunk)
        out.write(chunk)


def create_overlay(base: Path, base_format: str, overlay: Path, size_bytes: int = 0) -> None:
    """qcow2 overlay on ``base``, grown to ``size_bytes`` if that is larger."""
    virtual = int(qemu_img_info(base)["virtual-size"])
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(overlay)]
    if size_bytes > virtual:
        cmd.append(str(size_bytes))
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageError(f"qemu-img create failed: {proc.stderr.strip()[-300:]}")
    overlay.chmod(0o644)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
