"""Backups of volumes into the portal's content-addressed store, their policy, retention and restore.

A backup is a move's first half (``portal/storage/moves.py``): the volume's
node exports it as a standalone qcow2 and PUTs it with a one-backup token to
``/api/v1/volumes/<id>/content``; the portal stores it as a
:class:`~portal.images.models.Blob` (the images' store: identical contents
are one file) and the node's observation must carry the same digest.  The
volume is ``backing-up`` meanwhile (detached only: a file system nobody
writes is a consistent copy), then ``available`` again.

**Policy**: ``BackupPolicy`` (every ``interval_hours``, keep ``retention``);
beat's ``portal.storage.backups`` task (:func:`tick`) starts every due one;
a volume that is attached or busy is skipped with the reason in
``last_result`` and tried again at the next tick.  After each backup the
oldest beyond ``retention`` are deleted, with their blobs unless another
backup, an image or a move still references them.

**Restore** makes a new volume of the tenant (quota and node checked as a
create) whose node fetches the blob with its node key, verifies the digest
and makes the volume from it (``receive``).

**A VM's root disk** (:func:`start_instance`) is backed up the same way: the
stopped VM is claimed (``task_state`` ``backing_up``), its node flattens the
disk with the cold migration's ``send_disk`` and PUTs it with a one-backup
token to ``/api/v1/instances/<id>/backup-content``; the same
:func:`accept_content` stores it and :func:`observe_instance_send` settles it
from the ``send_disk`` observation.  Such a backup is a qcow2 restored by the
same :func:`restore` into a new volume.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import IO, Any

from django.conf import settings
from django.core import signing
from django.db import transaction
from django.utils import timezone

from compute.spec import (
    Action,
    Kind,
    Observation,
    SendDisk,
    VolumeFormat,
    VolumeObservation,
    VolumeOp,
    VolumeRequest,
)
from portal.audit.log import record
from portal.audit.models import Outcome
from portal.cloud import deadlines, dispatch
from portal.cloud.choices import TaskState, VmState
from portal.cloud.models import ComputeNode, Instance
from portal.errors import Conflict
from portal.images import imports
from portal.images import services as image_services
from portal.images.models import Blob
from portal.storage import moves, volumes
from portal.storage.choices import BackupStatus, VolumeStatus
from portal.storage.models import Backup, BackupPolicy, Volume

log = logging.getLogger(__name__)


def start(volume: Volume, user: Any, scheduled: bool = False) -> Backup:
    """Claim the detached volume (``backing-up``) and ask its node to send its content; 409 otherwise."""
    if volume.instance_id is not None:
        raise Conflict(
            f"Volume {volume.name} is attached; detach it first (a backup copies a detached volume, so "
            "its file system is consistent)."
        )
    with transaction.atomic():
        action_id = uuid.uuid4().hex
        claimed = Volume.objects.filter(
            pk=volume.pk, status=VolumeStatus.AVAILABLE, instance__isnull=True
        ).update(status=VolumeStatus.BACKING_UP, action_id=action_id, updated_at=timezone.now())
        volume.refresh_from_db()
        if not claimed:
            raise Conflict(
                f"Cannot back up volume {volume.name} while it is {volume.status}; try again later."
            )
        backup = Backup.objects.create(
            tenant_id=volume.tenant_id,
            volume=volume,
            volume_name=volume.name,
            format=volume.format,
            size_gb=volume.size_gb,
            scheduled=scheduled,
            action_id=action_id,
        )
        what = "scheduled backup" if scheduled else "backup"
        volumes._event(volume, "dispatch.volume.backup", f"{what} {backup.pk} on {volume.node.name}", user)
        token = moves.transfer_token(volume, backup=str(backup.pk))
        dispatch.send(
            volume.node.queue,
            VolumeRequest(
                str(volume.pk),
                VolumeOp.SEND,
                action_id,
                upload_url=f"{settings.SKYPORT_PORTAL_URL}/api/v1/volumes/{volume.pk}/content",
                upload_token=token,
            ),
        )
    return backup


def accept_content(backup_id: str, action_id: str, stream: IO[bytes], length: int | None) -> tuple[str, int]:
    """Store a backup's content as a blob (deduplicated by digest); returns (digest, size)."""
    waiting = Backup.objects.filter(pk=backup_id, action_id=action_id, status=BackupStatus.CREATING)
    if not waiting.exists():
        raise Conflict(f"Backup {backup_id} is not waiting for content.")
    s = image_services.store()
    path, digest, size = imports.receive(stream, length, into=s)
    with s.locked(), transaction.atomic():
        s.place(path, digest)
        blob, _ = Blob.objects.get_or_create(
            digest=digest, defaults={"size": size, "media_type": moves.MEDIA_TYPE}
        )
        s.touch(digest)
        recorded = waiting.update(blob=blob, size_bytes=size)
    if not recorded:
        moves.release_blob(digest)
        raise Conflict(f"Backup {backup_id} is not waiting for content.")
    return digest, size


