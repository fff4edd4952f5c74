"""The beat service's health check (portal/beat_health.py) against a real `celery beat`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from portal import beat_health
from tests.brokerservers import Servers, wait

ROOT = Path(__file__).resolve().parents[2]
CELERY = str(Path(sys.executable).with_name("celery"))


def _probe(schedule: Path, sweep: str = "1") -> subprocess.CompletedProcess[str]:
    """The compose health check's command, as the container runs it."""
    env = {**os.environ, "SKYPORT_SWEEP_SECONDS": sweep}
    return subprocess.run(
        [sys.executable, "-m", "portal.beat_health", str(schedule)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def beat(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`celery -A portal.celery beat` with the portal's settings, sweeping every second, sending to
    a redis-server of the test's own (what it queues goes nowhere else); both ended by their PIDs.

    Not ``memory://``: the portal refuses a broker it cannot run on (compute/celeryconf.py).
    """
    schedule = tmp_path / "celerybeat-schedule"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    servers = Servers(tmp_path)
    servers.start("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", ""])
    ping = ["redis-cli", "-p", str(port), "ping"]
    wait(
        "redis-server",
        lambda: subprocess.run(ping, capture_output=True, text=True).stdout.strip() == "PONG",
        20,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPORT_", "DJANGO_", "CELERY_"))}
    env.update(
        CELERY_BROKER_URL=f"redis://127.0.0.1:{port}/0",
        SKYPORT_SWEEP_SECONDS="1",
        SKYPORT_VAR_DIR=str(tmp_path / "var"),
        SKYPORT_SECRET_KEY="k" * 50,
    )
    log = (tmp_path / "beat.log").open("wb")
    proc = subprocess.Popen(
        [CELERY, "-A", "portal.celery", "beat", "--loglevel", "INFO", "--schedule", str(schedule)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc, schedule
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()
        servers.stop_all()
        print((tmp_path / "beat.log").read_text()[-3000:])


def _wait(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.slow
def test_a_running_beat_keeps_its_mark_fresh(beat: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, schedule = beat
    _wait("beat to send its first task", lambda: beat_health.last_written(schedule) is not None)
    first = beat_health.last_written(schedule)
    assert first is not None
    # not only at start: marked again after the sweeps it keeps sending (every second here)
    _wait("beat to send again", lambda: (beat_health.last_written(schedule) or 0) > first + 1.5)
    assert proc.poll() is None
    ok = _probe(schedule)
    assert ok.returncode == 0, ok.stderr


def test_no_mark_is_unhealthy(tmp_path: Path) -> None:
    out = _probe(tmp_path / "celerybeat-schedule")
    assert out.returncode == 1
    assert "beat has sent no task yet" in out.stderr


def test_a_stale_mark_is_unhealthy(tmp_path: Path) -> None:
    schedule = tmp_path / "celerybeat-schedule"
    beat_health.mark_sent(schedule)
    mark = tmp_path / "celerybeat-schedule.sent"
    assert mark.exists()
    assert _probe(schedule, sweep="5").returncode == 0
    limit = beat_health.max_age(5)
    assert limit == 45
    old = time.time() - limit - 5
    os.utime(mark, (old, old))
    out = _probe(schedule, sweep="5")
    assert out.returncode == 1
    assert "ago (limit 45 s, SKYPORT_SWEEP_SECONDS=5): it is not sending the sweeper" in out.stderr
    # the schedule file itself does not count: beat may write it only when it exits
    schedule.write_bytes(b"x")
    assert _probe(schedule, sweep="5").returncode == 1
    beat_health.mark_sent(schedule)
    assert _probe(schedule, sweep="5").returncode == 0


def test_problem_is_relative_to_the_sweep_interval(tmp_path: Path) -> None:
    schedule = tmp_path / "s"
    beat_health.mark_sent(schedule)
    written = (tmp_path / "s.sent").stat().st_mtime
    assert beat_health.problem(schedule, 60, now=written + 200) is None  # 3 x 60 + 30 = 210
    assert beat_health.problem(schedule, 60, now=written + 211) is not None
    assert beat_health.main([]) == 2
