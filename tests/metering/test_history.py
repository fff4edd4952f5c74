"""A heartbeat's metering work does not grow with the samples an instance has gathered (issue 17).

Every beat asks, for each instance on the node, whether it has a delete sample.  Without an
index that answer scanned all of the instance's samples: 720 an hour at 5 s beats, 25 ms
per instance at 100,000 samples on PostgreSQL (``EXPLAIN ANALYZE``: "Rows Removed by Filter:
100005"), so a node's beat slowed down for as long as its instances ran.  The partial index
``usage_sample_deleted`` (only delete samples) answers it with one probe.
"""

from __future__ import annotations

import datetime as dt
import time

from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from compute.spec import NodeReport, from_json
from portal.metering import sampling
from portal.metering.models import UsageSample
from tests.portal.conftest import World, heartbeat


def _plan(sql: str) -> str:
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # a small table would be read whole: ask which index the planner takes when it uses one
            cursor.execute("SET LOCAL enable_seqscan = off")
            cursor.execute("EXPLAIN " + sql)
        else:
            cursor.execute("EXPLAIN QUERY PLAN " + sql)
        return "\n".join(str(row) for row in cursor.fetchall())


def test_the_beats_delete_check_probes_an_index_of_delete_samples_only(world: World) -> None:
    inst = world.instance_a
    now = timezone.now()
    history = [
        sampling._sample(inst, now - dt.timedelta(seconds=5 * n), now, "heartbeat", "shared-1", running=True)
        for n in range(1, 2001)
    ]
    UsageSample.objects.bulk_create(history)
    item = {"instance_id": str(inst.pk), "kind": "vm", "power_state": "running", "cpu_time_ns": 1}
    report = from_json(NodeReport, heartbeat("shared-1", inventory=[item], sent_at=time.time()))
    with CaptureQueriesContext(connection) as ctx:
        assert sampling.record_report(report, timezone.now()) == 1
    live = next(q["sql"] for q in ctx.captured_queries if "EXISTS" in q["sql"])
    with transaction.atomic():
        plan = _plan(live)
    assert "usage_sample_deleted" in plan, plan
