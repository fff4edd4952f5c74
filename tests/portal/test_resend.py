"""A create or delete the broker lost on its way to the node is sent again (portal/cloud/resend.py).

The node here is NodeService over fake drivers with its real heartbeat (``report()``), so the
ids it lists as taken are the ones its ``handle`` marked (compute/taken.py).  A message is
"lost" by taking it off the captured list before the node runs it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.db.models import F

from compute.spec import Kind, Task
from portal.audit.models import Event
from portal.cloud import dispatch
from portal.cloud.models import Instance, UnsentMessage
from portal.cloud.resend import ACTION, MAX_RESENDS
from portal.cloud.tasks import apply_node_report
from tests.portal.conftest import FakeNodes, World, heartbeat
from tests.portal.test_flow import _dedicate_node_a

QUEUE = "node.node-a"


@pytest.fixture
def queue_length(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """What the broker says the node's queue holds (0: empty)."""
    length: list[int | None] = [0]
    monkeypatch.setattr(dispatch, "queued", lambda queue: length[0])
    return length


def _launch(world: World, name: str) -> dict[str, Any]:
    body = {"tenant": "acme", "name": name, "image": "sample:1", "flavor": world.flavor_public.pk}
    r = world.client("a_member").post("/api/v1/instances/", body, format="json")
    assert r.status_code == 202, r.content
    return dict(r.json())


def _lose(nodes: FakeNodes, task: str) -> list[Any]:
    """Take the last message of ``task`` off the way to the node: the broker lost it."""
    index = max(i for i, (_, t, _) in enumerate(nodes.sent) if t == task)
    return nodes.sent.pop(index)[2]


def _age(pk: str, seconds: float) -> None:
    """Move the instance's claim ``seconds`` into the past (its deadline with it)."""
    Instance.objects.filter(pk=pk).update(task_deadline=F("task_deadline") - dt.timedelta(seconds=seconds))


def _beat(nodes: FakeNodes) -> None:
    nodes.service(QUEUE).report()


def _resent(pk: str) -> list[str]:
    return list(Event.objects.filter(object_id=pk, action=ACTION).values_list("message", flat=True))


def test_a_lost_create_is_sent_again_once_the_node_says_it_never_took_it(
    world: World, nodes: FakeNodes, queue_length: list[int | None], settings: Any
) -> None:
    _dedicate_node_a(world)
    inst = _launch(world, "lost")
    (lost,) = _lose(nodes, Task.CREATE)
    nodes.run()  # the rest (security rules) arrives

    _beat(nodes)  # just sent: not lost yet, it may be on its way
    assert _resent(inst["id"]) == [] and nodes.sent == []

    _age(inst["id"], settings.SKYPORT_RESEND_AFTER_SECONDS + 1)
    queue_length[0] = 2  # something still queued for the node: maybe this very message
    _beat(nodes)
    assert _resent(inst["id"]) == []
    queue_length[0] = None  # the broker cannot say: no evidence either way
    _beat(nodes)
    assert _resent(inst["id"]) == []
    UnsentMessage.objects.create(queue=QUEUE, task="compute.instance.stop", args=[{}])
    queue_length[0] = 0
    _beat(nodes)  # a message kept unsent goes first (the sweep), in order
    assert _resent(inst["id"]) == []
    UnsentMessage.objects.all().delete()

    _beat(nodes)  # the queue empty, the node never took it: sent again, same action id
    (again,) = [args for _, task, args in nodes.sent if task == Task.CREATE]
    # the same action, rebuilt from the row as it is now (its security rules' newer version)
    assert (again[0]["action_id"], again[0]["spec"]["instance_id"]) == (lost["action_id"], inst["id"])
    (note,) = _resent(inst["id"])
    assert "node-a did not take the compute.instance.create message within 60 s" in note
    assert "its queue is empty: sent again (1 of 3)" in note

    _beat(nodes)  # not again within the resend interval, though still not taken
    assert len(_resent(inst["id"])) == 1
    nodes.run()
    got = world.client("a_member").get(f"/api/v1/instances/{inst['id']}/").json()
    assert (got["vm_state"], got["task_state"], got["power_state"]) == ("active", None, "running")
    _age(inst["id"], 3600)  # settled: nothing in flight is ever sent again
    _beat(nodes)
    assert len(_resent(inst["id"])) == 1 and nodes.sent == []