def observe_send(obs: VolumeObservation) -> str:
    """Settle a backup from its node's observation: available when the digests agree, else error."""
    released: list[str] = []
    with transaction.atomic():
        volume = Volume.objects.select_for_update().filter(pk=obs.volume_id).first()
        backup = Backup.objects.select_for_update().filter(action_id=obs.action_id).first()
        if volume is None or backup is None or volume.action_id != obs.action_id:
            return "stale"
        if volume.status != VolumeStatus.BACKING_UP or backup.status != BackupStatus.CREATING:
            return "stale"
        volume.status = VolumeStatus.AVAILABLE
        volume.save(update_fields=["status", "updated_at"])
        held = backup.blob_id or ""
        if _conclude(backup, obs.ok, obs.digest, obs.message):
            volumes._event(
                volume, "node.volume.backup", f"backup {backup.pk}: {backup.size_bytes} bytes {held}"
            )
            released = _retain(volume)
        else:
            if held:
                released.append(held)
            volumes._event(volume, "node.volume.backup", backup.status_reason, outcome=Outcome.FAILURE)
    for digest in released:
        moves.release_blob(digest)
    return "applied"


def _conclude(backup: Backup, ok: bool, digest: str, message: str) -> bool:
    """Mark the backup available when the node's digest is the stored blob's, else error; True if it is."""
    held = backup.blob_id or ""
    if ok and digest and digest == held:
        backup.status, backup.finished_at = BackupStatus.AVAILABLE, timezone.now()
        backup.save()
        return True
    why = (
        message if not ok else f"the node sent {digest or 'no digest'}, the portal holds {held or 'nothing'}"
    )
    backup.status, backup.status_reason = BackupStatus.ERROR, f"backup failed: {why}"[:255]
    backup.finished_at, backup.blob = timezone.now(), None
    backup.save()
    return False


def _retain(source: Volume | Instance) -> list[str]:
    """Delete the source's backups beyond its policy's retention (oldest first); returns their digests."""
    field = "volume" if isinstance(source, Volume) else "instance"
    policy = BackupPolicy.objects.filter(**{field: source}).first()
    if policy is None:
        return []
    kept = Backup.objects.filter(**{field: source}, status=BackupStatus.AVAILABLE).order_by("-created_at")
    old = list(kept[policy.retention :])
    digests = [b.blob_id for b in old if b.blob_id]
    for b in old:
        what = f"backup {b.pk} of {b.created_at:%Y-%m-%d %H:%M} (retention)"
        if isinstance(source, Volume):
            volumes._event(source, "volume.backup.expire", what)
        else:
            record("instance.backup.expire", source, actor_name="portal", message=what)
    Backup.objects.filter(pk__in=[b.pk for b in old]).delete()
    return digests


def delete(backup: Backup) -> None:
    """Delete a backup (not one still being made) and its blob unless something else references it."""
    if backup.status == BackupStatus.CREATING:
        raise Conflict("The backup is still being made; delete it when it is available.")
    digest = backup.blob_id or ""
    backup.delete()
    moves.release_blob(digest)


