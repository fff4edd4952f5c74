"""Control-queue tasks: apply what nodes observed and register their heartbeats.

Both are idempotent: an observation whose action id was already applied is
ignored (it is recorded once, as an Event keyed by the action id), and a
heartbeat only moves a node's state forward in time.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from celery import shared_task
from django.db import transaction
from django.utils import timezone

from compute.spec import NodeReport, Observation, SpecError
from portal.audit.models import Event, Outcome
from portal.cloud.choices import NodeStatus, TaskState, VmState
from portal.cloud.models import ComputeNode, Instance

log = logging.getLogger(__name__)

#: vm_state an instance settles in after a successful action
_SETTLED: dict[str, str | None] = {
    "create": VmState.ACTIVE,
    "start": VmState.ACTIVE,
    "reboot": VmState.ACTIVE,
    "resume": VmState.ACTIVE,
    "revert": None,  # whatever power state the snapshot had
    "stop": VmState.STOPPED,
    "pause": VmState.PAUSED,
    "snapshot": None,
    "delete_snapshot": None,
    "delete": VmState.DELETED,
}
_POWER_TO_VM: dict[str, str] = {
    "running": VmState.ACTIVE,
    "paused": VmState.PAUSED,
    "shutdown": VmState.STOPPED,
}


def apply_observation(data: dict[str, Any]) -> str:
    """Apply one node observation; returns what happened (for logs and tests)."""
    try:
        obs = Observation.from_json(data)
    except (SpecError, ValueError, TypeError) as exc:
        log.error("dropping malformed observation %r: %s", data, exc)
        return "malformed"
    with transaction.atomic():
        instance = Instance.objects.select_for_update().filter(pk=obs.instance_id).first()
        if instance is None:
            log.warning("observation for unknown instance %s from %s", obs.instance_id, obs.node)
            return "unknown-instance"
        if Event.objects.filter(
            request_id=obs.action_id, action=f"node.{obs.action}", object_id=str(instance.pk)
        ).exists():
            return "duplicate"
        instance.power_state = obs.power_state.value
        if obs.ok:
            settled = _SETTLED.get(obs.action) or _POWER_TO_VM.get(obs.power_state.value, instance.vm_state)
            instance.vm_state = settled
            instance.status_reason = ""
            if obs.action == "delete":
                instance.deleted_at = instance.deleted_at or timezone.now()
        else:
            instance.status_reason = obs.message[:255]
            if obs.action == "create":
                instance.vm_state = VmState.ERROR
        if instance.task_state in (TaskState.SPAWNING, TaskState.SCHEDULING) or obs.action != "create":
            instance.task_state = None
        instance.save()
        Event.objects.create(
            tenant_id=instance.tenant_id,
            actor_name=f"node:{obs.node}",
            action=f"node.{obs.action}",
            object_type="instance",
            object_id=str(instance.pk),
            object_repr=str(instance)[:200],
            request_id=obs.action_id,
            outcome=Outcome.SUCCESS if obs.ok else Outcome.FAILURE,
            message=obs.message or f"power state {obs.power_state.value}",
        )
    return "applied"


def apply_node_report(data: dict[str, Any]) -> ComputeNode | None:
    """Register or refresh a node from its heartbeat."""
    try:
        report = NodeReport.from_json(data)
    except (SpecError, ValueError, TypeError) as exc:
        log.error("dropping malformed node report: %s", exc)
        return None
    sent = dt.datetime.fromtimestamp(report.sent_at, tz=dt.UTC) if report.sent_at else timezone.now()
    with transaction.atomic():
        node, created = ComputeNode.objects.select_for_update().get_or_create(
            name=report.node, defaults={"queue": report.queue}
        )
        if node.last_heartbeat and node.last_heartbeat >= sent:
            return node  # an older beat delivered late
        node.queue = report.queue
        node.vcpus, node.ram_mb, node.disk_gb = report.vcpus, report.ram_mb, report.disk_gb
        node.drivers = {kind: {"ok": ok, "detail": why} for kind, ok, why in report.drivers}
        node.last_heartbeat = sent
        if node.status != NodeStatus.DISABLED:
            node.status = NodeStatus.UP
            node.status_reason = ""
        node.save()
        if created:
            Event.objects.create(
                actor_name=f"node:{node.name}",
                action="node.register",
                object_type="computenode",
                object_id=str(node.pk),
                object_repr=node.name,
                outcome=Outcome.SUCCESS,
                message=f"registered with {node.vcpus} vCPUs and {node.ram_mb} MiB",
            )
    return node


@shared_task(name="portal.observe")
def observe(data: dict[str, Any]) -> str:
    return apply_observation(data)


@shared_task(name="portal.node_report")
def node_report(data: dict[str, Any]) -> None:
    apply_node_report(data)
