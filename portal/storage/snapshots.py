"""Snapshots of VM disks as resources: take, revert, delete, and keep the rows in step with the node.

Every path that asks a node for a snapshot action (the snapshot endpoints,
the instance actions endpoint, the pages) goes through here, so a row exists
for every snapshot the portal asked for, and a revert or delete of a snapshot
the portal does not list is refused before anything is sent.  The node is the
authority on what exists: its observation after each snapshot action carries
the instance's whole list (``Observation.snapshots``) and every heartbeat's
inventory carries the names, and :func:`sync` settles the rows from them.
Nothing the node lists is lost (an unknown snapshot gets a row); a row whose
snapshot the node no longer has is marked ``missing``, never silently dropped.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from django.db import transaction

from compute.spec import Action, SnapshotInfo
from portal.cloud import services, states
from portal.cloud.models import Instance
from portal.errors import Conflict, InvalidAction, NotFound
from portal.storage.choices import SNAPSHOT_IN_FLIGHT, SnapshotStatus
from portal.storage.models import Snapshot, VolumeSnapshot

#: the rows :func:`settle` settles: an instance's or a volume's snapshots
AnySnapshot = Snapshot | VolumeSnapshot


def _names(instance: Instance) -> str:
    names = list(instance.snapshots.exclude(status=SnapshotStatus.MISSING).values_list("name", flat=True))
    return ", ".join(names) if names else "none"


def revertible_names(instance: Instance) -> list[str]:
    """Names of the snapshots the instance's node has, newest first: the ones a revert may name.

    Not one still being taken, nor one the node lost.  One that is busy (being
    reverted to or deleted) is listed: the instance is busy too, and the refusal
    says so rather than calling the snapshot unknown.
    """
    rows = instance.snapshots.exclude(status__in=(SnapshotStatus.CREATING, SnapshotStatus.MISSING))
    return list(rows.order_by("-taken_at", "-created_at").values_list("name", flat=True))


def get(instance: Instance, name: str) -> Snapshot:
    """The instance's snapshot called ``name``, else SnapshotNotFound naming the ones it has."""
    snap = instance.snapshots.filter(name=name).first()
    if snap is None:
        raise NotFound(
            f"Instance {instance.name} has no snapshot {name!r}; its snapshots: {_names(instance)}."
        )
    return snap


def take(instance: Instance, name: str, user: Any) -> Snapshot:
    """Ask the node for a snapshot called ``name``; the row is ``creating`` until the node reports."""
    services.check(instance, Action.SNAPSHOT, {"name": name})
    with transaction.atomic():
        if instance.snapshots.filter(name=name).exists():
            raise Conflict(f"Instance {instance.name} already has a snapshot {name!r}; choose another name.")
        services.dispatch_action(instance, Action.SNAPSHOT, {"name": name}, user)
        return Snapshot.objects.create(tenant=instance.tenant, instance=instance, name=name)


def _act_on(instance: Instance, name: str, action: Action, status: SnapshotStatus, user: Any) -> Snapshot:
    services.check(instance, action, {"name": name})
    with transaction.atomic():
        snap = get(instance, name)
        if snap.status != SnapshotStatus.AVAILABLE:
            raise Conflict(f"Snapshot {name!r} of {instance.name} is {snap.status}; try again later.")
        services.dispatch_action(instance, action, {"name": name}, user)
        snap.status = status
        snap.save(update_fields=["status", "updated_at"])
    return snap


def revert(instance: Instance, name: str, user: Any) -> Snapshot:
    """Return the VM to snapshot ``name`` (404 if the portal lists no such snapshot, 409 if busy)."""
    return _act_on(instance, name, Action.REVERT, SnapshotStatus.REVERTING, user)


def delete(instance: Instance, name: str, user: Any) -> Snapshot:
    """Delete snapshot ``name`` on the node; the row goes when the node reports it gone."""
    return _act_on(instance, name, Action.DELETE_SNAPSHOT, SnapshotStatus.DELETING, user)


def act(instance: Instance, action: str, params: dict[str, Any], user: Any) -> Instance:
    """``services.act`` for the instance actions endpoint and pages, with snapshot and revert kept here."""
    if action in (Action.SNAPSHOT, Action.REVERT):
        why = states.missing_params(Action(action), params)
        if why:
            raise InvalidAction(why)
        name = str(params["name"]).strip()
        (take if action == Action.SNAPSHOT else revert)(instance, name, user)
        instance.refresh_from_db()
        return instance
    return services.act(instance, action, params, user)