def restore(backup: Backup, name: str, node: ComputeNode | None, user: Any) -> Volume:
    """A new volume of the backup's tenant made from it (quota and node checked as a create)."""
    if backup.status != BackupStatus.AVAILABLE or backup.blob_id is None:
        raise Conflict(f"Backup {backup.pk} is {backup.status}; only an available backup can be restored.")
    source = (f"{settings.SKYPORT_PORTAL_URL}/api/v1/blobs/{backup.blob_id}", backup.blob_id)
    return volumes.create(
        backup.tenant, name, backup.size_gb, node, user, VolumeFormat(backup.format), source=source
    )


def set_policy(source: Volume | Instance, interval_hours: int, retention: int) -> BackupPolicy:
    """Set the scheduled backups of a volume or of a VM's root disk."""
    if isinstance(source, Instance) and source.kind != Kind.VM:
        raise Conflict(
            f"Instance {source.name} is a container: its data lives in its volumes; give those a policy."
        )
    lookup: dict[str, Any] = {"volume" if isinstance(source, Volume) else "instance": source}
    policy, _ = BackupPolicy.objects.update_or_create(
        **lookup, defaults={"interval_hours": interval_hours, "retention": retention}
    )
    return policy


def due(now: dt.datetime | None = None) -> list[BackupPolicy]:
    """Policies whose newest backup (made or being made) is older than their interval."""
    now = now or timezone.now()
    out = []
    policies = (
        BackupPolicy.objects.select_related("volume", "instance", "instance__node")
        .exclude(volume__status=VolumeStatus.DELETED)
        .exclude(instance__deleted_at__isnull=False)
    )
    for policy in policies:
        source: dict[str, Any] = (
            {"volume": policy.volume_id} if policy.volume_id else {"instance": policy.instance_id}
        )
        newest = (
            Backup.objects.filter(**source)
            .exclude(status=BackupStatus.ERROR)
            .order_by("-created_at")
            .values_list("created_at", flat=True)
            .first()
        )
        if newest is None or newest + dt.timedelta(hours=policy.interval_hours) <= now:
            out.append(policy)
    return out


def tick(now: dt.datetime | None = None) -> dict[str, int]:
    """Start every due backup (beat); a volume that cannot be backed up now is tried at the next tick."""
    started = skipped = 0
    for policy in due(now):
        try:
            if policy.volume is not None:
                start(policy.volume, None, scheduled=True)
            else:
                assert policy.instance is not None
                start_instance(policy.instance, None, scheduled=True)
        except Conflict as exc:
            skipped += 1
            BackupPolicy.objects.filter(pk=policy.pk).update(last_result=f"skipped: {exc}"[:255])
            continue
        started += 1
        BackupPolicy.objects.filter(pk=policy.pk).update(
            last_result=f"started at {timezone.now():%Y-%m-%d %H:%M}"
        )
    return {"started": started, "skipped": skipped}


# -- a VM's root disk ---------------------------------------------------------------------------

INSTANCE_SALT = "skyport.storage.instance-backup"


def instance_token(inst: Instance, backup_id: str) -> str:
    """Lets the node PUT the flattened disk of this one instance for this one backup, for a day."""
    data = {"instance": str(inst.pk), "action": inst.action_id, "backup": backup_id}
    return signing.dumps(data, salt=INSTANCE_SALT)


def read_instance_token(token: str, max_age: int = 86400) -> tuple[str, str, str] | None:
    """(instance id, action id, backup id) of a valid token, else None."""
    try:
        data = signing.loads(token, salt=INSTANCE_SALT, max_age=max_age)
    except signing.BadSignature:
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("instance", "backup")):
        return None
    return data["instance"], str(data.get("action", "")), data["backup"]


def _instance_event(inst: Instance, message: str, user: Any = None, ok: bool = True) -> None:
    record(
        "instance.backup",
        inst,
        actor=user,
        actor_name="portal",
        outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
        message=message[:1000],
        request_id=inst.action_id,
    )


