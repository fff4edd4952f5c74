"""Two control workers on one queue: every observation applied once, no heartbeat lost or undone.

Issue 17 (horizontal): several control workers may run on several hosts, all consuming
``control``.  Two real ``celery -A portal worker -Q control`` processes (threads pool, 4 each,
as compose runs one) share a Redis of the test's own and the test's database (SQLite with
IMMEDIATE transactions in ``make pytest``, PostgreSQL in the ``tests/pg/run`` pass).  The test
sends every create observation twice (as a broker redelivers) and interleaves heartbeats of
several nodes whose beats arrive out of order, then checks the database and both workers' logs.
"""

from __future__ import annotations

import random
import re
import secrets
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from celery import Celery
from django.conf import settings

from compute import celeryconf
from compute.spec import Task
from portal.audit.models import Event
from portal.cloud.models import AppliedAction, ComputeNode, Instance
from tests.e2e.test_end_to_end import Stack, wait_for
from tests.faults.conftest import Redis
from tests.hostcaps import require_binary
from tests.portal.conftest import World, heartbeat

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

INSTANCES = 40
NODES = 6
BEATS = 8  # per node


def _database_url() -> str:
    """The URL of the database this test runs on, for the worker processes."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = quote(db["USER"]) + (f":{quote(db['PASSWORD'])}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{quote(db['HOST'] or '', safe='')}:{db['PORT'] or 5432}/{db['NAME']}"


def _observation(instance: Instance) -> dict[str, Any]:
    return {
        "instance_id": str(instance.pk),
        "node": "shared-1",
        "action": "create",
        "action_id": instance.action_id,
        "ok": True,
        "power_state": "running",
        "message": "",
        "observed_at": time.time(),
        "details": [],
    }


@pytest.fixture
def two_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    require_binary("redis-server")
    redis = Redis(tmp_path)
    stack = Stack(tmp_path, "", redis.url)
    stack.env.update(
        DATABASE_URL=_database_url(),
        # beats older than 3 heartbeats are dropped as stale: under load, draining every message can
        # take longer than 15 s, and the newest beat must not be dropped for that
        SKYPORT_HEARTBEAT_SECONDS="60",
        SKYPORT_CACHE_URL=redis.url.removesuffix("/0") + "/1",
    )
    for name in ("control1", "control2"):
        stack.start(name, "-A", "portal", "worker", "-Q", "control", "--pool", "threads", "-c", "4")
    # Celery prefers CELERY_BROKER_URL from the environment (settings_test sets it)
    monkeypatch.setenv("CELERY_BROKER_URL", redis.url)
    app = Celery("two-workers", fixups=[], amqp=celeryconf.AMQP_CLASS)
    app.conf.update(**celeryconf.reliability_settings(), **celeryconf.broker_settings(redis.url, 300.0))
    try:
        yield stack, redis, app
    finally:
        stack.stop()
        redis.stop()
        app.pool.force_close_all()


def _succeeded(logs: list[str], task: str) -> list[int]:
    """How many ``task`` runs each worker's log reports as succeeded."""
    pattern = re.compile(rf"Task {re.escape(task)}\[[0-9a-f-]+\] succeeded")
    return [len(pattern.findall(text)) for text in logs]


def test_two_control_workers_apply_each_observation_once_and_keep_the_newest_beat(
    world: World, two_workers: tuple[Stack, Redis, Celery]
) -> None:
    stack, redis, app = two_workers
    instances = []
    for i in range(INSTANCES):
        inst = Instance.objects.get(pk=world.instance_a.pk)
        inst.pk, inst.id, inst.name = None, uuid.uuid4(), f"w2-{i}"
        inst.action_id, inst.task_state, inst.vm_state, inst.power_state = (
            secrets.token_hex(8), "spawning", "building", "nostate"
        )  # fmt: skip
        inst.save(force_insert=True)
        instances.append(inst)
    now = time.time()
    beats = [
        (node, heartbeat(f"w2node{node}", vcpus=8 + beat, sent_at=now + beat * 0.01))
        for node in range(NODES)
        for beat in range(BEATS)
    ]
    messages = [(Task.OBSERVE, _observation(inst)) for inst in instances for _ in range(2)]
    messages += [(Task.NODE_REPORT, beat) for _, beat in beats]
    random.Random(17).shuffle(messages)  # beats of one node arrive out of order, duplicates apart
    for task, payload in messages:
        app.send_task(task, args=[payload], queue="control")

    def drained() -> bool:
        logs = [(stack.base / f"control{n}.log").read_text(errors="replace") for n in (1, 2)]
        done = _succeeded(logs, Task.OBSERVE) + _succeeded(logs, Task.NODE_REPORT)
        return sum(done) >= len(messages)

    wait_for("both workers to run every message", drained, timeout=120)
    logs = [(stack.base / f"control{n}.log").read_text(errors="replace") for n in (1, 2)]
    assert "Traceback" not in "".join(logs), "".join(logs)[-3000:]
    ran_obs, ran_beats = _succeeded(logs, Task.OBSERVE), _succeeded(logs, Task.NODE_REPORT)
    assert sum(ran_obs) == 2 * INSTANCES and sum(ran_beats) == NODES * BEATS
    assert all(n > 0 for n in ran_obs + ran_beats), f"one worker did all: {ran_obs} {ran_beats}"

    # every observation applied exactly once although each came twice, to either worker
    ids = [inst.action_id for inst in instances]
    assert AppliedAction.objects.filter(action_id__in=ids).count() == INSTANCES
    per_action = Event.objects.filter(action="node.create", request_id__in=ids).values_list(
        "request_id", flat=True
    )
    assert sorted(per_action) == sorted(ids), "an observation's event written twice or never"
    for inst in Instance.objects.filter(pk__in=[i.pk for i in instances]):
        assert (inst.vm_state, inst.power_state, inst.task_state) == ("active", "running", None)

    # no heartbeat lost: each node holds its newest beat, whichever worker saw it, in whatever order
    for node in range(NODES):
        row = ComputeNode.objects.get(name=f"w2node{node}")
        newest = max((b for n, b in beats if n == node), key=lambda b: b["sent_at"])
        assert row.last_heartbeat is not None
        assert abs(row.last_heartbeat.timestamp() - newest["sent_at"]) < 1e-3
        assert row.vcpus == newest["vcpus"], "an older beat overwrote a newer one"
        assert (row.status, Event.objects.filter(action="node.register", object_repr=row.name).count()) == (
            "up",
            1,
        )
    assert subprocess.run(["redis-cli", "-p", str(redis.port), "llen", "control"], capture_output=True,
                          text=True).stdout.strip() == "0"  # fmt: skip