def node_time(seconds: float) -> dt.datetime | None:
    """A node's clock reading (seconds since the epoch) as a time, None for 0 (unknown)."""
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC) if seconds > 0 else None


def sync(instance: Instance, listed: Iterable[SnapshotInfo] | None, ok: bool = True) -> None:
    """Settle the instance's snapshot rows from what its node reported (inside the caller's transaction).

    ``listed`` is the node's whole list (None: the node could not read it);
    ``ok`` whether the action that produced it succeeded.  Called with the
    instance row locked, after a snapshot action's observation and for every
    heartbeat in which the instance has no action in flight.
    """
    rows = {s.name: s for s in instance.snapshots.select_for_update()}

    def found(name: str, info: SnapshotInfo) -> None:
        Snapshot.objects.create(
            tenant_id=instance.tenant_id,
            instance=instance,
            name=name,
            status=SnapshotStatus.AVAILABLE,
            status_reason="found on the node",
            size_bytes=info.size_bytes,
            taken_at=node_time(info.created_at),
        )

    settle(rows, listed, ok, found)


def settle(
    rows: Mapping[str, AnySnapshot],
    listed: Iterable[SnapshotInfo] | None,
    ok: bool,
    found: Callable[[str, SnapshotInfo], None],
) -> None:
    """Settle snapshot rows (of an instance or a volume, locked by the caller) from the node's list.

    ``found`` makes the row of a snapshot the node has and the portal did not list.
    """
    if listed is None:
        _settle_blind(rows.values(), ok)
        return
    seen = {s.name: s for s in listed}
    for name, info in seen.items():
        snap = rows.get(name)
        if snap is None:
            found(name, info)
            continue
        snap.status, snap.status_reason = SnapshotStatus.AVAILABLE, ""
        snap.taken_at = node_time(info.created_at) or snap.taken_at
        if info.size_bytes:
            snap.size_bytes = info.size_bytes
        snap.save()
    for name, snap in rows.items():
        if name in seen:
            continue
        if snap.status in (SnapshotStatus.DELETING, SnapshotStatus.CREATING):
            snap.delete()  # deleted as asked, or never taken (the observation says why)
        elif snap.status != SnapshotStatus.MISSING:
            snap.status, snap.status_reason = SnapshotStatus.MISSING, "the node no longer has it"
            snap.save(update_fields=["status", "status_reason", "updated_at"])


def out_of_step(listed: Mapping[str, Iterable[SnapshotInfo]]) -> list[str]:
    """Ids of the instances whose snapshot rows :func:`sync` would change, read in one query.

    ``listed`` maps instance ids to their node's whole list.  Reconcile locks
    and syncs only these, so a heartbeat where nothing changed writes nothing.
    """
    if not listed:
        return []
    rows: dict[str, dict[str, Snapshot]] = {iid: {} for iid in listed}
    for snap in Snapshot.objects.filter(instance_id__in=list(listed)):
        rows[str(snap.instance_id)][snap.name] = snap
    return [iid for iid, infos in listed.items() if _differs(rows[iid], {i.name: i for i in infos})]


def _differs(rows: Mapping[str, Snapshot], seen: Mapping[str, SnapshotInfo]) -> bool:
    for name, info in seen.items():
        snap = rows.get(name)
        if snap is None or snap.status != SnapshotStatus.AVAILABLE or snap.status_reason:
            return True
        taken = node_time(info.created_at)
        if (taken is not None and snap.taken_at != taken) or (
            info.size_bytes and snap.size_bytes != info.size_bytes
        ):
            return True
    return any(snap.status != SnapshotStatus.MISSING for name, snap in rows.items() if name not in seen)


def _settle_blind(rows: Iterable[AnySnapshot], ok: bool) -> None:
    """Without the node's list: trust the action's outcome."""
    for snap in rows:
        if snap.status not in SNAPSHOT_IN_FLIGHT:
            continue
        gone = snap.status == (SnapshotStatus.DELETING if ok else SnapshotStatus.CREATING)
        if gone:
            snap.delete()
        else:
            snap.status = SnapshotStatus.AVAILABLE
            snap.save(update_fields=["status", "updated_at"])
