"""Control-queue tasks: observations, heartbeats with reconcile, and the sweeper.

All are idempotent: an observation whose action id was already applied is
ignored (each applied id is kept in :class:`AppliedAction`, apart from the
audit log, so pruning events never replays one); a
heartbeat older than the last one changes nothing; the sweeper only moves
rows that are past their deadline.  Reconcile records drift and orphans;
it never deletes rows, and the only workloads it has a node destroy are
copies the portal moved to another node (``portal.cloud.evacuation``);
an observation from a node the instance was moved off never changes its row.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from typing import Any

from celery import shared_task
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from compute.spec import (
    SNAPSHOT_ACTIONS,
    Action,
    ConsoleTail,
    InventoryItem,
    NodeReport,
    Observation,
    PowerState,
    SnapshotInfo,
    SpecError,
    Task,
    from_json,
)
from portal.audit.log import record
from portal.audit.models import Outcome
from portal.cloud import dispatch, evacuation, metrics, networks, resend, states, vm_migration
from portal.cloud.choices import NodeStatus, TaskState, VmState
from portal.cloud.models import AppliedAction, ComputeNode, Instance, Network
from portal.images.choices import ImageStatus
from portal.metering import sampling
from portal.storage import backups, snapshots, volumes

log = logging.getLogger(__name__)


def _node_event(
    tenant_id: int | None, node: str, action: str, obj: Any, outcome: str, message: str, request_id: str = ""
) -> None:
    record(
        action,
        obj,
        tenant_id=tenant_id,
        actor_name=f"node:{node}",
        outcome=outcome,
        message=message,
        request_id=request_id,
    )


def _first_application(instance: Instance, obs: Observation) -> bool:
    """Mark the observation's action id applied; False if it already was (a redelivery)."""
    try:
        with transaction.atomic():
            AppliedAction.objects.create(instance=instance, action_id=obs.action_id, action=obs.action)
    except IntegrityError:
        return False
    return True


def _forget_ports(instance: Instance) -> None:
    """Delete a deleted instance's ports; nodes that no longer carry a network leave its peers."""
    left = list(instance.ports.values_list("network_id", flat=True))
    instance.ports.all().delete()
    if instance.node is not None and left:
        networks.release_node(instance.node, left)


def apply_observation(data: dict[str, Any]) -> str:
    """Apply one node observation; returns what happened (for logs and tests)."""
    try:
        obs = from_json(Observation, data)
    except SpecError as exc:
        log.error("dropping malformed observation %r: %s", data, exc)
        return "malformed"
    with transaction.atomic():
        # the node's name comes with the row (one query fewer per observation); only the row is locked
        instance = (
            Instance.objects.select_for_update(of=("self",))
            .select_related("node")
            .filter(pk=obs.instance_id)
            .first()
        )
        if instance is None:
            log.warning("observation for unknown instance %s from %s", obs.instance_id, obs.node)
            return "unknown-instance"
        if not _first_application(instance, obs):
            return "duplicate"
        if instance.node is not None and obs.node != instance.node.name:
            # a copy the portal moved off that node (evacuation, drain): it never changes the row
            return evacuation.observed_elsewhere(instance, obs)
        # a step of a drain's cold migration of a VM, a VM backup's upload, or any other action
        moved = backups.observe_instance_send(instance, obs)
        if moved is None:
            moved = vm_migration.observed(instance, obs)
        if moved is None:
            _settle(instance, obs)
        _node_event(
            instance.tenant_id,
            obs.node,
            f"node.{obs.action}",
            instance,
            Outcome.SUCCESS if obs.ok else Outcome.FAILURE,
            obs.message or f"power state {obs.power_state.value}",
            obs.action_id,
        )
        if moved is not None:
            return moved
        evacuation.rebuilt(instance, obs)  # a create of a moved instance: stopped again if it was
    return "applied"


