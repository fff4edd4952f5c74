"""Container logs: conmon's ``k8s-file`` format read back, filtered, kept and swept.

conmon (``--log-path k8s-file:<path>``) writes one record per line::

    2026-12-06T01:20:00.123456789+00:00 stdout F hello
    2026-12-06T01:20:00.123460000+00:00 stderr P first half of a long li
    2026-12-06T01:20:00.123460000+00:00 stderr F ne

``F`` ends a line, ``P`` is a piece of one (conmon's buffer was full, or the
program wrote without a newline); pieces of one stream are joined here.  With
``--log-size-max`` conmon starts the file afresh once it would grow past the
cap (it writes ``<path>.tmp`` and renames it over ``<path>``), so the node
keeps the previous generation itself: :func:`keep_generation` holds a hard
link to the file conmon writes and, when conmon has replaced it, renames that
link to ``<path>.1``.  A container's logs are therefore at most two caps.

After a delete the node moves the files into ``<state>/logs/containers/<id>/``
(:func:`retain`), where :func:`sweep` removes them once they are older than the
retention period.  Nothing here imports Django: the portal calls
:func:`parse_time` to check ``since`` with the same rules the node applies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

STREAMS = ("stdout", "stderr")
MAX_TAIL = 10000  # lines one request may ask for
MAX_LINE = 16384  # characters of one logical line kept (longer ones are cut and marked)
MAX_REPLY_BYTES = 1 << 20  # text returned by one request; the oldest lines beyond it are dropped

_TIME_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:\d{2})\Z"
)


class LogError(ValueError):
    """A parameter the log reader cannot use; ``str()`` says which and why."""


def parse_time(value: str) -> int:
    """An RFC 3339 time (``Z`` or ``±hh:mm``, up to nanoseconds) as nanoseconds since the epoch."""
    m = _TIME_RE.match(value.strip())
    if m is None:
        raise LogError(f"{value!r} is not an RFC 3339 time such as 2026-12-06T01:20:00Z")
    year, month, day, hour, minute, sec = (int(m.group(i)) for i in range(1, 7))
    frac = (m.group(7) or "").ljust(9, "0")
    zone = m.group(8)
    try:
        base = dt.datetime(year, month, day, hour, minute, sec, tzinfo=dt.UTC)
    except ValueError as exc:
        raise LogError(f"{value!r} is not a valid time: {exc}") from None
    offset = 0
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        offset = sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    seconds = int(base.timestamp()) - offset
    return seconds * 1_000_000_000 + int(frac)


def format_time(ns: int) -> str:
    """Nanoseconds since the epoch as RFC 3339 in UTC with nine decimals (``…T01:20:00.123456789Z``)."""
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


@dataclasses.dataclass(frozen=True)
class LogLine:
    """One logical line of a container's output: when conmon read it, from which stream."""

    ns: int
    stream: str
    text: str

    @property
    def time(self) -> str:
        return format_time(self.ns)


#: what a driver's ``logs`` returns: (lines oldest first, truncated for size, read from kept logs)
Reading = tuple[list[LogLine], bool, bool]


def parse(data: bytes) -> list[LogLine]:
    """Logical lines of k8s-file ``data``, oldest first.

    A last record without its newline (conmon is writing it) is left out; a
    record that is not k8s-file (garbage, an old passthrough log) is skipped;
    ``P`` pieces are joined with the rest of their line (kept from the first
    piece's time), and pieces left open at the end count as a line.
    """
    out: list[LogLine] = []
    open_: dict[str, tuple[int, list[str], int]] = {}
    records = data.split(b"\n")
    for raw in records[:-1]:
        parts = raw.split(b" ", 3)
        if len(parts) < 3:
            continue
        stream = parts[1].decode("ascii", "replace")
        tag = parts[2]
        if stream not in STREAMS or tag not in (b"F", b"P"):
            continue
        try:
            ns = parse_time(parts[0].decode("ascii"))
        except (LogError, UnicodeDecodeError):
            continue
        text = parts[3].decode("utf-8", "replace") if len(parts) == 4 else ""
        first, pieces, size = open_.pop(stream, (ns, [], 0))
        if size < MAX_LINE:
            pieces.append(text)
        size += len(text)
        if tag == b"P":
            open_[stream] = (first, pieces, size)
            continue
        out.append(LogLine(first, stream, _join(pieces, size)))
    for stream, (first, pieces, size) in open_.items():
        out.append(LogLine(first, stream, _join(pieces, size)))
    if open_:
        out.sort(key=lambda line: line.ns)  # stable: lines of one time keep their order
    return out


