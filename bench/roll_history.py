"""The metering roll of a closed hour while a node beats (PostgreSQL): in one transaction, in slices.

    .venv/bin/python bench/roll_history.py [--nodes 250] [--instances 40] [--days 0,7] [--slice 500]

Once an hour ``portal.metering.roll`` sums every instance's day and month rows from the hour that
closed.  The beats of all nodes wait for it (the roll's advisory lock; docs/metering.md "The
roll").  This starts a throwaway PostgreSQL cluster (as ``bench/scale.py``: initdb as
``postgres``, a unix socket in a private directory, ``fsync=off``), migrates it, seeds
``--nodes`` x ``--instances`` running instances, and for each ``--days`` of history gives every
instance that many days of hour and day rows (one ``INSERT … SELECT generate_series`` each) and
an hour row in the hour that just closed.  Then, for each variant, with the roll's mark put back
an hour, one thread beats one node of ``--instances`` instances without pause
(``apply_node_report``, the control worker's whole task) while the main thread rolls the hour:

- ``one transaction``: the roll as it was before slices (``slice_size`` larger than the instances);
- ``slices``: ``--slice`` instances a transaction (the default);
- ``slices, no index``: the same with the ``usage_hour_roll`` index dropped (which instances had
  hours in the hour that closed is then a scan of every hour row ever written).

Prints the roll's time, its longest transaction (what a beat may wait for) and the beats' time
before and during the roll.  Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from beat_history import beats  # noqa: E402
from scale import Procs, django_on_throwaway_postgres, seed  # noqa: E402

INDEX = "usage_hour_roll"


def fill(instance_ids: list[str], days: int, closed: Any) -> None:
    """``days`` days of hour and day rows before the hour ``closed`` for every instance, and one
    hour row in ``closed``; one statement each."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE metering_usagesample, metering_usagehour, metering_usageday, metering_usagemonth"
        )
        from portal.metering.models import QUANTITIES

        hour = {"ram_mib_ms": 128 * 3600_000, "memory_mib_ms": 64 * 3600_000, "cpu_ms": 1000, "gap_ms": 0}
        cols = "instance_id, subject, tenant_id, kind, " + ", ".join(QUANTITIES)
        vals = "i.id, '', t.id, 'container', " + ", ".join(str(hour.get(q, 3600_000)) for q in QUANTITIES)
        tenant = "(SELECT id FROM tenancy_tenant WHERE slug = 'scale') AS t(id)"
        cursor.execute(
            f"INSERT INTO metering_usagehour ({cols}, hour)"
            f" SELECT {vals}, %s::timestamptz - make_interval(hours => n)"
            f" FROM unnest(%s::uuid[]) AS i(id), {tenant}, generate_series(0, %s) AS n",
            [closed, instance_ids, days * 24],
        )
        if days:
            cursor.execute(
                f"INSERT INTO metering_usageday ({cols}, day)"
                f" SELECT {vals}, (%s::timestamptz - make_interval(days => n))::date"
                f" FROM unnest(%s::uuid[]) AS i(id), {tenant}, generate_series(1, %s) AS n",
                [closed, instance_ids, days],
            )
        cursor.execute("ANALYZE")


def set_index(present: bool) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        if present:
            cursor.execute(
                f"CREATE INDEX IF NOT EXISTS {INDEX} ON metering_usagehour (hour, instance_id)"
                " WHERE subject = ''"
            )
        else:
            cursor.execute(f"DROP INDEX IF EXISTS {INDEX}")
        cursor.execute("ANALYZE metering_usagehour")


def one_variant(node: str, ids: list[str], closed: Any, slice_size: int) -> dict[str, float]:
    from django.db import connection

    from portal.metering import sampling
    from portal.metering.intervals import HOUR
    from portal.metering.models import RollupMark

    RollupMark.objects.update_or_create(
        pk=1, defaults={"until": closed, "rolling_to": None, "rolled_through": None}
    )
    before = beats(node, ids, 15)
    during: list[float] = []
    stop = threading.Event()

    def beater() -> None:
        try:
            while not stop.is_set():
                during.extend(beats(node, ids, 1))
        finally:
            connection.close()

    thread = threading.Thread(target=beater)
    thread.start()
    time.sleep(1.0)  # the beater is at its pace
    during.clear()
    slices: list[float] = []
    t0 = time.perf_counter()
    while True:  # one slice a call: each call is one transaction, so each is timed
        s0 = time.perf_counter()
        sampling.roll(closed + HOUR + (HOUR / 2), slice_size=slice_size, max_slices=1)
        slices.append(time.perf_counter() - s0)
        if RollupMark.objects.get(pk=1).until == closed + HOUR:
            break
    total = time.perf_counter() - t0
    stop.set()
    thread.join()
    return {
        "roll_s": total,
        "slices": len(slices),
        "longest_s": max(slices),
        "beat_before_ms": statistics.median(before) * 1000,
        "beat_during_p50_ms": statistics.median(during) * 1000 if during else float("nan"),
        "beat_during_max_ms": max(during) * 1000 if during else float("nan"),
        "beats_during": len(during),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=250, help="nodes seeded (their instances are rolled)")
    parser.add_argument("--instances", type=int, default=40, help="instances per node")
    parser.add_argument(
        "--days", default="0,7", help="days of hour and day rows per instance, comma-separated"
    )
    parser.add_argument("--slice", type=int, default=500, help="instances per slice of the roll")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="skyport-bench-roll-"))
    procs = Procs(tmp)
    rows = []
    try:
        # every beat sampled for usage: what is measured is a sampled beat's work
        django_on_throwaway_postgres(procs, SKYPORT_METERING_BEAT_SECONDS="0")
        from django.utils import timezone

        from portal.metering.intervals import HOUR, floor_hour

        placed = seed(args.nodes, args.instances)
        node, node_ids = next(iter(placed.items()))
        every = [i for ids in placed.values() for i in ids]
        beats(node, node_ids, 2)  # the node comes up: its first beats register and reconcile it
        closed = floor_hour(timezone.now()) - HOUR  # the hour that just closed
        variants = (
            ("one transaction", 10**9, True),
            ("slices", args.slice, True),
            ("slices, no index", args.slice, False),
        )
        for days in (int(x) for x in args.days.split(",")):
            t0 = time.monotonic()
            fill(every, days, closed)
            print(f"{days} days of rows filled in {time.monotonic() - t0:.0f} s", file=sys.stderr)
            for name, size, indexed in variants:
                set_index(indexed)
                got = one_variant(node, node_ids, closed, size)
                set_index(True)
                rows.append((days, name, got))
                print(f"  {name}: {got}", file=sys.stderr)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    n = args.nodes * args.instances
    print(
        f"\nthe roll of one closed hour of {n:,} instances"
        f" while a node of {args.instances} beats (PostgreSQL)\n"
    )
    head = ("days", "variant", "roll", "slices", "longest", "beat before", "beat during p50", "max", "beats")
    print(
        f"{head[0]:>4} {head[1]:<17} {head[2]:>8} {head[3]:>6} {head[4]:>8} {head[5]:>11}"
        f" {head[6]:>15} {head[7]:>9} {head[8]:>5}"
    )
    for days, name, g in rows:
        print(
            f"{days:4d} {name:<17} {g['roll_s']:7.2f}s {g['slices']:6d} {g['longest_s']:7.2f}s"
            f" {g['beat_before_ms']:8.1f} ms {g['beat_during_p50_ms']:12.1f} ms"
            f" {g['beat_during_max_ms']:6.0f} ms"
            f" {g['beats_during']:5d}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