def _settle(instance: Instance, obs: Observation) -> None:
    """Apply an observation to its instance's row (the rules of ``states``), its snapshots and samples."""
    instance.power_state = obs.power_state
    if obs.action_id == instance.action_id:
        instance.vm_state = states.settled(obs.action, obs.ok, obs.power_state, instance.vm_state)
        if obs.ok:
            instance.status_reason = ""
            instance.missing_since = None
            if obs.action == Action.DELETE:
                instance.deleted_at = timezone.now()
                _forget_ports(instance)
                volumes.release(instance)  # the volumes outlive it, detached
        else:
            instance.status_reason = f"{obs.action} failed: {obs.message}"[:255]
            if obs.action == Action.PUBLISH:
                instance.published_images.filter(status=ImageStatus.QUEUED).update(
                    status=ImageStatus.FAILED,
                    status_reason=f"the node could not publish: {obs.message}"[:255],
                )
        if obs.action == Action.RESIZE and instance.resize_from:
            if not obs.ok:  # the node kept the old sizes: count those again
                old = instance.resize_from
                instance.flavor_id = old["flavor"]
                instance.vcpus, instance.ram_mb, instance.disk_gb = (
                    old["vcpus"],
                    old["ram_mb"],
                    old["disk_gb"],
                )
            instance.resize_from = None
        instance.task_state = None
        instance.task_deadline = None
    instance.save()
    if obs.action in SNAPSHOT_ACTIONS:
        snapshots.sync(instance, obs.snapshots, obs.ok)
    sampling.record_observation(instance, obs, timezone.now())


def _drifted(power_state: str, vm_state: str, task_state: str | None, item: InventoryItem | None) -> bool:
    """Whether reconcile has something to record for an instance row and what the node listed."""
    if task_state is not None:
        return False  # an action is in flight; its observation will settle the row
    if item is None:
        settled = (VmState.ACTIVE, VmState.STOPPED, VmState.PAUSED)
        return vm_state in settled and power_state != PowerState.NOSTATE
    return item.power_state.value != power_state


def _record_drift(node: str, rows: Any, seen: dict[str, InventoryItem], inventory_at: float) -> None:
    """Record what the node's list says of the rows that looked drifted, judged again under lock."""
    # A row changed after the node began its list (the create's observation of a workload spawned
    # while the list was taken) is judged by the next beat, not by a list older than the row.
    # The node's clock against the database's: nodes keep time with NTP (docs/deploy.md); a node
    # running ahead by d still judges rows changed in the last d by an older list, as before.
    listed = inventory_at or None
    for inst in rows.select_for_update():
        item = seen.get(str(inst.pk))
        if not _drifted(inst.power_state, inst.vm_state, inst.task_state, item):
            continue  # settled meanwhile
        if listed is not None and inst.updated_at.timestamp() > listed:
            continue  # changed since the node's list was taken
        if item is None:
            inst.power_state = PowerState.NOSTATE
            inst.status_reason = f"workload missing on node {node} (found by reconcile)"
            inst.missing_since = timezone.now()
            inst.save(update_fields=["power_state", "status_reason", "missing_since", "updated_at"])
            _node_event(inst.tenant_id, node, "reconcile.missing", inst, Outcome.FAILURE, inst.status_reason)
        else:
            old = inst.power_state
            inst.power_state = item.power_state.value
            inst.vm_state = states.POWER_TO_VM.get(item.power_state, inst.vm_state)
            if item.gave_up:  # a crash loop: the restart policy is used up, a human must look
                inst.vm_state = VmState.ERROR
            # how it ended (exit code or signal, last output), or nothing when it runs again
            inst.status_reason = item.message[:255]
            inst.missing_since = None
            inst.save(
                update_fields=["power_state", "vm_state", "status_reason", "missing_since", "updated_at"]
            )
            _node_event(
                inst.tenant_id,
                node,
                "reconcile.power_state",
                inst,
                Outcome.SUCCESS,
                f"power state {old} -> {inst.power_state} (seen on the node)"
                + (f": {item.message}" if item.message else ""),
            )