def _join(pieces: list[str], size: int) -> str:
    text = "".join(pieces)
    if size > MAX_LINE:
        return text[:MAX_LINE] + f" [… {size - MAX_LINE} more characters]"
    return text


@dataclasses.dataclass(frozen=True)
class Selection:
    """What a reader asked for: the last ``tail`` lines (None: all) at or after ``since_ns``,
    of one stream or both; ``skip`` lines at exactly ``since_ns`` were already seen (follow)."""

    tail: int | None = None
    since_ns: int | None = None
    stream: str | None = None
    skip: int = 0

    def __post_init__(self) -> None:
        if self.tail is not None and not 0 <= self.tail <= MAX_TAIL:
            raise LogError(f"tail must be within 0..{MAX_TAIL}, got {self.tail}")
        if self.stream is not None and self.stream not in STREAMS:
            raise LogError(f"stream must be stdout or stderr, got {self.stream!r}")
        if self.skip < 0:
            raise LogError(f"skip must not be negative, got {self.skip}")


def select(lines: Iterable[LogLine], sel: Selection) -> tuple[list[LogLine], bool]:
    """The lines ``sel`` asks for, oldest first, and whether older ones were left out for size."""
    kept: list[LogLine] = []
    skipped = 0
    for line in lines:
        if sel.stream is not None and line.stream != sel.stream:
            continue
        if sel.since_ns is not None:
            if line.ns < sel.since_ns:
                continue
            if line.ns == sel.since_ns and skipped < sel.skip:
                skipped += 1
                continue
        kept.append(line)
    if sel.tail is not None:
        kept = kept[len(kept) - sel.tail :] if sel.tail else []
    budget = MAX_REPLY_BYTES
    cut = len(kept)
    while cut > 0 and budget - len(kept[cut - 1].text) - 64 >= 0:
        budget -= len(kept[cut - 1].text) + 64
        cut -= 1
    return kept[cut:], cut > 0


def generations(path: Path) -> list[Path]:
    """The files of one log, oldest first: the previous generation (``.1``) and the current one."""
    return [p for p in (path.with_name(path.name + ".1"), path) if p.exists()]


def read(path: Path) -> list[LogLine]:
    """Every line of the log at ``path`` (both generations), oldest first; [] when there is none."""
    lines: list[LogLine] = []
    for p in generations(path):
        with contextlib.suppress(FileNotFoundError):
            lines += parse(p.read_bytes())
    return lines


class _Files:
    """The generations of one log as one byte range, through fds opened once (a rotation while
    reading does not move what is read)."""

    def __init__(self, path: Path) -> None:
        self.parts: list[tuple[int, int]] = []  # (fd, size)
        for p in generations(path):
            try:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            self.parts.append((fd, os.fstat(fd).st_size))
        self.size = sum(size for _, size in self.parts)

    def close(self) -> None:
        for fd, _ in self.parts:
            os.close(fd)

    def read(self, start: int, end: int) -> bytes:
        out: list[bytes] = []
        base = 0
        for fd, size in self.parts:
            lo, hi = max(start, base), min(end, base + size)
            if lo < hi:
                out.append(os.pread(fd, hi - lo, lo - base))
            base += size
        return b"".join(out)

    def time_at(self, offset: int) -> int | None:
        """The time of the first whole record at or after ``offset`` (None: none there)."""
        data = self.read(offset, min(self.size, offset + 4096))
        if offset > 0:
            cut = data.find(b"\n")
            data = data[cut + 1 :] if cut >= 0 else b""
        lines = parse(data[: data.find(b"\n") + 1]) if b"\n" in data else []
        return lines[0].ns if lines else None


def read_selection(path: Path, sel: Selection) -> tuple[list[LogLine], bool]:
    """The lines ``sel`` asks for from the log at ``path`` (both generations), reading only what it needs.

    ``since``: a binary search over the (time-ordered) records finds where to
    start; then the end is read in growing chunks (down to that start) until
    it holds the ``tail`` asked for or a full reply.  So a poll or a panel
    costs about the same for a 4 MiB log as for a small one.
    """
    files = _Files(path)
    try:
        start = 0
        if sel.since_ns is not None:
            lo, hi = 0, files.size
            while hi - lo > 16384:
                mid = (lo + hi) // 2
                at = files.time_at(mid)
                if at is not None and at < sel.since_ns:
                    lo = mid
                else:
                    hi = mid
            start = lo
        chunk = 65536
        while True:
            begin = max(start, files.size - chunk)
            data = files.read(begin, files.size)
            if begin > 0:  # drop the record cut in two, and a line that may be the end of a longer one
                data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
            lines = parse(data)
            if begin > start and lines:
                lines = lines[1:]
            got, truncated = select(lines, sel)
            # the reply is full (the newest lines only), or it holds the ``tail`` asked for
            enough = truncated or (sel.tail is not None and len(got) >= sel.tail)
            if begin <= start or enough:
                return got, truncated
            chunk *= 4
    finally:
        files.close()


