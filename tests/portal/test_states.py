"""The state table is the one source of the action rules; capabilities come from the nodes' heartbeats."""

from __future__ import annotations

import ast
import pathlib
from typing import Any

import pytest

from compute.spec import INSTANCE_ACTIONS, Action, Capability, Kind
from portal.cloud import deadlines, states
from portal.cloud.api.serializers import InstanceActionSerializer
from portal.cloud.choices import TaskState, VmState
from portal.cloud.models import ComputeNode, Instance
from portal.cloud.tasks import apply_node_report
from portal.web.presenters import action_allowed
from tests.portal.conftest import FakeNodes, World, heartbeat

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_action_has_its_own_task_state() -> None:
    tasks = [rule.task for rule in states.RULES.values()]
    assert len(tasks) == len(set(tasks))
    assert states.RULES[Action.REVERT].task == TaskState.REVERTING
    assert states.RULES[Action.PUBLISH].task == TaskState.PUBLISHING
    # every task state but scheduling belongs to one rule, and has a deadline; backing_up is a VM
    # disk backup's send_disk (portal/storage/backups.py), with send_disk's deadline
    assert set(TaskState) - {TaskState.SCHEDULING, TaskState.BACKING_UP} == set(tasks)
    assert set(deadlines.WORK_SECONDS) == {*tasks, TaskState.BACKING_UP}
    assert deadlines.WORK_SECONDS[TaskState.BACKING_UP] == states.RULES[Action.SEND_DISK].work_seconds


def test_the_portal_dispatches_only_what_nodes_run() -> None:
    # create, delete and send_disk (a migration's) have messages of their own
    dispatched = {a for a, r in states.RULES.items()} - {Action.CREATE, Action.DELETE, Action.SEND_DISK}
    assert dispatched <= INSTANCE_ACTIONS
    assert states.PUBLIC_ACTIONS == ("start", "stop", "reboot", "pause", "resume", "snapshot", "revert")
    assert InstanceActionSerializer().fields["action"].choices.keys() == set(states.PUBLIC_ACTIONS)


def test_settling_follows_the_table() -> None:
    from compute.spec import PowerState

    assert states.settled(Action.STOP, True, PowerState.SHUTDOWN, VmState.ACTIVE) == VmState.STOPPED
    assert states.settled(Action.CREATE, False, PowerState.NOSTATE, VmState.BUILDING) == VmState.ERROR
    assert states.settled(Action.REVERT, True, PowerState.PAUSED, VmState.ACTIVE) == VmState.PAUSED
    assert states.settled(Action.REBOOT, False, PowerState.RUNNING, VmState.ACTIVE) == VmState.ACTIVE
    assert (
        states.settled(Action.DELETE_SNAPSHOT, True, PowerState.SHUTDOWN, VmState.ACTIVE) == VmState.STOPPED
    )


def _beat(node: str, capabilities: dict[str, list[str]]) -> None:
    apply_node_report(heartbeat(node, capabilities=capabilities))


def test_what_a_node_reports_decides_what_is_offered(world: World, nodes: FakeNodes) -> None:
    """Nothing in the portal says 'containers have no snapshots': the heartbeat does."""
    c = world.client("a_member")
    inst = world.instance_a  # a VM on shared-1
    url = f"/api/v1/instances/{inst.pk}/actions/"
    _beat("shared-1", {"vm": ["console", "pause"], "container": ["console", "pause", "snapshots"]})
    assert ComputeNode.objects.get(name="shared-1").capabilities("vm") == {
        Capability.CONSOLE,
        Capability.PAUSE,
    }
    refused = c.post(url, {"action": "snapshot", "params": {"name": "s1"}}, format="json")
    assert refused.status_code == 409
    assert "Virtual machines do not support 'snapshot' on node shared-1" in refused.json()["message"]
    assert refused.json()["code"] == "invalid_action"
    inst.refresh_from_db()
    assert not action_allowed(inst, Action.SNAPSHOT) and action_allowed(inst, Action.PAUSE)
    # the same instance as a container on a node whose container driver keeps snapshots
    Instance.objects.filter(pk=inst.pk).update(kind=Kind.CONTAINER)
    inst.refresh_from_db()
    assert action_allowed(inst, Action.SNAPSHOT)
    assert c.post(url, {"action": "snapshot", "params": {"name": "s1"}}, format="json").status_code == 202
    assert Instance.objects.get(pk=inst.pk).task_state == TaskState.SNAPSHOTTING


def test_a_node_that_never_reported_capabilities_is_offered_none_of_them(world: World) -> None:
    node = ComputeNode.objects.get(name="shared-1")
    node.drivers = {"vm": {"ok": True, "detail": "from an older node"}}
    node.save()
    inst = Instance.objects.select_related("node").get(pk=world.instance_a.pk)
    assert inst.capabilities == frozenset()
    assert not action_allowed(inst, Action.PAUSE) and action_allowed(inst, Action.STOP)


@pytest.mark.parametrize("action", ["snapshot", "revert"])
def test_actions_that_need_a_name_say_so(world: World, action: str) -> None:
    r = world.client("a_member").post(
        f"/api/v1/instances/{world.instance_a.pk}/actions/", {"action": action}, format="json"
    )
    assert r.status_code == 409 and f"'{action}' needs a snapshot name in params.name." in r.json()["message"]


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_domain_errors_and_the_state_table_know_no_web_layer() -> None:
    for module in ("portal/errors.py", "portal/cloud/states.py"):
        bad = {n for n in _imports(ROOT / module) if n.split(".")[0] in ("rest_framework", "django")}
        assert bad == set(), (module, bad)
    assert "rest_framework" not in str(_imports(ROOT / "portal/cloud/services.py"))


def test_services_raise_domain_errors_not_api_exceptions() -> None:
    offenders: list[Any] = []
    for path in (ROOT / "portal").rglob("*.py"):
        if "api" in path.parts:
            continue
        if "APIException" in path.read_text() and path.name != "exceptions.py":
            offenders.append(path)
    assert offenders == []


def test_the_api_takes_the_parameters_the_table_names(world: World) -> None:
    assert {"timeout", "force", "name"} == states.PUBLIC_PARAMS
    r = world.client("a_member").post(
        f"/api/v1/instances/{world.instance_a.pk}/actions/",
        {"action": "stop", "params": {"colour": "red"}},
        format="json",
    )
    assert r.status_code == 400 and "Unknown params ['colour']" in r.json()["message"]
