"""Health check of the ``beat`` service: has beat sent a task lately?

Beat answers no ``celery inspect`` (it is not a worker).  Its scheduler
(:class:`portal.beat.Scheduler`) touches ``<schedule>.sent`` after every
task it hands to the broker, and it sends the sweeper every
``SKYPORT_SWEEP_SECONDS``.  A mark older than a few sweeps means beat is
stuck, gone, or cannot reach the broker.  Usage (docker-compose)::

    python -m portal.beat_health /var/lib/skyport-portal/celerybeat-schedule

Exit status 0 when fresh, 1 with the reason otherwise.  No Django or Celery
set-up: a probe every 30 s should cost little.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from portal import env


def max_age(sweep_seconds: float) -> float:
    """How old the mark may be: three missed sweeps, and some slack for a slow broker."""
    return 3 * sweep_seconds + 30


def sent_mark(schedule: Path) -> Path:
    return schedule.with_name(schedule.name + ".sent")


def mark_sent(schedule: Path) -> None:
    """Record that beat has just handed a task to the broker (called by the scheduler)."""
    sent_mark(schedule).touch()


def last_written(schedule: Path) -> float | None:
    """When beat last sent a task, or None if it never did."""
    try:
        return sent_mark(schedule).stat().st_mtime
    except FileNotFoundError:
        return None


def problem(schedule: Path, sweep_seconds: float, now: float | None = None) -> str | None:
    """Why beat looks unhealthy, or None."""
    written = last_written(schedule)
    if written is None:
        return (
            f"beat has sent no task yet ({sent_mark(schedule)} is missing; "
            f"is it running with --schedule {schedule}?)"
        )
    age = (time.time() if now is None else now) - written
    limit = max_age(sweep_seconds)
    if age > limit:
        return (
            f"beat last sent a task {age:.0f} s ago (limit {limit:.0f} s, "
            f"SKYPORT_SWEEP_SECONDS={sweep_seconds:g}): it is not sending the sweeper"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m portal.beat_health SCHEDULE_FILE", file=sys.stderr)
        return 2
    why = problem(Path(args[0]), env.seconds("SKYPORT_SWEEP_SECONDS", 5))
    if why:
        print(why, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