def text_tail(path: Path, max_chars: int = 65536) -> str | None:
    """The end of a log as plain text (the console view and exit reasons); None when it is missing.

    Reads only the end of the current generation (and the previous one when
    the current is short), so it stays cheap at any log size.
    """
    files = generations(path)
    if not files:
        return None
    chunks: list[bytes] = []
    need = max_chars * 2  # records carry a ~45-byte prefix
    for p in reversed(files):
        with contextlib.suppress(FileNotFoundError), p.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = max(0, size - need)
            fh.seek(start)
            data = fh.read(need)
            if start > 0:  # drop the partial first record
                data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
            chunks.insert(0, data)
            need -= len(data)
        if need <= 0:
            break
    text = "".join(line.text + "\n" for line in parse(b"".join(chunks)))
    return text[-max_chars:]


def keep_generation(path: Path) -> bool:
    """Keep the generation conmon has just replaced as ``<path>.1``; True when it rotated.

    conmon writes ``path``; ``.<name>.link`` is a hard link to the same file.
    When ``path`` is another file than the link (conmon reached the cap and
    started afresh), the link is the old generation: it becomes ``<path>.1``.
    Called often (the node's supervisor loop and before each read).  A second
    rotation between two calls loses the generation in between.
    """
    link = path.with_name(f".{path.name}.link")
    try:
        cur = path.stat()
    except FileNotFoundError:
        return False
    try:
        old = link.stat()
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError, FileNotFoundError):
            os.link(path, link)
        return False
    if (old.st_ino, old.st_dev) == (cur.st_ino, cur.st_dev):
        return False
    os.replace(link, path.with_name(path.name + ".1"))
    with contextlib.suppress(FileExistsError, FileNotFoundError):
        os.link(path, link)
    return True


def close_partials(path: Path, now_ns: int | None = None) -> list[str]:
    """End a line a previous run left open (its last record ``P``), before a new run writes.

    A program that exits after ``printf 'x'`` leaves a ``P`` record; without
    this, the next run's first output on that stream would be joined to it.
    Appends an empty ``F`` record per open stream; returns those streams.
    Only called while no conmon writes the file (before a launch).
    """
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - 65536))
            data = fh.read()
    except FileNotFoundError:
        return []
    last: dict[str, bytes] = {}
    for raw in data.split(b"\n")[:-1]:
        parts = raw.split(b" ", 3)
        if len(parts) >= 3:
            last[parts[1].decode("ascii", "replace")] = parts[2]
    open_ = [stream for stream in STREAMS if last.get(stream) == b"P"]
    if open_:
        stamp = format_time(time.time_ns() if now_ns is None else now_ns)
        with path.open("ab") as fh:
            fh.write("".join(f"{stamp} {stream} F \n" for stream in open_).encode())
    return open_


# ---------------------------------------------------------------- retention after delete


def retained_dir(state_dir: Path, instance_id: str) -> Path:
    return state_dir / "logs" / "containers" / instance_id


def retain(path: Path, dest: Path) -> None:
    """Move a log (both generations) into ``dest``; its ``deleted`` marker dates the retention."""
    keep_generation(path)
    files = generations(path)
    if not files:
        return
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    for p in files:
        target = dest / p.name
        try:
            os.rename(p, target)
        except OSError:  # another file system
            shutil.move(str(p), target)
    (dest / "deleted").touch()


def sweep(root: Path, max_age_seconds: float, now: float | None = None) -> list[str]:
    """Remove retained logs deleted more than ``max_age_seconds`` ago; return their instance ids."""
    now = time.time() if now is None else now
    gone: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(root):
            marker = Path(entry.path) / "deleted"
            try:
                deleted = marker.stat().st_mtime
            except (FileNotFoundError, NotADirectoryError):
                continue
            if now - deleted > max_age_seconds:
                shutil.rmtree(entry.path, ignore_errors=True)
                gone.append(entry.name)
    return gone


def each_log(base: Path, name: str) -> Iterator[Path]:
    """``<base>/sky-*/<name>``: every container's current log file."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(base):
            if entry.name.startswith("sky-"):
                yield Path(entry.path) / name
