"""A node message the broker refuses after its commit: kept, sent later in order, never a 500.

tests/faults runs the real thing (Redis stopped in a burst of 100 creates); these tests pin the
rules: a create whose publish fails answers 202 and its message waits as an UnsentMessage; later
messages to the same queue wait behind it (a node hears of a create before the security
rules that name it); the sweep sends them in order once the broker takes
them again, stops at the first it still refuses, and drops one older than the redelivery delay.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.utils import timezone

from portal.cloud import dispatch, tasks
from portal.cloud.deadlines import configured_visibility, redelivery_seconds
from portal.cloud.models import Instance, UnsentMessage
from tests.portal.conftest import FakeNodes, World
from tests.portal.test_flow import _dedicate_node_a


class Broker:
    """dispatch._send while the broker is away (``down``), else the test's recorder."""

    def __init__(self, sent: list[Any]) -> None:
        self.sent = sent
        self.down = True
        self.refused = 0

    def __call__(self, queue: str, task: str, args: list[Any]) -> None:
        if self.down:
            self.refused += 1
            raise ConnectionRefusedError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        self.sent.append((queue, task, args))


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch, sent: list[Any]) -> Broker:
    b = Broker(sent)
    monkeypatch.setattr(dispatch, "_send", b)
    return b


def _about(args: list[Any]) -> str:
    """The instance a create or delete message is about."""
    body = args[0]
    return str(body["spec"]["instance_id"] if "spec" in body else body.get("instance_id", "-"))


def _launch(c: Any, world: World, name: str) -> dict[str, Any]:
    body = {"tenant": "acme", "name": name, "image": "sample:1", "flavor": world.flavor_public.pk}
    r = c.post("/api/v1/instances/", body, format="json")
    assert r.status_code == 202, r.content  # the rows are saved: never a 500 for the broker
    return dict(r.json())


def test_a_create_the_broker_refuses_answers_202_and_runs_once_the_sweep_sends_it(
    world: World, nodes: FakeNodes, broker: Broker
) -> None:
    _dedicate_node_a(world)
    c = world.client("a_member")
    first = _launch(c, world, "first")
    assert broker.refused == 1 and nodes.sent == []
    (kept,) = UnsentMessage.objects.all()
    assert (kept.queue, kept.task, kept.attempts) == ("node.node-a", "compute.instance.create", 1)
    assert "Connection refused" in kept.last_error
    assert _about(kept.args) == first["id"]

    # while one waits, later messages to that queue wait behind it, without trying the broker
    second = _launch(c, world, "second")
    assert broker.refused == 1
    waiting = [(m.task, _about(m.args)) for m in UnsentMessage.objects.order_by("id")]
    assert waiting == [
        ("compute.instance.create", first["id"]),
        ("compute.instance.create", second["id"]),
        ("compute.network.security_batch", "-"),  # the tenant's group now has two members
    ]

    # the broker still away: the sweep tries the oldest once, keeps all, counts the attempt
    assert dispatch.flush() == {"resent": 0, "dropped": 0, "unsent_failed": 1}
    assert broker.refused == 2 and UnsentMessage.objects.count() == 3
    assert UnsentMessage.objects.order_by("id")[0].attempts == 2
    assert UnsentMessage.objects.filter(claimed_until__isnull=False).count() == 0  # released

    # back: the beat's sweep sends all three in their order, and the node acts on them
    broker.down = False
    result = tasks.sweep_task()
    assert (result["resent"], result["dropped"], result["unsent_failed"]) == (3, 0, 0)
    assert [(t, _about(a)) for _, t, a in nodes.sent] == waiting
    assert not UnsentMessage.objects.exists()
    nodes.run()
    for made in (first, second):
        assert Instance.objects.get(pk=made["id"]).vm_state == "active"

    # and with nothing waiting, a message goes straight to the broker again
    assert c.delete(f"/api/v1/instances/{first['id']}/").status_code == 202
    assert ("compute.instance.delete", first["id"]) in [(t, _about(a)) for _, t, a in nodes.sent]
    assert not UnsentMessage.objects.exists()
    nodes.run()
    assert Instance.objects.get(pk=first["id"]).vm_state == "deleted"


def test_a_message_another_sweep_holds_is_left_to_it_and_an_old_one_is_dropped(
    world: World, broker: Broker
) -> None:
    now = timezone.now()
    held = UnsentMessage.objects.create(
        queue="node.x", task="compute.instance.stop", args=[{}], claimed_until=now + dt.timedelta(seconds=60)
    )
    behind = UnsentMessage.objects.create(queue="node.x", task="compute.instance.start", args=[{}])
    broker.down = False
    # the held one is being sent by another sweep: this one sends nothing (order kept)
    assert dispatch.flush(now) == {"resent": 0, "dropped": 0, "unsent_failed": 0}
    assert broker.sent == [] and UnsentMessage.objects.count() == 2

    # a claim that ran out (its sweep died) is taken over
    later = now + dt.timedelta(seconds=dispatch.CLAIM_SECONDS + 1)
    assert dispatch.flush(later)["resent"] == 2
    assert [t for _, t, _ in broker.sent] == [held.task, behind.task]

    # kept past the redelivery delay: dropped, not sent (its instance fails at its deadline)
    old = UnsentMessage.objects.create(queue="node.x", task="compute.instance.reboot", args=[{}])
    limit = redelivery_seconds(float(configured_visibility()))
    UnsentMessage.objects.filter(pk=old.pk).update(created_at=now - dt.timedelta(seconds=limit + 1))
    assert dispatch.flush(now) == {"resent": 0, "dropped": 1, "unsent_failed": 0}
    assert len(broker.sent) == 2 and not UnsentMessage.objects.exists()
