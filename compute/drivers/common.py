"""Helpers both drivers need: instance-id checks and reading the end of a log file.

Kept apart from ``base.py`` (the contract) so a driver module holds only what
is its own, as Incus keeps ``driver_common.go`` beside its drivers.
"""

from __future__ import annotations

import os
from pathlib import Path

from compute.spec import UUID_RE


def is_instance_id(value: str) -> bool:
    """Whether ``value`` is an instance id (a lower-case UUID), safe to put in a path or name."""
    return UUID_RE.fullmatch(value) is not None


def tail(path: Path, max_bytes: int) -> str | None:
    """The last ``max_bytes`` of a file as text (bad UTF-8 replaced); None when the file is missing."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - max_bytes))
            return fh.read(max_bytes).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


def mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def read_int(path: Path) -> int | None:
    """An integer a supervisor wrote to a file (pid, exit code); None when missing or garbled."""
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