def _record_restarts(node: str, rows: Any, seen: dict[str, InventoryItem]) -> None:
    """Restart counts from the node's restart policy (compute/drivers/container.py ``supervise``)."""
    for inst in rows.select_for_update():
        item = seen[str(inst.pk)]
        if item.restarts == inst.restarts:
            continue
        inst.restarts = item.restarts
        # not updated_at: that marks a change reconcile must not judge with this beat's list
        inst.save(update_fields=["restarts"])
        if item.restarts:
            message = f"restarted by its policy {inst.restart_policy} ({item.restarts} in a row)"
            _node_event(inst.tenant_id, node, "instance.restarted", inst, Outcome.SUCCESS, message)


def _sync_snapshots(live: Any, seen: dict[str, InventoryItem], task_states: dict[str, str | None]) -> None:
    """Settle the snapshot rows of the idle instances from the node's lists.

    An instance with an action in flight is left to that action's observation.
    The rows are read in one query; only instances whose rows are out of step are locked.
    """
    listed: dict[str, tuple[SnapshotInfo, ...]] = {
        iid: item.snapshots
        for iid, item in seen.items()
        if item.snapshots is not None and iid in task_states and task_states[iid] is None
    }
    unsettled = snapshots.out_of_step(listed)
    for inst in live.filter(pk__in=unsettled, task_state=None).select_for_update() if unsettled else ():
        snapshots.sync(inst, listed[str(inst.pk)])


def _reconcile(node: ComputeNode, report: NodeReport) -> dict[str, str]:
    """Compare the node's real inventory with the database; record, never delete.

    Returns the instances whose create or delete, or its observation, was lost on the way
    (portal/cloud/resend.py), for the caller to send again after its transaction.

    The steady state (nothing drifted) reads the node's instances as plain values, without row
    locks: locking all of a node's rows on every heartbeat dirtied every instance row each beat
    and was the control worker's next limit as nodes grew (bench/scale.py).  Only rows that look
    drifted are locked, read again and judged again, so a concurrent observation still wins.
    """
    seen = {item.instance_id: item for item in report.inventory}
    # A driver that is down lists nothing: its instances are unknown, not missing.
    blind = {d.kind for d in report.drivers if not d.ok}
    live = Instance.objects.live().filter(node=node).exclude(kind__in=blind)
    known = set()
    samples: list[tuple[str, int, int]] = []
    suspects = []
    restarted = []
    task_states: dict[str, str | None] = {}
    in_flight = []
    for pk, power_state, vm_state, task_state, restarts, action_id, deadline in live.order_by().values_list(
        "pk", "power_state", "vm_state", "task_state", "restarts", "action_id", "task_deadline"
    ):
        known.add(str(pk))
        if task_state is not None:
            in_flight.append((str(pk), task_state, action_id, deadline))
        item = seen.get(str(pk))
        if item is not None and item.power_state == PowerState.RUNNING and item.cpu_time_ns:
            samples.append((str(pk), item.cpu_time_ns, item.memory_bytes))
        if item is not None and item.restarts != restarts:
            restarted.append(pk)
        if _drifted(power_state, vm_state, task_state, item):
            suspects.append(pk)
        task_states[str(pk)] = task_state
    if restarted:
        _record_restarts(node.name, live.filter(pk__in=restarted), seen)
    _sync_snapshots(live, seen, task_states)
    if suspects:
        _record_drift(node.name, live.filter(pk__in=suspects), seen, report.inventory_at)
    host = (report.node, dataclasses.asdict(report.host)) if report.host is not None else None
    metrics.record_many(report.sent_at or time.time(), samples, host)
    # copies of instances the portal moved elsewhere are destroyed, not reported as orphans
    taken = dt.datetime.fromtimestamp(report.sent_at, tz=dt.UTC) if report.sent_at else timezone.now()
    moved = evacuation.left_behind(node, seen, blind, taken)
    orphans = sorted(
        (
            {"instance_id": iid, "kind": item.kind.value, "power_state": item.power_state.value}
            for iid, item in seen.items()
            if iid not in known and iid not in moved
        ),
        key=lambda o: o["instance_id"],
    )
    if orphans != node.orphans:
        node.orphans = orphans
        if orphans:
            _node_event(
                None,
                node.name,
                "reconcile.orphans",
                node,
                Outcome.FAILURE,
                f"{len(orphans)} workload(s) on the node unknown to the portal: "
                + ", ".join(o["instance_id"] for o in orphans[:10]),
            )
    # judged as of the beat (a beat read late must not call a message taken since then lost)
    return resend.unanswered(in_flight, report, taken)


