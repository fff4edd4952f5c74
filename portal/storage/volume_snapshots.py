"""Snapshots of volumes as resources: take, revert, delete, settled by the node's observation.

The same shape and states as the snapshots of VM disks (``snapshots.py``):
a row is written when the tenant asks (``creating``, ``reverting``,
``deleting``), the request goes to the volume's node after commit, and the
node's :class:`compute.spec.VolumeObservation` carries the volume's whole
list, from which :func:`snapshots.settle` settles the rows.  Every refusal
happens before anything is written or sent.

When a snapshot may be taken (docs/storage.md): of a detached volume, or of
one attached to a stopped instance (VM or container), with nothing in flight
on the volume or its instance.  Not while its VM runs: libvirt 9.0 takes an
internal snapshot of a running VM only with its memory and every writable
disk (that is the instance snapshot, which already includes attached
volumes), and QEMU holds the qcow2 write lock; not while its container runs,
since the file is mounted.  A revert needs the volume detached: the node
replaces the disk or file under no one's feet.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db import transaction

from compute.spec import Kind, SnapshotInfo, VolumeObservation, VolumeOp, VolumeRequest
from portal.audit.log import record
from portal.audit.models import Outcome
from portal.cloud import dispatch
from portal.cloud.choices import VmState
from portal.errors import Conflict, NotFound
from portal.storage.choices import SNAPSHOT_IN_FLIGHT, SnapshotStatus, VolumeStatus
from portal.storage.models import Volume, VolumeSnapshot
from portal.storage.snapshots import node_time, settle

#: volume statuses a snapshot request may start from (no volume request in flight)
_SETTLED = (VolumeStatus.AVAILABLE, VolumeStatus.IN_USE)
#: what a snapshot row becomes while the node works on each request
_WORKING = {
    VolumeOp.SNAPSHOT: SnapshotStatus.CREATING,
    VolumeOp.REVERT: SnapshotStatus.REVERTING,
    VolumeOp.DELETE_SNAPSHOT: SnapshotStatus.DELETING,
}


def _names(volume: Volume) -> str:
    names = list(volume.snapshots.exclude(status=SnapshotStatus.MISSING).values_list("name", flat=True))
    return ", ".join(names) if names else "none"


def get(volume: Volume, name: str) -> VolumeSnapshot:
    """The volume's snapshot called ``name``, else 404 naming the ones it has."""
    snap = volume.snapshots.filter(name=name).first()
    if snap is None:
        raise NotFound(f"Volume {volume.name} has no snapshot {name!r}; its snapshots: {_names(volume)}.")
    return snap


def revertible_names(volume: Volume) -> list[str]:
    """Names of the snapshots the node has, newest first: the ones the revert form offers."""
    rows = volume.snapshots.exclude(status__in=(SnapshotStatus.CREATING, SnapshotStatus.MISSING))
    return list(rows.order_by("-taken_at", "-created_at").values_list("name", flat=True))


def refusal(volume: Volume, op: VolumeOp) -> str | None:
    """Why ``op`` cannot start on the volume now (one sentence), or None; read without locks (pages)."""
    if volume.status not in _SETTLED:
        return f"Volume {volume.name} is {volume.status}; try again when it is available."
    if volume.snapshots.filter(status__in=SNAPSHOT_IN_FLIGHT).exists():
        return f"A snapshot of volume {volume.name} is in progress; try again when it finishes."
    instance = volume.instance
    if instance is None:
        return None
    if op is VolumeOp.REVERT:
        return (
            f"Volume {volume.name} is attached to {instance.name}: a volume is reverted only while "
            "detached; detach it first."
        )
    if instance.vm_state != VmState.STOPPED or instance.task_state:
        what = instance.task_state or instance.vm_state
        hint = (
            "snapshot the instance instead (its snapshots include attached volumes), or stop it"
            if instance.kind == Kind.VM
            else "stop it first"
        )
        return (
            f"Volume {volume.name} is attached to {instance.name}, which is {what}: a volume in use "
            f"cannot be snapshotted on its own; {hint}."
        )
    return None