def test_a_taken_message_is_not_sent_again_and_a_lost_delete_is(
    world: World, nodes: FakeNodes, queue_length: list[int | None], settings: Any
) -> None:
    _dedicate_node_a(world)
    slow = _launch(world, "slow")
    (create,) = _lose(nodes, Task.CREATE)
    nodes.service(QUEUE).taken.mark(create)  # the node took it and is still at work
    _age(slow["id"], settings.SKYPORT_RESEND_AFTER_SECONDS + 1)
    _beat(nodes)
    assert _resent(slow["id"]) == []

    gone = _launch(world, "gone")
    nodes.run()
    c = world.client("a_member")
    assert c.delete(f"/api/v1/instances/{gone['id']}/").status_code == 202
    (delete,) = _lose(nodes, Task.DELETE)
    nodes.run()
    for n in range(MAX_RESENDS):  # lost each time: sent again three times, then left to the deadline
        _age(gone["id"], settings.SKYPORT_RESEND_AFTER_SECONDS + 1)
        Event.objects.filter(object_id=gone["id"], action=ACTION).update(
            created_at=F("created_at") - dt.timedelta(seconds=settings.SKYPORT_RESEND_AFTER_SECONDS + 1)
        )
        _beat(nodes)
        assert [args for _, task, args in nodes.sent if task == Task.DELETE] == [[delete]]
        nodes.sent.clear()
        assert len(_resent(gone["id"])) == n + 1
    _age(gone["id"], settings.SKYPORT_RESEND_AFTER_SECONDS + 1)
    Event.objects.filter(object_id=gone["id"], action=ACTION).update(
        created_at=F("created_at") - dt.timedelta(seconds=settings.SKYPORT_RESEND_AFTER_SECONDS + 1)
    )
    _beat(nodes)
    assert nodes.sent == [] and len(_resent(gone["id"])) == MAX_RESENDS

    # and a node whose heartbeat does not list what it took (older nodes): never sent again
    lone = _launch(world, "lone")
    _lose(nodes, Task.CREATE)
    _age(lone["id"], settings.SKYPORT_RESEND_AFTER_SECONDS + 1)
    apply_node_report(heartbeat("node-a", capabilities={"container": ["exec"]}))
    assert _resent(lone["id"]) == []


def test_a_lost_observation_gets_the_create_sent_again_and_the_node_observes_again(
    world: World,
    nodes: FakeNodes,
    queue_length: list[int | None],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The node ran the create and sent its observation; the way back lost it (as kombu can)."""
    from portal.cloud import tasks

    real = tasks.apply_observation
    dropped: list[dict[str, Any]] = []

    def lose_the_first(data: dict[str, Any]) -> str:
        if not dropped:
            dropped.append(data)
            return "lost"
        return real(data)

    monkeypatch.setattr(tasks, "apply_observation", lose_the_first)  # before the node is made
    _dedicate_node_a(world)
    inst = _launch(world, "unheard")
    nodes.run()
    assert dropped and dropped[0]["action_id"] == Instance.objects.get(pk=inst["id"]).action_id
    svc = nodes.service(QUEUE)
    assert list(svc.driver(Kind.CONTAINER).workloads) == [inst["id"]]  # the node did create it
    taken, done = svc.taken.recent()
    assert dropped[0]["action_id"] in taken and dropped[0]["action_id"] in done

    _beat(nodes)  # too early to call it lost
    assert _resent(inst["id"]) == []
    _age(inst["id"], settings.SKYPORT_RESEND_AFTER_SECONDS + 1)
    _beat(nodes)
    (note,) = _resent(inst["id"])
    assert "node-a handled the compute.instance.create message, but its observation did not arrive" in note
    nodes.run()  # the node finds the container there and observes again
    got = world.client("a_member").get(f"/api/v1/instances/{inst['id']}/").json()
    assert (got["vm_state"], got["task_state"], got["power_state"]) == ("active", None, "running")
    assert list(svc.driver(Kind.CONTAINER).workloads) == [inst["id"]]  # still one
    assert Event.objects.filter(object_id=inst["id"], action="node.create").count() == 1