def apply_node_report(data: dict[str, Any]) -> ComputeNode | None:
    """Register or refresh a node from its heartbeat, then reconcile its inventory."""
    try:
        report = from_json(NodeReport, data)
    except SpecError as exc:
        log.error("dropping malformed node report: %s", exc)
        return None
    # Usage samples first: a beat too old for reconcile still says what ran at its time.
    sampling.record_report(report, timezone.now())
    sent = dt.datetime.fromtimestamp(report.sent_at, tz=dt.UTC) if report.sent_at else timezone.now()
    if timezone.now() - sent > dt.timedelta(seconds=3 * settings.SKYPORT_HEARTBEAT_SECONDS):
        log.info("ignoring stale heartbeat of %s sent at %s", report.node, sent)
        return None  # a beat queued while the control plane was away says nothing about now
    with transaction.atomic():
        node, created = ComputeNode.objects.select_for_update().get_or_create(
            name=report.node, defaults={"queue": report.queue}
        )
        if node.last_heartbeat and node.last_heartbeat >= sent:
            return node  # an older beat delivered late
        node.queue = report.queue
        node.vcpus, node.ram_mb, node.disk_gb = report.vcpus, report.ram_mb, report.disk_gb
        node.drivers = {
            d.kind.value: {"ok": d.ok, "detail": d.detail, "capabilities": sorted(d.capabilities)}
            for d in report.drivers
        }
        node.last_heartbeat = sent
        node.cached = list(report.cached)
        came_up = node.status == NodeStatus.DOWN
        readdressed = (node.tunnel_address or "") != report.tunnel_address
        node.tunnel_address = report.tunnel_address or None
        if report.network_drift and report.network_drift != node.network_drift:
            _node_event(None, node.name, "node.network_drift", node, Outcome.FAILURE, report.network_drift)
        node.network_drift = report.network_drift
        if came_up:
            _node_event(None, node.name, "node.up", node, Outcome.SUCCESS, "heartbeat resumed")
        if node.status != NodeStatus.DISABLED:
            node.status = NodeStatus.UP
            node.status_reason = ""
        lost = _reconcile(node, report)
        volumes.reconcile(node, report.volumes)
        node.save()
        if (came_up or readdressed) and node.status == NodeStatus.UP:
            # Peers skip nodes that are down or do not tunnel: tell every node of its networks again.
            for network in Network.objects.filter(ports__instance__node=node).distinct():
                networks.sync_network(network)
        if created:
            _node_event(
                None,
                node.name,
                "node.register",
                node,
                Outcome.SUCCESS,
                f"registered with {node.vcpus} vCPUs and {node.ram_mb} MiB",
            )
    if lost and node.status == NodeStatus.UP:
        resend.resend(node, lost, report)
    return node


