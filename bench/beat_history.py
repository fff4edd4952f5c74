"""A node's heartbeat against the samples its instances have gathered (PostgreSQL), with and without
the index of delete samples.

    .venv/bin/python bench/beat_history.py [--instances 40] [--history 0,10000,100000] [--beats 15]

Every 5 s beat stores a usage sample per instance: 720 an hour, 17,280 a day.  A beat also asks,
for each instance on the node, whether it has a delete sample; without the partial index
``usage_sample_deleted`` that question scanned all of the instance's samples.  This starts a
throwaway PostgreSQL cluster (as ``bench/scale.py``: initdb as ``postgres``, a unix socket in a
private directory, ``fsync=off``), migrates it, makes one node with ``--instances`` running
instances, and for each ``--history`` (samples per instance, 5 s apart, inserted with one
``INSERT … SELECT generate_series``) times ``apply_node_report`` (the control worker's whole
task for one beat) ``--beats`` times with the index and ``--beats`` times with it dropped, in
the same run.  Prints a table; everything is removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import Procs, django_on_throwaway_postgres, seed  # noqa: E402

INDEX = "usage_sample_deleted"


def fill(instance_ids: list[str], per_instance: int) -> None:
    """``per_instance`` running samples 5 s apart before now for each instance, in one statement."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE metering_usagesample, metering_usagehour")
        if per_instance:
            cursor.execute(
                "INSERT INTO metering_usagesample (instance_id, at, received_at, source, node, running,"
                " deleted, vcpus, ram_mb, disk_gb, memory_bytes, cpu_time_ns)"
                " SELECT i.id, now() - make_interval(secs => 5 * n), now(), 'heartbeat', 'sim0000', true,"
                " false, 1, 128, 1, 0, 0"
                " FROM unnest(%s::uuid[]) AS i(id), generate_series(1, %s) AS n",
                [instance_ids, per_instance],
            )
        cursor.execute("ANALYZE metering_usagesample")


def beats(node: str, instance_ids: list[str], n: int) -> list[float]:
    from compute.spec import PowerState
    from portal.cloud.tasks import apply_node_report

    times = []
    for _ in range(n):
        inventory = [
            {"instance_id": i, "kind": "container", "power_state": PowerState.RUNNING.value,
             "cpu_time_ns": time.monotonic_ns(), "memory_bytes": 64 << 20}
            for i in instance_ids
        ]  # fmt: skip
        report: dict[str, Any] = {
            "node": node, "queue": f"node.{node}", "vcpus": 64, "ram_mb": 262144, "disk_gb": 10000,
            "drivers": [
                {"kind": k, "ok": True, "detail": "", "capabilities": []} for k in ("vm", "container")
            ],
            "inventory": inventory, "sent_at": time.time(),
        }  # fmt: skip
        t0 = time.perf_counter()
        apply_node_report(report)
        times.append(time.perf_counter() - t0)
        time.sleep(0.005)  # each beat a later sample time (milliseconds)
    return times


def set_index(present: bool) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        if present:
            cursor.execute(
                f"CREATE INDEX IF NOT EXISTS {INDEX} ON metering_usagesample (instance_id) WHERE deleted"
            )
        else:
            cursor.execute(f"DROP INDEX IF EXISTS {INDEX}")
        cursor.execute("ANALYZE metering_usagesample")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=40, help="instances on the node")
    parser.add_argument("--history", default="0,10000,100000", help="samples per instance, comma-separated")
    parser.add_argument("--beats", type=int, default=15, help="beats timed per history and variant")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="skyport-bench-history-"))
    procs = Procs(tmp)
    rows = []
    try:
        # every beat sampled for usage: what is measured is a sampled beat's work
        django_on_throwaway_postgres(procs, SKYPORT_METERING_BEAT_SECONDS="0")
        placed = seed(1, args.instances)
        node, ids = next(iter(placed.items()))
        beats(node, ids, 2)  # the node comes up: its first beats register and reconcile it
        for history in (int(x) for x in args.history.split(",")):
            fill(ids, history)
            set_index(True)
            indexed = beats(node, ids, args.beats)
            set_index(False)
            scanned = beats(node, ids, args.beats)
            set_index(True)
            rows.append((history, statistics.median(indexed), statistics.median(scanned)))
            print(f"history {history}: done", file=sys.stderr)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\none node, {args.instances} instances, {args.beats} beats each (apply_node_report, PostgreSQL)\n"
    )
    head = ("samples/instance", "days at 5 s", "beat, index", "beat, no index", "ratio")
    print(f"{head[0]:>16} {head[1]:>11} {head[2]:>12} {head[3]:>15} {head[4]:>6}")
    for history, with_index, without in rows:
        print(
            f"{history:16d} {history / 17280:11.1f} {with_index * 1000:9.1f} ms {without * 1000:12.1f} ms"
            f" {without / with_index:6.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