def start_instance(inst: Instance, user: Any, scheduled: bool = False) -> Backup:
    """Claim the stopped VM (``backing_up``) and ask its node to send its flattened disk; 409 otherwise."""
    if inst.kind != Kind.VM:
        raise Conflict(
            f"Instance {inst.name} is a container: its data lives in its volumes; back those up instead."
        )
    if inst.vm_state != VmState.STOPPED or inst.node is None:
        raise Conflict(
            f"Instance {inst.name} is {inst.vm_state}; stop it first (a backup copies a stopped VM's "
            "disk, so its file system is consistent)."
        )
    with transaction.atomic():
        action_id = uuid.uuid4().hex
        seconds = deadlines.deadline_seconds(TaskState.BACKING_UP)
        claimed = Instance.objects.filter(
            pk=inst.pk, task_state__isnull=True, vm_state=VmState.STOPPED, deleted_at__isnull=True
        ).update(
            task_state=TaskState.BACKING_UP,
            action_id=action_id,
            task_deadline=timezone.now() + dt.timedelta(seconds=seconds),
            updated_at=timezone.now(),
        )
        inst.refresh_from_db()
        if not claimed:
            busy = f"busy ({inst.task_state})" if inst.task_state else inst.vm_state
            raise Conflict(f"Cannot back up instance {inst.name} while it is {busy}; try again later.")
        assert inst.node is not None
        backup = Backup.objects.create(
            tenant_id=inst.tenant_id,
            instance=inst,
            volume_name=inst.name,
            format=VolumeFormat.QCOW2,
            size_gb=max(1, inst.disk_gb),
            scheduled=scheduled,
            action_id=action_id,
        )
        what = "scheduled backup" if scheduled else "backup"
        _instance_event(inst, f"{what} {backup.pk} of its disk on {inst.node.name}", user)
        url = f"{settings.SKYPORT_PORTAL_URL}/api/v1/instances/{inst.pk}/backup-content"
        token = instance_token(inst, str(backup.pk))
        dispatch.send(inst.node.queue, SendDisk(str(inst.pk), action_id, url, token))
    return backup


def observe_instance_send(inst: Instance, obs: Observation) -> str | None:
    """The ``send_disk`` observation of a VM backup (inside ``apply_observation``, the row locked).

    None when it is not one.  The instance is free again whatever happened;
    a blob the failed backup held is released after commit.
    """
    if inst.task_state != TaskState.BACKING_UP or obs.action_id != inst.action_id:
        return None
    if obs.action != Action.SEND_DISK:
        return None
    inst.task_state, inst.task_deadline = None, None
    inst.power_state = obs.power_state
    inst.save(update_fields=["task_state", "task_deadline", "power_state", "updated_at"])
    backup = Backup.objects.select_for_update().filter(action_id=obs.action_id, instance=inst).first()
    if backup is None or backup.status != BackupStatus.CREATING:
        return "stale"
    held = backup.blob_id or ""
    digest = dict(obs.details).get("digest", "")
    if _conclude(backup, obs.ok, digest, obs.message):
        _instance_event(inst, f"backup {backup.pk}: {backup.size_bytes} bytes {held}")
        for gone in _retain(inst):
            transaction.on_commit(lambda d=gone: moves.release_blob(d))  # type: ignore[misc]
        return "backup"
    if held:
        transaction.on_commit(lambda: moves.release_blob(held))
    _instance_event(inst, backup.status_reason, ok=False)
    return "backup-failed"


def instance_timed_out(inst: Instance) -> bool:
    """The sweeper found a VM backup past its deadline: the backup fails, the VM stays stopped."""
    if inst.task_state != TaskState.BACKING_UP:
        return False
    inst.task_state, inst.task_deadline = None, None
    inst.save(update_fields=["task_state", "task_deadline", "updated_at"])
    node = inst.node.name if inst.node else "-"
    for backup in Backup.objects.select_for_update().filter(
        instance=inst, action_id=inst.action_id, status=BackupStatus.CREATING
    ):
        held = backup.blob_id or ""
        _conclude(backup, False, "", f"node {node} did not send the disk in time")
        if held:
            transaction.on_commit(lambda d=held: moves.release_blob(d))  # type: ignore[misc]
        _instance_event(inst, backup.status_reason, ok=False)
    return True
