"""Reading image blobs from the portal's authenticated blob endpoint.

The portal serves every stored blob (a VM disk, an OCI manifest, config or
layer) at ``<portal>/api/v1/blobs/sha256:<hex>``.  A node authenticates with
its node key (``Authorization: Node <name>:<key>``; the operator prints the
key with ``manage.py node key <name>``) and verifies every byte it reads
against the digest it asked for, so neither the network nor the portal can
hand it something else.
"""

from __future__ import annotations

import hashlib
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from compute.config import NodeConfig

CHUNK = 1 << 20


class FetchError(Exception):
    """A blob could not be read or did not match its digest; one sentence."""


def node_credentials() -> tuple[str, str] | None:
    """(node name, node key) from the node's settings, or None when no key is set."""
    config = NodeConfig.from_env()
    return (config.name, config.node_key) if config.node_key else None


class _Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_digest: dict[str, int] = {}

    def add(self, digest: str) -> None:
        with self.lock:
            self.by_digest[digest] = self.by_digest.get(digest, 0) + 1


# How often this process downloaded each digest (tests and the heartbeat read it).
downloads = _Counter()


def blob_url(location: str, digest: str) -> str:
    """URL of ``digest`` next to ``location`` (the URL of another blob on the same portal)."""
    base, sep, _ = location.rpartition("/blobs/")
    if not sep:
        raise FetchError(f"{location} is not a portal blob URL")
    return f"{base}/blobs/{digest}"


@contextmanager
def open_url(url: str, timeout: float = 300.0) -> Iterator[IO[bytes]]:
    """An open HTTP response for ``url``, with the node key when one is configured."""
    if not url.startswith(("http://", "https://")):
        raise FetchError(f"{url}: only http(s) URLs are fetched")
    request = urllib.request.Request(url)  # noqa: S310 - scheme checked above
    creds = node_credentials()
    if creds is not None:
        request.add_header("Authorization", f"Node {creds[0]}:{creds[1]}")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310
    except urllib.error.HTTPError as exc:
        detail = " ".join(exc.read(300).decode("utf-8", "replace").split())[:200]
        raise FetchError(f"GET {url}: HTTP {exc.code} {detail}") from exc
    except OSError as exc:
        raise FetchError(f"GET {url}: {exc}") from exc
    with response:
        yield response


class HashingReader:
    """A file-like wrapper that hashes (sha256) and counts what is read through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def upload(url: str, token: str, path: Path, timeout: float = 3600.0) -> None:
    """PUT ``path`` to the portal with a one-image upload token (a published VM disk)."""
    size = path.stat().st_size
    with path.open("rb") as body:
        request = urllib.request.Request(url, data=body, method="PUT")  # noqa: S310 - portal URL
        request.add_header("Authorization", f"Upload {token}")
        request.add_header("Content-Type", "application/octet-stream")
        request.add_header("Content-Length", str(size))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read(300).decode("utf-8", "replace").strip()
            raise FetchError(f"PUT {url}: HTTP {exc.code} {detail}") from exc
        except OSError as exc:
            raise FetchError(f"PUT {url}: {exc}") from exc


def fetch_bytes(url: str, digest: str, limit: int = 16 << 20) -> bytes:
    """A small blob (manifest, config), verified against ``digest``."""
    with open_url(url) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise FetchError(f"{url}: larger than {limit} bytes")
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != digest:
        raise FetchError(f"{url}: content is {got}, expected {digest}")
    downloads.add(digest)
    return data
