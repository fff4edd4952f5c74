"""Pruning raw usage samples on PostgreSQL: portal.metering.sampling.prune against one bare DELETE.

    .venv/bin/python bench/sample_prune.py [--nodes 100] [--instances 40] [--period 5] [--hours 1]

Every heartbeat stores a sample per instance: 100 nodes x 40 instances at 5 s beats are 2.88 M
rows an hour, and the hourly prune (``SKYPORT_METERING_SAMPLE_DAYS``) deletes as many as the beats
wrote an hour before.  A throwaway PostgreSQL cluster (as bench/scale.py makes one) gets the
instances and ``--hours`` of samples before the retention's start plus one hour after it (kept),
written with one ``INSERT ... SELECT generate_series`` each; then:

- ``prune``: :func:`portal.metering.sampling.prune` (batches of 5,000, each its own transaction,
  keeping each instance's newest sample before the mark);
- ``bare``: the same rows seeded again and deleted by one ``DELETE`` statement (one transaction,
  the same rule), the least PostgreSQL itself needs.

It prints the rows deleted, the time and the rate of each, and the ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from scale import Procs, seed, start_postgres  # noqa: E402

BARE = """
DELETE FROM metering_usagesample s WHERE s.at < %(mark)s AND s.id <> (
    SELECT n.id FROM metering_usagesample n WHERE n.instance_id = s.instance_id AND n.at < %(mark)s
    ORDER BY n.at DESC LIMIT 1)
"""


def fill(mark: dt.datetime, hours: int, period: float) -> int:
    """``hours`` of samples of every instance before ``mark`` and one hour after it; returns the rows."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE metering_usagesample")
        cursor.execute(
            """
            INSERT INTO metering_usagesample (instance_id, at, received_at, source, node, running,
                deleted, vcpus, ram_mb, disk_gb, memory_bytes, cpu_time_ns)
            SELECT i.id, t, t, 'heartbeat', 'bench', true, false, 1, 128, 1, 67108864, 0
            FROM cloud_instance i,
                 generate_series(%s::timestamptz, %s::timestamptz, make_interval(secs => %s)) AS t
            """,
            [mark - dt.timedelta(hours=hours), mark + dt.timedelta(hours=1), period],
        )
        rows = cursor.rowcount
        cursor.execute("VACUUM ANALYZE metering_usagesample")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--instances", type=int, default=40, help="instances per node")
    parser.add_argument("--period", type=float, default=5.0, help="heartbeat period (s)")
    parser.add_argument("--hours", type=int, default=1, help="hours of samples before the mark")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="skyport-bench-prune-"))
    procs = Procs(tmp)
    try:
        db_url = start_postgres(procs)
        os.environ.update(
            DJANGO_SETTINGS_MODULE="portal.settings",
            DATABASE_URL=db_url,
            SKYPORT_VAR_DIR=str(tmp / "var"),
            SKYPORT_SECRET_KEY=secrets.token_urlsafe(50),
            SKYPORT_METERING_SAMPLE_DAYS="1",
            SKYPORT_LOG_LEVEL="WARNING",
            # never used (nothing is sent), but the settings accept only a real broker scheme
            CELERY_BROKER_URL="redis://127.0.0.1:6379/13",
        )
        import django

        django.setup()
        from django.core.management import call_command
        from django.db import connection, transaction
        from django.utils import timezone

        from portal.metering import sampling
        from portal.metering.intervals import floor_hour
        from portal.metering.models import RollupMark

        call_command("migrate", verbosity=0)
        seed(args.nodes, args.instances)
        now = timezone.now()
        mark = floor_hour(now - dt.timedelta(days=1))
        results = []
        for variant in ("prune", "bare"):
            total = fill(mark, args.hours, args.period)
            RollupMark.objects.filter(pk=1).delete()
            t0 = time.perf_counter()
            if variant == "prune":
                deleted = sampling.prune(now)
            else:
                with transaction.atomic(), connection.cursor() as cursor:
                    cursor.execute(BARE, {"mark": mark})
                    deleted = cursor.rowcount
            results.append((variant, total, deleted, time.perf_counter() - t0))
        insts = args.nodes * args.instances
        print(
            f"\n{insts} instances, a sample every {args.period:g} s, {args.hours} h before the mark "
            f"and 1 h after (PostgreSQL, fsync off)"
        )
        print(f"{'variant':<8}{'rows':>11}{'deleted':>11}{'seconds':>9}{'rows/s':>10}{'ratio':>7}")
        bare_s = results[-1][3]
        for variant, total, deleted, secs in results:
            rate = deleted / secs if secs else 0
            print(f"{variant:<8}{total:>11,}{deleted:>11,}{secs:>9.1f}{rate:>10,.0f}{secs / bare_s:>7.2f}")
        expected = insts * (int(args.hours * 3600 / args.period) - 1)  # all but each instance's newest
        assert all(d == expected for _, _, d, _ in results), (results, expected)
        connection.close()
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
