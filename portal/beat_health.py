"""Health check of the ``beat`` service: has beat written its schedule file lately?

Beat answers no ``celery inspect`` (it is not a worker), but it writes its
schedule file after every task it sends (``CELERY_BEAT_SYNC_EVERY = 1``), and
it sends the sweeper every ``SKYPORT_SWEEP_SECONDS``.  A file older than a
few sweeps means beat is stuck or no longer sends.  Usage (docker-compose)::

    python -m portal.beat_health /var/lib/skyport-portal/celerybeat-schedule

Exit status 0 when fresh, 1 with the reason otherwise.  No Django set-up: a
probe every 30 s should cost little.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

#: the files Python's shelve (dbm.gnu, dbm.ndbm or dbm.dumb) makes of one schedule name
SUFFIXES = ("", ".db", ".dat", ".dir", ".bak")


def max_age(sweep_seconds: float) -> float:
    """How old the schedule file may be: three missed sweeps, and some slack for a slow broker."""
    return 3 * sweep_seconds + 30


def last_written(schedule: Path) -> float | None:
    """The newest modification time of the schedule's files, or None if there is none."""
    times = []
    for suffix in SUFFIXES:
        try:
            times.append(Path(f"{schedule}{suffix}").stat().st_mtime)
        except FileNotFoundError:
            continue
    return max(times, default=None)


def problem(schedule: Path, sweep_seconds: float, now: float | None = None) -> str | None:
    """Why beat looks unhealthy, or None."""
    written = last_written(schedule)
    if written is None:
        return f"beat has not written its schedule {schedule} (is it running with --schedule {schedule}?)"
    age = (time.time() if now is None else now) - written
    limit = max_age(sweep_seconds)
    if age > limit:
        return (
            f"beat last wrote its schedule {schedule} {age:.0f} s ago (limit {limit:.0f} s, "
            f"SKYPORT_SWEEP_SECONDS={sweep_seconds:g}): it is not sending the sweeper"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m portal.beat_health SCHEDULE_FILE", file=sys.stderr)
        return 2
    why = problem(Path(args[0]), float(os.environ.get("SKYPORT_SWEEP_SECONDS", "5")))
    if why:
        print(why, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