def sweep(now: dt.datetime | None = None) -> dict[str, int]:
    """Fail instances stuck past their task deadline; mark silent nodes down."""
    now = now or timezone.now()
    stuck = 0
    silent_since = now - dt.timedelta(seconds=3 * settings.SKYPORT_HEARTBEAT_SECONDS)
    backlog = None  # asked before the transaction: a broker that is away must not hold the writer
    if ComputeNode.objects.filter(status=NodeStatus.UP, last_heartbeat__lt=silent_since).exists():
        backlog = dispatch.queued(settings.CELERY_TASK_DEFAULT_QUEUE)
    with transaction.atomic():
        # of=self: PostgreSQL cannot lock the nullable side of the outer join to the node
        for inst in (
            Instance.objects.select_for_update(of=("self",))
            .filter(task_state__isnull=False, task_deadline__lt=now)
            .select_related("node")
        ):
            task = inst.task_state
            if task == TaskState.MIGRATING and vm_migration.timed_out(inst):
                stuck += 1  # back on its source, as it was
                continue
            if task == TaskState.BACKING_UP and backups.instance_timed_out(inst):
                stuck += 1  # the backup failed; the VM stays stopped
                continue
            inst.vm_state = VmState.ERROR
            inst.status_reason = (
                f"{task} timed out: node {inst.node.name if inst.node else '-'} did not report in time"
            )[:255]
            inst.task_state = None
            inst.task_deadline = None
            inst.save(
                update_fields=["vm_state", "status_reason", "task_state", "task_deadline", "updated_at"]
            )
            record(
                f"instance.{task}.timeout",
                inst,
                actor_name="portal",
                outcome=Outcome.FAILURE,
                message=inst.status_reason,
                request_id=inst.action_id,
            )
            stuck += 1
        down = 0
        silent = ComputeNode.objects.select_for_update().filter(
            status=NodeStatus.UP, last_heartbeat__lt=silent_since
        )
        deferred = _behind(silent, now, backlog)
        if deferred:
            silent = silent.exclude(pk__in=deferred)
        for node in silent:
            node.status = NodeStatus.DOWN
            node.status_reason = f"no heartbeat since {node.last_heartbeat:%H:%M:%S} UTC (3 beats missed)"
            node.save(update_fields=["status", "status_reason"])
            _node_event(None, node.name, "node.down", node, Outcome.FAILURE, node.status_reason)
            down += 1
    return {"stuck": stuck, "down": down, "deferred": len(deferred)}


def _behind(silent: Any, now: dt.datetime, backlog: int | None) -> list[Any]:
    """The silent nodes not to mark down now because their beats may be queued unread.

    A control plane that falls behind reads every node's beats late: all nodes look silent
    together, and marking them down blames them for the portal's own backlog (bench/scale.py
    at 500 nodes: hundreds of false marks, nodes flapping).  So when the ``control`` queue holds
    more messages than there are nodes up (more than a beat each waiting: ``backlog``, read
    before the sweep's transaction), the sweeper marks
    down only nodes silent longer than ``SKYPORT_NODE_DOWN_BACKLOG_SECONDS``; the others wait
    for the backlog.  The broker not answering is no evidence: the nodes are judged as always.
    """
    candidates = list(silent.values_list("pk", "last_heartbeat"))
    if not candidates:
        return []
    up = ComputeNode.objects.filter(status=NodeStatus.UP).count()
    if backlog is None or backlog <= up:
        return []
    limit = now - dt.timedelta(seconds=settings.SKYPORT_NODE_DOWN_BACKLOG_SECONDS)
    deferred = [pk for pk, last in candidates if last is not None and last >= limit]
    if deferred:
        log.warning(
            "the control queue holds %d messages for %d nodes up: not marking %d silent node(s) "
            "down, their beats may be queued (a node silent over %d s is marked down still)",
            backlog,
            up,
            len(deferred),
            settings.SKYPORT_NODE_DOWN_BACKLOG_SECONDS,
        )
    return deferred


@shared_task(name=Task.OBSERVE)
def observe(data: dict[str, Any]) -> str:
    return apply_observation(data)


@shared_task(name=Task.NODE_REPORT)
def node_report(data: dict[str, Any]) -> None:
    apply_node_report(data)


def apply_console(data: dict[str, Any]) -> bool:
    """Keep a console tail a node sent, if the instance lives on that node."""
    try:
        tail = from_json(ConsoleTail, data)
    except SpecError as exc:
        log.error("dropping malformed console tail: %s", exc)
        return False
    if not Instance.objects.live().filter(pk=tail.instance_id, node__name=tail.node).exists():
        return False
    metrics.store_console(tail.instance_id, tail.node, tail.text, tail.at)
    return True


@shared_task(name=Task.CONSOLE_TAIL)
def console(data: dict[str, Any]) -> bool:
    return apply_console(data)


@shared_task(name="portal.sweep")
def sweep_task() -> dict[str, int]:
    # node messages the broker refused after their commit first (portal/cloud/dispatch.py)
    resent = dispatch.flush()
    return sweep() | resent
