"""Read/write seam over cgroup v1 files, and the counters built on it.

All access goes through :class:`CgroupFS` (two methods), so limit and stats
logic can be tested with a dict instead of ``/sys``.  ``path`` is the
cgroupsPath of a container (``/skyport-node/sky-<id>``), the same in every
controller hierarchy.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from pathlib import Path
from typing import Protocol

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer", "devices", "blkio", "cpuset", "systemd")


class CgroupFS(Protocol):
    def read(self, controller: str, path: str, name: str) -> str | None:
        """Content of ``<controller>/<path>/<name>``; None if the cgroup is gone."""

    def write(self, controller: str, path: str, name: str, value: str) -> None: ...


class SysCgroupFS:
    """The real cgroup v1 tree."""

    def __init__(self, root: Path = ROOT) -> None:
        self.root = root

    def _file(self, controller: str, path: str, name: str) -> Path:
        return self.root / controller / path.lstrip("/") / name

    def read(self, controller: str, path: str, name: str) -> str | None:
        try:
            return self._file(controller, path, name).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise

    def write(self, controller: str, path: str, name: str, value: str) -> None:
        self._file(controller, path, name).write_text(value)

    def exists(self, controller: str, path: str) -> bool:
        return (self.root / controller / path.lstrip("/")).is_dir()

    def remove(self, path: str, wait: float = 2.0) -> list[str]:
        """rmdir the cgroup (deepest first) in every hierarchy; return those left.

        Tasks that were just killed leave their cgroup a moment later
        (EBUSY meanwhile), so retry for up to ``wait`` seconds.
        """
        deadline = time.monotonic() + wait
        while True:
            left = []
            for controller in CONTROLLERS:
                d = self.root / controller / path.lstrip("/")
                if not d.is_dir():
                    continue
                for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    _rmdir(sub)
                if not _rmdir(d):
                    left.append(str(d))
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.01)


def _rmdir(d: Path) -> bool:
    try:
        os.rmdir(d)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else None


def _kv(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        k, _, v = line.partition(" ")
        if v.strip().isdigit():
            out[k] = int(v)
    return out


@dataclasses.dataclass(frozen=True)
class CgroupStats:
    cpu_time_ns: int
    memory_bytes: int
    memory_peak_bytes: int | None
    memory_limit_bytes: int | None
    pids: int | None
    pids_max: int | None
    oom_kills: int
    under_oom: bool
    memory_failcnt: int | None


UNLIMITED = 1 << 62


def read_stats(fs: CgroupFS, path: str) -> CgroupStats | None:
    """Counters of the cgroup at ``path``; None if its memory cgroup is gone."""
    usage = _int(fs.read("memory", path, "memory.usage_in_bytes"))
    if usage is None:
        return None
    limit = _int(fs.read("memory", path, "memory.limit_in_bytes"))
    oom = _kv(fs.read("memory", path, "memory.oom_control"))
    pids_max_text = (fs.read("pids", path, "pids.max") or "").strip()
    return CgroupStats(
        cpu_time_ns=_int(fs.read("cpuacct", path, "cpuacct.usage")) or 0,
        memory_bytes=usage,
        memory_peak_bytes=_int(fs.read("memory", path, "memory.max_usage_in_bytes")),
        memory_limit_bytes=limit if limit is not None and limit < UNLIMITED else None,
        pids=_int(fs.read("pids", path, "pids.current")),
        pids_max=_int(pids_max_text) if pids_max_text != "max" else None,
        oom_kills=oom.get("oom_kill", 0),
        under_oom=bool(oom.get("under_oom", 0)),
        memory_failcnt=_int(fs.read("memory", path, "memory.failcnt")),
    )


def oom_killed(fs: CgroupFS, path: str) -> bool | None:
    """Whether the kernel OOM-killed a task of the cgroup; None if it is gone."""
    text = fs.read("memory", path, "memory.oom_control")
    if text is None:
        return None
    return _kv(text).get("oom_kill", 0) > 0


def freeze(fs: CgroupFS, path: str, frozen: bool) -> None:
    fs.write("freezer", path, "freezer.state", "FROZEN" if frozen else "THAWED")


def frozen(fs: CgroupFS, path: str) -> bool:
    return (fs.read("freezer", path, "freezer.state") or "").strip() in ("FROZEN", "FREEZING")