def _request(volume: Volume, name: str, op: VolumeOp, user: Any) -> VolumeSnapshot:
    """Lock the volume, check, write the row's working status and send ``op`` after commit."""
    with transaction.atomic():
        locked = Volume.objects.select_for_update(of=("self",))  # the instance join is nullable
        volume = locked.select_related("instance", "node").get(pk=volume.pk)
        existing = volume.snapshots.select_for_update().filter(name=name).first()
        if op is VolumeOp.SNAPSHOT:
            if existing is not None:
                raise Conflict(f"Volume {volume.name} already has a snapshot {name!r}; choose another name.")
        elif existing is None:
            raise NotFound(f"Volume {volume.name} has no snapshot {name!r}; its snapshots: {_names(volume)}.")
        elif existing.status != SnapshotStatus.AVAILABLE:
            raise Conflict(f"Snapshot {name!r} of volume {volume.name} is {existing.status}.")
        why = refusal(volume, op)
        if why:
            raise Conflict(why)
        volume.action_id = uuid.uuid4().hex
        volume.save(update_fields=["action_id", "updated_at"])
        if existing is None:
            snap = VolumeSnapshot.objects.create(tenant_id=volume.tenant_id, volume=volume, name=name)
        else:
            snap = existing
            snap.status = _WORKING[op]
            snap.save(update_fields=["status", "updated_at"])
        record(
            f"dispatch.volume.{op}",
            volume,
            tenant_id=volume.tenant_id,
            actor=user,
            outcome=Outcome.SUCCESS,
            message=f"snapshot {name} on {volume.node.name}",
            request_id=volume.action_id,
        )
        dispatch.send(volume.node.queue, VolumeRequest(str(volume.pk), op, volume.action_id, snapshot=name))
    return snap


def take(volume: Volume, name: str, user: Any) -> VolumeSnapshot:
    """Ask the node for snapshot ``name`` (``creating`` until it reports); 409 on a clash or busy volume."""
    return _request(volume, name, VolumeOp.SNAPSHOT, user)


def revert(volume: Volume, name: str, user: Any) -> VolumeSnapshot:
    """Return a detached volume to snapshot ``name`` (404 unknown, 409 attached or busy)."""
    return _request(volume, name, VolumeOp.REVERT, user)


def delete(volume: Volume, name: str, user: Any) -> VolumeSnapshot:
    """Delete snapshot ``name`` on the node; the row goes when the node reports it gone."""
    return _request(volume, name, VolumeOp.DELETE_SNAPSHOT, user)


def observe(obs: VolumeObservation) -> str:
    """Settle the volume's snapshot rows from its node's answer; a stale or repeated one changes nothing."""
    with transaction.atomic():
        volume = Volume.objects.select_for_update().filter(pk=obs.volume_id).first()
        if volume is None:
            return "unknown-volume"
        rows = {s.name: s for s in volume.snapshots.select_for_update()}
        working = any(s.status in SNAPSHOT_IN_FLIGHT for s in rows.values())
        if obs.action_id != volume.action_id or not working:
            return "stale"

        def found(name: str, info: SnapshotInfo) -> None:
            VolumeSnapshot.objects.create(
                tenant_id=volume.tenant_id,
                volume=volume,
                name=name,
                status=SnapshotStatus.AVAILABLE,
                status_reason="found on the node",
                size_bytes=info.size_bytes,
                taken_at=node_time(info.created_at),
            )

        settle(rows, obs.snapshots, obs.ok, found)
        if not obs.ok:
            volume.status_reason = f"{obs.op} failed: {obs.message}"[:255]
        elif volume.status_reason.startswith(tuple(f"{op} failed" for op in _WORKING)):
            volume.status_reason = ""
        volume.save(update_fields=["status_reason", "updated_at"])
        record(
            f"node.volume.{obs.op}",
            volume,
            tenant_id=volume.tenant_id,
            outcome=Outcome.SUCCESS if obs.ok else Outcome.FAILURE,
            message=obs.message or f"{obs.op} done on {obs.node}",
            request_id=volume.action_id,
        )
    return "applied"
