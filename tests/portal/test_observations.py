"""The control worker applies node observations and heartbeats idempotently."""

from __future__ import annotations

import time
from typing import Any

from portal.audit.models import Event
from portal.cloud.models import AppliedAction, ComputeNode
from portal.cloud.tasks import apply_node_report, apply_observation
from tests.portal.conftest import World, heartbeat


def _obs(world: World, **kw: Any) -> dict[str, Any]:
    base = {
        "instance_id": str(world.instance_a.pk),
        "node": "shared-1",  # where instance_a runs: observations from other nodes are ignored
        "action": "create",
        "action_id": "act-1",
        "ok": True,
        "power_state": "running",
        "message": "",
        "observed_at": time.time(),
        "details": [],
    }
    return base | kw


def _in_flight(world: World) -> None:
    world.instance_a.action_id = "act-1"
    world.instance_a.task_state = "spawning"
    world.instance_a.vm_state = "building"
    world.instance_a.save()


def test_observation_applied_once(world: World) -> None:
    _in_flight(world)
    assert apply_observation(_obs(world)) == "applied"
    world.instance_a.refresh_from_db()
    assert (world.instance_a.vm_state, world.instance_a.power_state) == ("active", "running")
    world.instance_a.vm_state = "stopped"
    world.instance_a.save()
    assert apply_observation(_obs(world)) == "duplicate"
    world.instance_a.refresh_from_db()
    assert world.instance_a.vm_state == "stopped", "a duplicate must change nothing"
    assert Event.objects.filter(action="node.create", request_id="act-1").count() == 1


def test_failed_create_goes_to_error_with_reason(world: World) -> None:
    _in_flight(world)
    apply_observation(_obs(world, ok=False, power_state="nostate", message="image digest mismatch"))
    world.instance_a.refresh_from_db()
    assert world.instance_a.vm_state == "error"
    assert world.instance_a.status_reason == "create failed: image digest mismatch"
    assert world.instance_a.task_state is None


def test_malformed_and_unknown_observations_are_dropped(world: World) -> None:
    assert apply_observation({"nope": 1}) == "malformed"
    assert apply_observation(_obs(world, power_state="exploded")) == "malformed"
    assert (
        apply_observation(_obs(world, instance_id="00000000-0000-0000-0000-000000000000"))
        == "unknown-instance"
    )


def test_heartbeat_registers_node_and_ignores_late_beats(world: World) -> None:
    now = time.time()
    report = heartbeat(
        "n9", vcpus=2, ram_mb=1024, disk_gb=10, down={"container": "crun missing"}, sent_at=now
    )
    node = apply_node_report(report)
    assert node is not None and node.status == "up" and node.drivers["container"]["ok"] is False
    apply_node_report(report | {"sent_at": now - 60, "vcpus": 64})
    assert ComputeNode.objects.get(name="n9").vcpus == 2
    assert Event.objects.filter(action="node.register", object_repr="n9").count() == 1


def test_stale_heartbeat_does_not_revive_a_node(world: World) -> None:
    report = heartbeat("ghost", kinds=("vm",), vcpus=2, ram_mb=1024, disk_gb=10, sent_at=time.time() - 3600)
    assert apply_node_report(report) is None
    assert not ComputeNode.objects.filter(name="ghost").exists()


def test_a_duplicate_is_ignored_after_the_audit_log_was_pruned(world: World) -> None:
    """Applied action ids live apart from the Events: pruning the log never replays an observation.

    Before AppliedAction, duplicates were found by looking up Event rows, so this applied twice.
    """
    _in_flight(world)
    assert apply_observation(_obs(world)) == "applied"
    Event.objects.all().delete()  # an operator prunes the audit log
    world.instance_a.vm_state = "stopped"
    world.instance_a.save()
    assert apply_observation(_obs(world)) == "duplicate"
    world.instance_a.refresh_from_db()
    assert world.instance_a.vm_state == "stopped"
    assert not Event.objects.exists()
    assert AppliedAction.objects.filter(instance=world.instance_a, action_id="act-1").count() == 1


def test_a_steady_heartbeat_locks_only_its_node_row(world: World) -> None:
    """Issue 17: reconcile locked every instance row of the node on every beat (bench/scale.py);
    now it reads them as values and locks only rows that look drifted."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    inst = world.instance_a  # active, running on shared-1
    item = {"instance_id": str(inst.pk), "kind": "vm", "power_state": "running"}
    apply_node_report(heartbeat("shared-1", inventory=[item]))
    with CaptureQueriesContext(connection) as steady:
        apply_node_report(heartbeat("shared-1", inventory=[item]))
    locks = [q["sql"] for q in steady.captured_queries if "FOR UPDATE" in q["sql"]]
    assert len(locks) == (1 if connection.features.has_select_for_update else 0), locks
    # a drifted row is still locked, judged again and reconciled
    with CaptureQueriesContext(connection) as drift:
        apply_node_report(heartbeat("shared-1", inventory=[item | {"power_state": "paused"}]))
    inst.refresh_from_db()
    assert (inst.power_state, inst.vm_state) == ("paused", "paused")
    assert Event.objects.filter(action="reconcile.power_state", object_id=str(inst.pk)).count() == 1
    if connection.features.has_select_for_update:
        assert sum("FOR UPDATE" in q["sql"] for q in drift.captured_queries) == 2
