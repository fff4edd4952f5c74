"""A volume's content through the portal: the node half of moves (and backups, restores).

Nodes open no ports, so a volume travels as the VM cold migration's disk
does (``compute/migration.py``): the source node exports it as a standalone
qcow2 (:meth:`compute.volumes.VolumeStore.export`) and PUTs it to the portal
with a one-transfer token; the portal keeps it in its content-addressed
store; the target node GETs the blob with its node key, verifies every
byte against the digest the portal gives it, and makes the volume from it.

Both directions report progress (bytes of the qcow2 done / total) through
``progress``, at most once per ``PROGRESS_EVERY`` seconds plus once at the
end, so a large volume sends a bounded number of messages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO

from compute import fetch
from compute.spec import VolumeFormat
from compute.volumes import VolumeError, VolumeStore

PROGRESS_EVERY = 1.0  # seconds between two progress messages of one transfer
Progress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class Sent:
    digest: str
    size: int


class Throttle:
    """Calls ``report(done, total)`` at most every ``every`` seconds, and always for the last byte."""

    def __init__(self, report: Progress, total: int, every: float = PROGRESS_EVERY) -> None:
        self.report, self.total, self.every = report, total, every
        self.done = 0
        self._last = -math.inf  # the first chunk reports at once, however long the host has been up
        self.sent = 0  # how many messages went (tests read it)

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self._last >= self.every:
            self._last = now
            self.sent += 1
            self.report(self.done, self.total)


class _CountingReader:
    """The request body: reads the export file, hashing and reporting what went."""

    def __init__(self, raw: IO[bytes], throttle: Throttle) -> None:
        self.raw, self.throttle = raw, throttle
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n if n and n > 0 else fetch.CHUNK)
        self.hash.update(data)
        if data:
            self.throttle.add(len(data))
        return data


def http_put(url: str, token: str, body: _CountingReader, size: int, timeout: float = 3600.0) -> None:
    """PUT ``body`` (``size`` bytes) with an Upload token; :class:`VolumeError` when it fails."""
    request = urllib.request.Request(url, data=body, method="PUT")  # noqa: S310
    request.add_header("Authorization", f"Upload {token}")
    request.add_header("Content-Type", "application/octet-stream")
    request.add_header("Content-Length", str(size))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - portal URL
            response.read()
    except urllib.error.HTTPError as exc:
        detail = " ".join(exc.read(300).decode("utf-8", "replace").split())[:200]
        raise VolumeError(f"PUT {url}: HTTP {exc.code} {detail}") from exc
    except OSError as exc:
        raise VolumeError(f"PUT {url}: {exc}") from exc


def send(store: VolumeStore, volume_id: str, url: str, token: str, work: Path, progress: Progress) -> Sent:
    """Export the detached volume and PUT it to ``url``; the volume is not touched.  Returns what went."""
    work.mkdir(parents=True, exist_ok=True)
    dest = work / f"{volume_id}-send-{time.time_ns()}.qcow2"
    try:
        store.export(volume_id, dest)
        size = dest.stat().st_size
        throttle = Throttle(progress, size)
        with dest.open("rb") as fh:
            body = _CountingReader(fh, throttle)
            http_put(url, token, body, size)
        if throttle.done != size:
            raise VolumeError(f"sent {throttle.done} of {size} bytes of volume {volume_id}")
        return Sent("sha256:" + body.hash.hexdigest(), size)
    finally:
        dest.unlink(missing_ok=True)


def receive(
    store: VolumeStore,
    volume_id: str,
    fmt: VolumeFormat,
    url: str,
    digest: str,
    work: Path,
    progress: Progress,
) -> int:
    """Fetch the blob at ``url`` (node key), verify ``digest``, make the volume.  Returns its size.

    Nothing of the volume exists on this node unless every byte matched and
    the conversion worked; the download is removed in every case.
    """
    work.mkdir(parents=True, exist_ok=True)
    dest = work / f"{volume_id}-receive-{time.time_ns()}.qcow2"
    try:
        try:
            with fetch.open_url(url) as response, dest.open("wb") as out:
                total = int(getattr(response, "headers", {}).get("Content-Length") or 0)
                throttle = Throttle(progress, total)
                reader = fetch.HashingReader(response)
                while chunk := reader.read(fetch.CHUNK):
                    out.write(chunk)
                    throttle.add(len(chunk))
        except fetch.FetchError as exc:
            raise VolumeError(str(exc)) from exc
        if reader.digest != digest:
            raise VolumeError(f"the download does not match {digest} (got {reader.digest[:19]}…)")
        return store.restore(volume_id, fmt, dest)
    finally:
        dest.unlink(missing_ok=True)
