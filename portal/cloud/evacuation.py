"""Node loss: evacuate a down node, drain a live one, and destroy what a returning node still runs.

**Evacuate** (the node is down or disabled *and* silent: no heartbeat for
three periods, as the sweeper counts): each of its live instances is placed
again by the scheduler's own filters and weigher (:mod:`portal.cloud.scheduler`,
the request built as for a create by :func:`placement.scheduler_request`, the
node rows locked as a create locks them), keeping its kind: a container only
on a node dedicated to its tenant, a VM on a shared node or one of its
tenant's.  It keeps its id, name, sizes, address and MAC, and is rebuilt
there from its image (a VM boots a fresh root disk, cloud-init runs again; a
container starts from its image with its launch config).  The root disk on
the lost node is lost; volumes are files on that node (local storage), so
they are detached and marked ``error`` with the reason, never pretended
attached; snapshots (inside the lost disk) become ``missing``; published
ports (on the lost node's external address) are dropped.  An instance no node
can take goes to ``error`` with "no node can take it: …" and stays on the
lost node's row.  Quota: a move adds nothing (the row moves, no second row
counts), so usage is the same before and after.

**Drain** (the node is alive): the node is disabled for new placements and
its containers are moved cold: the node destroys its copy first, and only
its observation of that sends the create to the target (one copy at a time,
one address on the network).  Its VMs are migrated cold with their disk
(:mod:`portal.cloud.vm_migration`: shut down cleanly, disk sent through the
portal, built on the target, then the source copy destroyed); a VM with
volumes or snapshots, or one no node can take, stays, listed with the reason.

**The lost node comes back**: every move leaves an :class:`Evacuation` row;
the old node's reconcile sends it a destroy of each copy the portal has
moved elsewhere (or deleted), again after ``RESEND_SECONDS`` while the copy
is still listed, and closes the row once it is gone.  The guard is one
condition, :func:`_owned_here`: a copy is never destroyed on the node the
instance's row names.  Observations a node sends about an instance the
portal has moved off it never change the row (``tasks.apply_observation``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from compute.spec import Action, CreateInstance, DeleteInstance, InventoryItem, Kind, Observation, PowerState
from portal.audit.log import record
from portal.audit.models import Outcome
from portal.cloud import (
    deadlines,
    dispatch,
    forwards,
    networks,
    placement,
    scheduler,
    services,
    states,
    vm_migration,
)
from portal.cloud.choices import NodeStatus, TaskState, VmState
from portal.cloud.models import ComputeNode, Evacuation, Instance
from portal.errors import Conflict
from portal.storage import volumes as storage_volumes
from portal.storage.choices import SnapshotStatus, VolumeStatus

#: how long a destroy sent to a returning node may go unanswered before reconcile sends it again
RESEND_SECONDS = 60.0

DATA_LOSS = (
    "Root disks of instances on {node} are on that node and are lost: VMs are rebuilt from their image "
    "(a fresh disk; cloud-init runs again), containers from their image with their launch config. "
    "Volumes are files on {node} (local storage): they cannot be attached elsewhere and are marked "
    "error; their files are still on {node} if it comes back. Snapshots (inside the lost disks) are "
    "marked missing; published ports on {node}'s external addresses are removed."
)


@dataclasses.dataclass(frozen=True)
class Move:
    """What happened to one instance: rebuilding / moving (drain) / migrating (drain, a VM) / error /
    deleted / stays."""

    id: str
    name: str
    tenant: str
    kind: str
    result: str
    target: str | None
    reason: str


@dataclasses.dataclass(frozen=True)
class VolumeNote:
    id: str
    name: str
    tenant: str
    status: str
    reason: str


@dataclasses.dataclass
class Report:
    node: str
    mode: str
    status: str
    data_loss: str
    moves: list[Move] = dataclasses.field(default_factory=list)
    volumes: list[VolumeNote] = dataclasses.field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.moves:
            out[m.result] = out.get(m.result, 0) + 1
        return out

    def summary(self) -> str:
        counts = ", ".join(f"{n} {what}" for what, n in sorted(self.counts().items())) or "no instances"
        return f"{self.mode} of {self.node}: {counts}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "mode": self.mode,
            "status": self.status,
            "data_loss": self.data_loss,
            "counts": self.counts(),
            "instances": [dataclasses.asdict(m) for m in self.moves],
            "volumes": [dataclasses.asdict(v) for v in self.volumes],
        }


def silent(node: ComputeNode, now: dt.datetime | None = None) -> bool:
    """No heartbeat for three periods (the sweeper's rule for marking a node down)."""
    if node.last_heartbeat is None:
        return True
    now = now or timezone.now()
    return now - node.last_heartbeat > dt.timedelta(seconds=3 * settings.SKYPORT_HEARTBEAT_SECONDS)


def _locked_nodes() -> list[ComputeNode]:
    """Every node row, locked in pk order as a create locks them (no create places meanwhile)."""
    qs = ComputeNode.objects.select_related("owner").order_by("pk")
    return list(qs.select_for_update(of=("self",)))


def _residents(node: ComputeNode) -> list[Instance]:
    return list(
        Instance.objects.live()
        .filter(node=node)
        .select_for_update(of=("self",))
        .select_related("tenant", "image", "network")
        .order_by("created_at", "pk")
    )


def _event(
    inst: Instance, action: str, message: str, user: Any, ok: bool = True, action_id: str = ""
) -> None:
    record(
        action,
        inst,
        actor=user,
        actor_name="portal",
        outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
        message=message[:1000],
        request_id=action_id,
    )


def _choose(inst: Instance, nodes: list[ComputeNode], source: ComputeNode) -> tuple[str | None, str, str]:
    """(target node name, the scheduler's reason, "") or (None, "", why no node can take it).

    The why is what the tenant may read (nodes counted, not named, as for a create) and is
    stored as the instance's reason; the report for operators gets the named list too.
    """
    if inst.image is None:
        return None, "", "its image has been deleted, so it cannot be rebuilt"
    if inst.image.artifact_for(inst.kind) is None:
        return None, "", f"its image {inst.image} has no {inst.kind} artifact"
    sreq = placement.scheduler_request(
        inst.tenant, inst.kind, (inst.vcpus, inst.ram_mb, inst.disk_gb), inst.image, inst.anti_affinity_group
    )
    views = [v for v in placement.node_views(nodes) if v.name != source.name]
    try:
        chosen = scheduler.schedule(sreq, views)
    except scheduler.NoValidHost as exc:
        rejected = [(v.name, why) for v in views if (why := scheduler.reject_reason(v, sreq, inst.kind))]
        if not rejected:
            return None, "", str(exc)
        counted = "; ".join(f"{label}: {why}" for label, why in scheduler.summarize(rejected))
        return None, "", counted
    return chosen.node, chosen.reason, ""


def _named_rejections(inst: Instance, nodes: list[ComputeNode], source: ComputeNode) -> str:
    """For operators: each node and why it cannot take the instance."""
    if inst.image is None or inst.image.artifact_for(inst.kind) is None:
        return ""
    sreq = placement.scheduler_request(
        inst.tenant, inst.kind, (inst.vcpus, inst.ram_mb, inst.disk_gb), inst.image, inst.anti_affinity_group
    )
    return "; ".join(
        f"{v.name}: {why}"
        for v in placement.node_views(nodes)
        if v.name != source.name and (why := scheduler.reject_reason(v, sreq, inst.kind))
    )


def _fail(
    inst: Instance,
    source: ComputeNode,
    why: str,
    named: str,
    user: Any,
    mode: str,
    what: str = "no node can take it",
) -> Move:
    inst.vm_state = VmState.ERROR
    inst.task_state = None
    inst.task_deadline = None
    inst.power_state = PowerState.NOSTATE
    inst.status_reason = f"{mode} of node {source.name}: {what}: {why}"[:255]
    inst.save()
    _event(inst, f"instance.{mode}", inst.status_reason, user, ok=False)
    return Move(
        str(inst.pk),
        inst.name,
        inst.tenant.slug,
        inst.kind,
        "error",
        None,
        f"{what}: {named or why}",
    )


def _leave_behind(
    inst: Instance,
    source: ComputeNode,
    target: ComputeNode | None,
    mode: str,
    create_pending: bool,
    then_stop: bool = False,
) -> Evacuation:
    """Record the copy left on ``source`` and send it the destroy (queued until the node is back)."""
    now = timezone.now()
    Evacuation.objects.filter(instance=inst, source=source, cleaned_at__isnull=True).update(cleaned_at=now)
    if target is not None:  # moved back onto a node that still had a copy: that copy is the instance again
        Evacuation.objects.filter(instance=inst, source=target, cleaned_at__isnull=True).update(
            cleaned_at=now
        )
    ev = Evacuation.objects.create(
        instance=inst,
        source=source,
        target=target,
        mode=mode,
        destroy_action_id=uuid.uuid4().hex,
        destroy_sent_at=now,
        create_pending=create_pending,
        then_stop=then_stop,
    )
    dispatch.send(source.queue, DeleteInstance(str(inst.pk), Kind(inst.kind), ev.destroy_action_id))
    return ev


def _detach_local(inst: Instance, source: ComputeNode, report: Report) -> list[str]:
    """What stays behind on ``source`` with the instance's root disk; returns notes for the event."""
    notes = []
    for vol in inst.volumes.select_for_update().exclude(status=VolumeStatus.DELETED):
        vol.status_reason = (
            f"was attached to {inst.name}, moved off node {source.name}: the volume is a file on "
            f"{source.name} (local storage) and cannot be attached on another node"
        )[:255]
        vol.status, vol.instance, vol.target = VolumeStatus.ERROR, None, ""
        vol.save(update_fields=["status", "status_reason", "instance", "target", "updated_at"])
        record(
            "volume.left_behind",
            vol,
            tenant_id=vol.tenant_id,
            actor_name="portal",
            outcome=Outcome.FAILURE,
            message=vol.status_reason,
        )
        report.volumes.append(
            VolumeNote(str(vol.pk), vol.name, inst.tenant.slug, vol.status, vol.status_reason)
        )
        notes.append(f"volume {vol.name} stays on {source.name} (error)")
    lost = inst.snapshots.exclude(status=SnapshotStatus.MISSING).update(
        status=SnapshotStatus.MISSING,
        status_reason=f"inside the root disk left on {source.name}"[:255],
    )
    if lost:
        notes.append(f"{lost} snapshot(s) missing")
    dropped = forwards.forget(inst)
    if dropped:
        notes.append(f"{dropped} published port(s) on {source.name} removed")
    return notes


def _rebuild(
    inst: Instance,
    source: ComputeNode,
    target: ComputeNode,
    reason: str,
    mode: str,
    user: Any,
    report: Report,
    create_now: bool,
) -> Move:
    """Point the row at ``target`` and rebuild there (now, or once the source has destroyed its copy)."""
    action_id = uuid.uuid4().hex
    rule = states.RULES[Action.CREATE]
    old_why = inst.isolation_reason.split(": ", 1)[-1]
    was_stopped = inst.vm_state == VmState.STOPPED
    inst.node = target
    inst.isolation_reason = f"{reason.split(': ', 1)[0]}: moved from {source.name} ({old_why})"[:255]
    inst.vm_state = VmState.BUILDING
    inst.task_state = rule.task
    inst.action_id = action_id
    inst.task_deadline = timezone.now() + dt.timedelta(seconds=deadlines.deadline_seconds(rule.task))
    inst.power_state = PowerState.NOSTATE
    inst.missing_since = None
    inst.restarts = 0
    what = "rebuilding" if create_now else "waiting for the copy on the old node to stop"
    inst.status_reason = f"{mode} of node {source.name}: {what} on {target.name}"[:255]
    inst.save()
    spec = services.build_spec(inst)  # before anything is sent: a refusal fails this move alone
    notes = _detach_local(inst, source, report)
    _leave_behind(inst, source, target, mode, create_pending=not create_now, then_stop=was_stopped)
    if create_now:
        dispatch.send(target.queue, CreateInstance(spec, action_id))
    if target.tunnel_address:  # each network's other nodes learn the new peer
        for net in dict.fromkeys(p.network for p in networks.nics(inst)):
            networks.sync_network(net, exclude=target)
    message = f"from {source.name} to {target.name}: {reason}" + (f"; {'; '.join(notes)}" if notes else "")
    _event(inst, f"instance.{mode}", message, user, action_id=action_id)
    return Move(
        str(inst.pk),
        inst.name,
        inst.tenant.slug,
        inst.kind,
        "rebuilding" if create_now else "moving",
        target.name,
        message,
    )


def _move(
    inst: Instance,
    source: ComputeNode,
    target: ComputeNode,
    reason: str,
    mode: str,
    user: Any,
    report: Report,
) -> Move:
    """One instance's move in a savepoint: a refusal (its spec cannot be built) fails it alone."""
    volumes_noted = len(report.volumes)
    try:
        with transaction.atomic():
            return _rebuild(
                inst, source, target, reason, mode, user, report, create_now=mode == Evacuation.Mode.EVACUATE
            )
    except Conflict as exc:
        del report.volumes[volumes_noted:]
        inst.refresh_from_db()
        if mode == Evacuation.Mode.DRAIN:
            return Move(str(inst.pk), inst.name, inst.tenant.slug, inst.kind, "stays", None, str(exc))
        return _fail(inst, source, str(exc), "", user, mode, what="cannot rebuild it")


def _finish_delete(inst: Instance, source: ComputeNode, user: Any) -> Move:
    """A delete was in flight when the node went down: the row is deleted now, the copy destroyed later."""
    inst.vm_state = VmState.DELETED
    inst.task_state = None
    inst.task_deadline = None
    inst.deleted_at = timezone.now()
    inst.power_state = PowerState.NOSTATE
    inst.status_reason = f"deleted while node {source.name} was down; the node destroys it when it returns"
    inst.save()
    inst.ports.all().delete()
    forwards.forget(inst)
    storage_volumes.release(inst)
    _leave_behind(inst, source, None, Evacuation.Mode.EVACUATE, create_pending=False)
    _event(inst, "instance.evacuate", inst.status_reason, user)
    return Move(str(inst.pk), inst.name, inst.tenant.slug, inst.kind, "deleted", None, inst.status_reason)


def evacuate(node: ComputeNode, user: Any) -> Report:
    """Rebuild every live instance of a down node elsewhere (see the module's docstring).

    Conflict (409) while the node is up, or disabled but still heartbeating: its
    workloads run, and rebuilding them would run each twice.
    """
    with transaction.atomic():
        nodes = _locked_nodes()
        source = next(n for n in nodes if n.pk == node.pk)
        if source.status == NodeStatus.UP or not silent(source):
            seen = f"{source.last_heartbeat:%Y-%m-%d %H:%M:%S} UTC" if source.last_heartbeat else "never"
            raise Conflict(
                f"Node {source.name} is {source.status} and its last heartbeat was {seen}: its instances "
                "may still run, and evacuating would run each of them twice. Evacuate a node only when "
                f"it is down (no heartbeat for {3 * settings.SKYPORT_HEARTBEAT_SECONDS:g} s); to move "
                "instances off a live node, drain it."
            )
        report = Report(
            source.name, Evacuation.Mode.EVACUATE, source.status, DATA_LOSS.format(node=source.name)
        )
        for inst in _residents(source):
            if inst.task_state == TaskState.DELETING:
                report.moves.append(_finish_delete(inst, source, user))
                continue
            target, reason, why = _choose(inst, nodes, source)
            if target is None:
                named = _named_rejections(inst, nodes, source)
                report.moves.append(_fail(inst, source, why, named, user, Evacuation.Mode.EVACUATE))
                continue
            dest = next(n for n in nodes if n.name == target)
            report.moves.append(_move(inst, source, dest, reason, Evacuation.Mode.EVACUATE, user, report))
        report.moves += _drained_before_loss(source)
        record(
            "computenode.evacuate",
            source,
            actor=user,
            actor_name="portal",
            outcome=Outcome.SUCCESS,
            message=report.summary(),
        )
    return report


def _drained_before_loss(source: ComputeNode) -> list[Move]:
    """Containers a drain was moving off ``source`` when it was lost: their create goes now."""
    moves = []
    waiting = (
        Evacuation.objects.select_for_update(of=("self",))
        .filter(source=source, cleaned_at__isnull=True, create_pending=True)
        .select_related("instance__tenant", "source", "target")
    )
    for ev in waiting:
        inst, target = ev.instance, ev.target
        if target is None or inst.node_id != target.pk or inst.task_state != TaskState.SPAWNING:
            continue
        _send_create(ev)
        ev.save(update_fields=["create_pending"])
        why = f"a drain was moving it to {target.name} when {source.name} was lost: building it there now"
        moves.append(
            Move(str(inst.pk), inst.name, inst.tenant.slug, inst.kind, "rebuilding", target.name, why)
        )
    return moves


def _migrate(inst: Instance, nodes: list[ComputeNode], source: ComputeNode, user: Any) -> Move:
    """A VM of a drained node: its cold migration starts (``vm_migration``), or it stays with the reason."""

    def stays(why: str) -> Move:
        return Move(str(inst.pk), inst.name, inst.tenant.slug, inst.kind, "stays", None, why)

    why = vm_migration.why_it_stays(inst, source)
    if why:
        return stays(why)
    target, reason, why = _choose(inst, nodes, source)
    if target is None:
        return stays(f"no node can take it: {_named_rejections(inst, nodes, source) or why}")
    dest = next(n for n in nodes if n.name == target)
    message = vm_migration.begin(inst, source, dest, reason, user)
    return Move(str(inst.pk), inst.name, inst.tenant.slug, inst.kind, "migrating", dest.name, message)


def drain(node: ComputeNode, user: Any) -> Report:
    """Disable a live node, move its containers cold and start the cold migration of its VMs."""
    with transaction.atomic():
        nodes = _locked_nodes()
        source = next(n for n in nodes if n.pk == node.pk)
        if silent(source):
            raise Conflict(
                f"Node {source.name} sends no heartbeat, so it cannot stop its instances for a drain. "
                f"Evacuate it instead (POST /api/v1/nodes/{source.name}/evacuate/)."
            )
        source.status = NodeStatus.DISABLED
        source.status_reason = "drained by an operator"
        source.save(update_fields=["status", "status_reason"])
        loss = (
            f"Containers are restarted from their image on another node (their writable layer on "
            f"{source.name} is not copied). VMs are migrated cold with their disk: each is shut down "
            f"(cleanly, or it stays), its disk copied, and it is started again on its target if it ran; "
            f"a VM with volumes or snapshots stays on {source.name}."
        )
        report = Report(source.name, Evacuation.Mode.DRAIN, source.status, loss)
        for inst in _residents(source):
            if inst.kind == Kind.VM:
                report.moves.append(_migrate(inst, nodes, source, user))
                continue
            if inst.task_state is not None:
                why = f"busy ({inst.task_state}); drain again when it has finished"
                report.moves.append(
                    Move(str(inst.pk), inst.name, inst.tenant.slug, inst.kind, "stays", None, why)
                )
                continue
            target, reason, why = _choose(inst, nodes, source)
            if target is None:
                named = _named_rejections(inst, nodes, source) or why
                move = Move(
                    str(inst.pk), inst.name, inst.tenant.slug, inst.kind, "stays", None,
                    f"no node can take it: {named}",
                )  # fmt: skip
                report.moves.append(move)
                continue
            dest = next(n for n in nodes if n.name == target)
            report.moves.append(_move(inst, source, dest, reason, Evacuation.Mode.DRAIN, user, report))
        record(
            "computenode.drain",
            source,
            actor=user,
            actor_name="portal",
            outcome=Outcome.SUCCESS,
            message=report.summary(),
        )
    return report


# ---------------------------------------------------------------- the old node's side


def _owned_here(inst: Instance, node: ComputeNode) -> bool:
    """The guard: the portal says the instance lives on ``node``; its workload there is never destroyed."""
    return inst.node_id == node.pk and inst.vm_state != VmState.DELETED


def _send_create(ev: Evacuation) -> None:
    """The drain's second step: the source has destroyed its copy, the target builds the instance."""
    ev.create_pending = False
    inst = ev.instance
    if ev.target is None or inst.node_id != ev.target_id or inst.task_state != TaskState.SPAWNING:
        return  # the row changed meanwhile (deleted, failed by the sweeper): nothing to build
    try:
        spec = services.build_spec(inst)
    except Conflict as exc:  # e.g. its image was deleted meanwhile
        inst.vm_state, inst.task_state, inst.task_deadline = VmState.ERROR, None, None
        inst.status_reason = f"{ev.mode} to {ev.target.name}: cannot rebuild it: {exc}"[:255]
        inst.save()
        _event(inst, f"instance.{ev.mode}", inst.status_reason, None, ok=False)
        return
    dispatch.send(ev.target.queue, CreateInstance(spec, inst.action_id))
    _event(
        inst, "instance.drain", f"the copy on {ev.source.name} stopped; building on {ev.target.name}", None
    )


def left_behind(
    node: ComputeNode, seen: Mapping[str, InventoryItem], blind: Iterable[str], sent: dt.datetime
) -> set[str]:
    """Reconcile of ``node``: destroy the copies the portal moved off it; returns their ids (not orphans).

    Inside the heartbeat's transaction; ``sent`` is when the node took the heartbeat.  A copy no
    longer listed closes its row (and lets a waiting drain create go); one still listed gets its
    destroy again after ``RESEND_SECONDS``.  A heartbeat taken before a row was closed (the
    destroy's observation overtook it) may still list the copy: that is no orphan either.
    """
    blind = set(blind)
    now = timezone.now()
    # One read of this node's moves that are open or closed since the beat was taken (every beat
    # runs it; three reads were a tenth of a steady beat's time).  A steady beat (nothing moved off
    # this node) takes no row lock: read first, lock what is open.
    stale: set[str] = set()
    open_rows = []
    moves = (
        Evacuation.objects.filter(source=node)
        .filter(Q(cleaned_at__isnull=True) | Q(cleaned_at__gte=sent))
        .order_by()
        .values_list("pk", "instance_id", "cleaned_at", "step")
    )
    for pk, instance_id, cleaned_at, step in moves:
        if cleaned_at is None and not step:
            open_rows.append(pk)
        elif str(instance_id) in seen:
            # closed after the beat was taken, or a VM migrating off this node (vm_migration; its
            # copy is the instance until the target runs it): the node still lists it, no orphan
            stale.add(str(instance_id))
    rows = (
        Evacuation.objects.select_for_update(of=("self",))
        .filter(pk__in=open_rows, cleaned_at__isnull=True, step="")
        .select_related("instance", "target", "source")
    )
    for ev in rows if open_rows else ():
        inst, iid = ev.instance, str(ev.instance_id)
        if _owned_here(inst, node):
            ev.cleaned_at = now  # the instance is back on this node: its copy is the instance
            ev.save(update_fields=["cleaned_at"])
            continue
        if inst.kind in blind:
            stale.add(iid)
            continue  # the driver lists nothing now: the copy may still be there
        if iid not in seen:
            ev.cleaned_at = now
            if ev.create_pending:
                _send_create(ev)
            ev.save(update_fields=["cleaned_at", "create_pending"])
            _event(inst, "evacuation.cleaned", f"no copy left on {node.name}", None)
            continue
        stale.add(iid)
        if ev.destroy_sent_at is None or (now - ev.destroy_sent_at).total_seconds() > RESEND_SECONDS:
            ev.destroy_sent_at = now
            ev.save(update_fields=["destroy_sent_at"])
            dispatch.send(node.queue, DeleteInstance(iid, Kind(inst.kind), ev.destroy_action_id))
            where = (
                f"moved to {inst.node.name}" if inst.node and inst.vm_state != VmState.DELETED else "deleted"
            )
            _event(
                inst, "evacuation.destroy", f"{node.name} still runs a copy ({where}): destroying it", None
            )
    return stale


def rebuilt(inst: Instance, obs: Observation) -> None:
    """A create the portal asked for has run (inside the observation's transaction): an instance
    that was stopped before it was moved is stopped again (a create starts what it builds)."""
    if obs.action != Action.CREATE or not obs.ok:
        return
    ev = (
        Evacuation.objects.select_for_update(of=("self",))
        .filter(instance=inst, target__name=obs.node, then_stop=True)
        .first()
    )
    if ev is None or not states.may_start(Action.STOP, inst.vm_state, inst.task_state):
        return
    ev.then_stop = False
    ev.save(update_fields=["then_stop"])
    services.dispatch_action(inst, Action.STOP, {}, None, f"it was stopped before it left {ev.source.name}")


def observed_elsewhere(inst: Instance, obs: Observation) -> str:
    """An observation from a node that no longer owns ``inst``: it never changes the row.

    A destroy of a copy left behind closes its :class:`Evacuation` (a drain then builds on its
    target); a failed one of a drain puts the row back on the source, where the instance still runs.
    """
    ev = (
        Evacuation.objects.select_for_update(of=("self",))
        .filter(instance=inst, source__name=obs.node, destroy_action_id=obs.action_id)
        .select_related("source", "target")
        .first()
    )
    if ev is None or obs.action != Action.DELETE:
        record(
            f"node.{obs.action}.ignored",
            inst,
            actor_name=f"node:{obs.node}",
            outcome=Outcome.FAILURE,
            message=f"{obs.node} reported {obs.action} of a copy the portal no longer places there; ignored",
            request_id=obs.action_id,
        )
        return "other-node"
    if obs.ok:
        if ev.cleaned_at is None:
            ev.cleaned_at = timezone.now()
            if ev.create_pending:
                _send_create(ev)
            ev.save(update_fields=["cleaned_at", "create_pending"])
        _event(inst, "evacuation.cleaned", f"{obs.node} destroyed its copy", None, action_id=obs.action_id)
        return "evacuation"
    if ev.create_pending and inst.node_id == ev.target_id:
        # a drain whose first step failed: the instance still runs on the source
        ev.create_pending, ev.cleaned_at = False, timezone.now()
        ev.save(update_fields=["create_pending", "cleaned_at"])
        inst.node = ev.source
        inst.task_state = None
        inst.task_deadline = None
        inst.power_state = obs.power_state
        inst.vm_state = states.POWER_TO_VM.get(obs.power_state, VmState.ERROR)
        inst.status_reason = f"drain: {obs.node} could not stop it ({obs.message}); it stays there"[:255]
        inst.save()
    _event(
        inst,
        "evacuation.destroy",
        f"{obs.node} could not destroy its copy: {obs.message}",
        None,
        ok=False,
        action_id=obs.action_id,
    )
    return "evacuation"
