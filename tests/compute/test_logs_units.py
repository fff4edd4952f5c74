"""compute/logs.py without a container: the k8s-file parser, selection, rotation and retention."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from compute import logs
from compute.spec import Kind, LogsRequest, SpecError

IID = "0b5d7a0e-8c7e-4f7a-9c1e-2a4b6c8d0e1f"


def rec(sec: float, stream: str, tag: str, text: str) -> bytes:
    ns = round(sec * 1e9)
    return f"{logs.format_time(ns)} {stream} {tag} {text}\n".encode()


def test_parse_time_accepts_rfc3339_and_refuses_the_rest() -> None:
    assert logs.parse_time("1970-01-01T00:00:00Z") == 0
    assert logs.parse_time("1970-01-01T00:00:01.5Z") == 1_500_000_000
    assert logs.parse_time("1970-01-01T01:00:00.000000001+01:00") == 1
    assert logs.parse_time("2026-12-06T01:20:00.123456789+00:00") == logs.parse_time(
        "2026-12-05T20:20:00.123456789-05:00"
    )
    assert logs.format_time(logs.parse_time("2026-12-06T01:20:00.5Z")) == "2026-12-06T01:20:00.500000000Z"
    for bad in ("", "now", "2026-12-06", "2026-12-06T01:20:00", "2026-02-30T00:00:00Z", "2026-12-06T01:20Z"):
        with pytest.raises(logs.LogError):
            logs.parse_time(bad)


def test_parse_joins_pieces_per_stream_and_skips_what_is_not_k8s_file() -> None:
    data = (
        rec(1, "stdout", "P", "hel")
        + rec(1.1, "stderr", "F", "err line")  # another stream between two pieces
        + rec(1.2, "stdout", "F", "lo")
        + b"garbage without fields\n"
        + b"not-a-time stdout F x\n"
        + rec(2, "stdin", "F", "no such stream")
        + rec(3, "stdout", "F", "")  # an empty line
        + rec(4, "stdout", "F", "with  two  spaces ")
        + rec(5, "stderr", "P", "open at the end")
        + b"2026-12-06T01:20:00.000000000+00:00 stdout F being writ"  # no newline yet
    )
    lines = logs.parse(data)
    assert [(x.stream, x.text) for x in lines] == [
        ("stdout", "hello"),
        ("stderr", "err line"),
        ("stdout", ""),
        ("stdout", "with  two  spaces "),
        ("stderr", "open at the end"),
    ]
    assert lines[0].ns == 1_000_000_000  # a joined line keeps its first piece's time
    assert lines[0].time == "1970-01-01T00:00:01.000000000Z"


def test_a_huge_line_is_cut_and_says_so() -> None:
    piece = "x" * 8192
    data = b"".join(rec(1, "stdout", "P", piece) for _ in range(4)) + rec(1, "stdout", "F", "end")
    (line,) = logs.parse(data)
    assert line.text.startswith("x" * logs.MAX_LINE) and line.text.endswith(
        f"[… {4 * 8192 + 3 - 16384} more characters]"
    )


def test_select_tail_since_stream_and_the_follow_cursor() -> None:
    data = b"".join(
        rec(t, s, "F", f"{s}-{t}") for t, s in [(1, "stdout"), (2, "stderr"), (2, "stdout"), (3, "stdout")]
    )
    lines = logs.parse(data)

    def texts(**kw: object) -> list[str]:
        got, truncated = logs.select(lines, logs.Selection(**kw))  # type: ignore[arg-type]
        assert not truncated
        return [x.text for x in got]

    assert texts() == ["stdout-1", "stderr-2", "stdout-2", "stdout-3"]
    assert texts(tail=2) == ["stdout-2", "stdout-3"]
    assert texts(tail=0) == []
    assert texts(stream="stderr") == ["stderr-2"]
    assert texts(since_ns=2_000_000_000) == ["stderr-2", "stdout-2", "stdout-3"]
    # a follow has seen one line of time 2: the next poll starts with the second
    assert texts(since_ns=2_000_000_000, skip=1) == ["stdout-2", "stdout-3"]
    assert texts(since_ns=2_000_000_000, skip=1, stream="stdout") == ["stdout-3"]
    assert texts(since_ns=9_000_000_000) == []
    for bad in ({"tail": -1}, {"tail": logs.MAX_TAIL + 1}, {"stream": "stdin"}, {"skip": -1}):
        with pytest.raises(logs.LogError):
            logs.Selection(**bad)  # type: ignore[arg-type]


def test_select_keeps_the_newest_lines_under_the_reply_cap() -> None:
    big = "y" * 16000
    lines = logs.parse(b"".join(rec(i, "stdout", "F", f"{i:03d}{big}") for i in range(100)))
    got, truncated = logs.select(lines, logs.Selection())
    assert truncated and 50 <= len(got) < 100
    assert got[-1].text.startswith("099") and sum(len(x.text) for x in got) <= logs.MAX_REPLY_BYTES
    got, truncated = logs.select(lines, logs.Selection(tail=10))
    assert not truncated and [x.text[:3] for x in got] == [f"{i:03d}" for i in range(90, 100)]


def test_keep_generation_follows_conmons_replace(tmp_path: Path) -> None:
    log = tmp_path / "container.log"
    log.write_bytes(rec(1, "stdout", "F", "old-1"))
    assert not logs.keep_generation(log)  # first call: links the current file
    with log.open("ab") as fh:
        fh.write(rec(2, "stdout", "F", "old-2"))
    assert not logs.keep_generation(log)
    # conmon at the cap: writes <path>.tmp and renames it over <path>
    tmp = tmp_path / "container.log.tmp"
    tmp.write_bytes(rec(3, "stdout", "F", "new-1"))
    os.rename(tmp, log)
    assert logs.keep_generation(log)
    assert [p.name for p in logs.generations(log)] == ["container.log.1", "container.log"]
    assert [x.text for x in logs.read(log)] == ["old-1", "old-2", "new-1"]
    assert not logs.keep_generation(log)
    # the next rotation replaces the older generation
    tmp.write_bytes(rec(4, "stdout", "F", "newer"))
    os.rename(tmp, log)
    assert logs.keep_generation(log)
    assert [x.text for x in logs.read(log)] == ["new-1", "newer"]
    assert logs.text_tail(log) == "new-1\nnewer\n"
    assert logs.text_tail(tmp_path / "none.log") is None


def test_close_partials_ends_a_line_left_open(tmp_path: Path) -> None:
    log = tmp_path / "container.log"
    assert logs.close_partials(log) == []
    log.write_bytes(rec(1, "stdout", "F", "done") + rec(2, "stderr", "P", "prompt> "))
    assert logs.close_partials(log, now_ns=3_000_000_000) == ["stderr"]
    assert logs.close_partials(log) == []  # idempotent
    with log.open("ab") as fh:
        fh.write(rec(4, "stderr", "F", "next run"))
    assert [x.text for x in logs.read(log)] == ["done", "prompt> ", "next run"]


def test_retain_and_sweep(tmp_path: Path) -> None:
    log = tmp_path / "sky-x" / "container.log"
    log.parent.mkdir()
    log.write_bytes(rec(1, "stdout", "F", "bye"))
    root = tmp_path / "logs" / "containers"
    dest = logs.retained_dir(tmp_path, IID)
    logs.retain(log, dest)
    assert not log.exists() and [x.text for x in logs.read(dest / "container.log")] == ["bye"]
    now = time.time()
    assert logs.sweep(root, 3600, now=now + 60) == []
    assert logs.sweep(root, 3600, now=now + 3601) == [IID]
    assert not dest.exists()
    logs.retain(tmp_path / "sky-x" / "missing.log", logs.retained_dir(tmp_path, "other"))
    assert not logs.retained_dir(tmp_path, "other").exists()  # nothing to keep, nothing kept


def test_logs_request_is_checked_at_the_contract() -> None:
    ok = LogsRequest(IID, Kind.CONTAINER, "skyport:logs:1", 10, "2026-12-06T01:20:00Z", "stdout", 1)
    assert ok.selection() == logs.Selection(10, logs.parse_time("2026-12-06T01:20:00Z"), "stdout", 1)
    assert LogsRequest(IID, Kind.CONTAINER, "skyport:logs:1").selection() == logs.Selection()
    for kwargs, match in (
        ({"reply": "skyport:exec:1"}, "reply"),
        ({"tail": 10**6}, "tail"),
        ({"since": "yesterday"}, "RFC 3339"),
        ({"stream": "both"}, "stream"),
    ):
        with pytest.raises(SpecError, match=match):
            LogsRequest(**({"instance_id": IID, "kind": Kind.CONTAINER, "reply": "skyport:logs:1"} | kwargs))  # type: ignore[arg-type]


def test_read_selection_reads_only_what_it_needs_and_agrees_with_a_full_read(tmp_path: Path) -> None:
    import random

    rng = random.Random(18)
    log = tmp_path / "container.log"
    recs = []
    t = 1_000.0
    for i in range(30000):
        t += rng.choice((0.0, 0.001, 0.01))  # runs of equal times too
        stream = rng.choice(logs.STREAMS)
        if rng.random() < 0.05:
            recs.append(rec(t, stream, "P", f"piece-{i}-"))
        recs.append(rec(t, stream, "F", f"line-{i}" + "z" * rng.randint(0, 80)))
    data = b"".join(recs)
    half = data.index(b"\n", len(data) // 2) + 1
    log.with_name("container.log.1").write_bytes(data[:half])
    log.write_bytes(data[half:])
    everything = logs.read(log)
    times = [x.ns for x in everything]
    for _ in range(60):
        since = rng.choice([None, rng.choice(times), times[0] - 1, times[-1] + 1])
        sel = logs.Selection(
            tail=rng.choice([None, 0, 1, 7, 100, 5000]),
            since_ns=since,
            stream=rng.choice([None, "stdout", "stderr"]),
            skip=rng.choice([0, 1]) if since else 0,
        )
        assert logs.read_selection(log, sel) == logs.select(everything, sel), sel
    # and it is cheap: the last 100 lines of a ~3 MiB log without reading all of it
    started = time.perf_counter()
    for _ in range(20):
        logs.read_selection(log, logs.Selection(tail=100))
        logs.read_selection(log, logs.Selection(since_ns=times[-50]))
    assert (time.perf_counter() - started) / 40 < 0.05
