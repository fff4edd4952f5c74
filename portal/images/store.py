"""The content-addressed blob store: ``<root>/blobs/sha256/<hex>``.

Every stored file is named by the sha256 of its content, so a VM disk or a
container layer uploaded twice, or shared by two images, is stored once.
Files arrive in ``<root>/tmp`` (uploads, staged archive members) and are
renamed into place; a rename is atomic, so a blob is either complete or
absent.  Placing blobs and deleting unreferenced ones happen under one
``flock`` on ``<root>/.lock`` together with the database change that
references or forgets them, so a concurrent import and garbage collection
cannot lose a file that a row points at.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def is_digest(value: str) -> bool:
    return bool(_DIGEST.match(value))


class BlobStore:
    """The store under ``root``; ``tag`` (an import's id) goes into the name of its temporary files."""

    def __init__(self, root: Path, tag: str = "") -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.tmp = root / "tmp"
        self.tag = tag

    def tagged(self, tag: str) -> BlobStore:
        """The same store, naming its temporary files after ``tag`` so they can be found again."""
        return BlobStore(self.root, tag)

    def ensure(self) -> None:
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if not is_digest(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.blobs / digest.removeprefix("sha256:")

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def temp_path(self, prefix: str) -> Path:
        """A fresh name under ``tmp/`` (nothing is created): ``<prefix>-[<tag>-]<random>``."""
        self.ensure()
        tag = f"{self.tag}-" if self.tag else ""
        return self.tmp / f"{prefix}-{tag}{uuid.uuid4().hex}"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.ensure()
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def place(self, temp: Path, digest: str) -> bool:
        """Move ``temp`` (whose content has ``digest``) into the store; call under :meth:`locked`.

        Returns whether the file is new; when the store had it already, ``temp`` is dropped.
        """
        dest = self.path(digest)
        if dest.is_file():
            temp.unlink(missing_ok=True)
            return False
        temp.chmod(0o644)
        os.replace(temp, dest)
        return True

    def touch(self, digest: str) -> None:
        """Mark a stored blob as just used, so garbage collection leaves it alone for a grace period."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path(digest))

    def age(self, digest: str, now: float) -> float | None:
        """Seconds since the blob was placed or last touched; None when it is not there."""
        try:
            return now - self.path(digest).stat().st_mtime
        except FileNotFoundError:
            return None

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def remove_all(self, digests: list[str]) -> None:
        for digest in digests:
            self.remove(digest)

    def digests(self) -> set[str]:
        if not self.blobs.is_dir():
            return set()
        return {f"sha256:{p.name}" for p in self.blobs.iterdir() if is_digest(f"sha256:{p.name}")}

    def temp_files(self, tag: str = "") -> list[Path]:
        """Files under ``tmp/``; with ``tag``, only those of that import."""
        if not self.tmp.is_dir():
            return []
        return sorted(p for p in self.tmp.iterdir() if not tag or f"-{tag}-" in p.name)
