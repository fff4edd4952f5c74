"""Moving a detached volume to another node by copy, through the portal (nodes open no ports).

1. :func:`move` checks the target (up, another node, one the tenant could
   create this volume on), claims the volume ``available`` → ``moving`` with
   a conditional UPDATE and asks the source node to **send** it: export a
   standalone qcow2 and PUT it to ``/api/v1/volumes/<id>/content`` with a
   token good for this one move (:func:`transfer_token`).
2. :func:`accept_content` streams the body into the content-addressed store
   (the images' :class:`~portal.images.store.BlobStore`, deduplicated by
   digest) and records the digest it computed on the volume.
3. The source's observation must carry the same digest; then the target
   node is asked to **receive** it: fetch the blob with its node key, verify
   the digest, make the volume (qcow2, or the sparse ext4 file again).
4. Only when the target reports the digest matched does the volume belong
   to the target (``available`` there); the source is then asked to **drop**
   its copy, and the transfer blob is removed unless something else holds it.

A failure anywhere (export, upload, digest, download, conversion) leaves the
volume ``available`` on the source, untouched, with the reason.  Both nodes
report progress (bytes of the qcow2 done / total, at most once a second:
``compute/transfer.py``), shown in the API as ``move``.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import IO, Any

from django.conf import settings
from django.core import signing
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from compute.spec import VolumeFormat, VolumeObservation, VolumeOp, VolumeProgress, VolumeRequest
from portal.audit.models import Outcome
from portal.cloud import dispatch
from portal.cloud.choices import NodeStatus, NodeTenancy
from portal.cloud.models import ComputeNode
from portal.errors import Conflict
from portal.images import imports
from portal.images import services as image_services
from portal.images.models import Blob
from portal.storage.choices import VolumeStatus
from portal.storage.models import Backup, Volume
from portal.storage.volumes import _event

log = logging.getLogger(__name__)

TRANSFER_SALT = "skyport.storage.volume-transfer"
MEDIA_TYPE = "application/vnd.skyport.volume.qcow2"


def transfer_token(volume: Volume, backup: str = "") -> str:
    """Lets the node PUT the content of this one volume for its current action (a move, or the
    backup ``backup``), for a day."""
    data = {"volume": str(volume.pk), "action": volume.action_id, "backup": backup}
    return signing.dumps(data, salt=TRANSFER_SALT)


def read_token(token: str, max_age: int = 86400) -> tuple[str, str, str] | None:
    """(volume id, action id, backup id or "") of a valid token, else None."""
    try:
        data = signing.loads(token, salt=TRANSFER_SALT, max_age=max_age)
    except signing.BadSignature:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("volume"), str):
        return None
    return data["volume"], str(data.get("action", "")), str(data.get("backup", ""))


def check_target(volume: Volume, node: ComputeNode) -> None:
    """The rules of a move's target (409 with the reason): the same ones as a create on that node."""
    if node.pk == volume.node_id:
        raise Conflict(f"Volume {volume.name} is on node {node.name} already.")
    if node.status != NodeStatus.UP:
        raise Conflict(f"Node {node.name} is {node.status}; move the volume to a node that is up.")
    if node.tenancy == NodeTenancy.DEDICATED and node.owner_id != volume.tenant_id:
        raise Conflict(f"Node {node.name} is dedicated to another tenant; choose another node.")
    if volume.format == VolumeFormat.EXT4 and node.owner_id != volume.tenant_id:
        raise Conflict(
            f"Node {node.name} is not dedicated to tenant {volume.tenant.slug}: ext4 volumes are for "
            "containers, which run only on the tenant's dedicated nodes; choose one of those."
        )


def move(volume: Volume, node: ComputeNode, user: Any) -> Volume:
    """Start copying a detached volume to ``node``; 202 ``moving``, 409 when it cannot be moved."""
    if volume.instance_id is not None:
        raise Conflict(f"Volume {volume.name} is attached; detach it before moving it.")
    check_target(volume, node)
    with transaction.atomic():
        claimed = Volume.objects.filter(
            pk=volume.pk, status=VolumeStatus.AVAILABLE, instance__isnull=True
        ).update(
            status=VolumeStatus.MOVING,
            status_reason="",
            action_id=_new_action(),
            move_node=node,
            move_phase=VolumeOp.SEND,
            move_done=0,
            move_total=0,
            move_digest="",
            updated_at=timezone.now(),
        )
        volume.refresh_from_db()
        if not claimed:
            raise Conflict(f"Cannot move volume {volume.name} while it is {volume.status}; try again later.")
        _event(volume, "dispatch.volume.move", f"from {volume.node.name} to {node.name}", user)
        url = f"{settings.SKYPORT_PORTAL_URL}/api/v1/volumes/{volume.pk}/content"
        dispatch.send(
            volume.node.queue,
            VolumeRequest(
                str(volume.pk),
                VolumeOp.SEND,
                volume.action_id,
                upload_url=url,
                upload_token=transfer_token(volume),
            ),
        )
    return volume


def _new_action() -> str:
    return uuid.uuid4().hex


def accept_content(volume_id: str, action_id: str, stream: IO[bytes], length: int | None) -> tuple[str, int]:
    """Store a moving volume's content (streamed) as a blob; returns (digest, size).

    Raises :class:`portal.images.services.UploadError` for a bad body and
    :class:`Conflict` when the volume is not waiting for this content.
    """
    if not _waiting(volume_id, action_id):
        raise Conflict(f"Volume {volume_id} is not waiting for this content (its move ended).")
    s = image_services.store()
    path, digest, size = imports.receive(stream, length, into=s)
    with s.locked(), transaction.atomic():
        s.place(path, digest)
        Blob.objects.get_or_create(digest=digest, defaults={"size": size, "media_type": MEDIA_TYPE})
        recorded = Volume.objects.filter(
            pk=volume_id, action_id=action_id, status=VolumeStatus.MOVING, move_phase=VolumeOp.SEND
        ).update(move_digest=digest, updated_at=timezone.now())
    if not recorded:
        release_blob(digest)
        raise Conflict(f"Volume {volume_id} is not waiting for this content (its move ended).")
    return digest, size


def _waiting(volume_id: str, action_id: str) -> bool:
    return Volume.objects.filter(
        pk=volume_id, action_id=action_id, status=VolumeStatus.MOVING, move_phase=VolumeOp.SEND
    ).exists()


def held_digests() -> set[str]:
    """Blobs the storage app holds (moves under way, backups): the images' garbage collection keeps them."""
    moving = Volume.objects.exclude(move_digest="").values_list("move_digest", flat=True)
    backed = Backup.objects.filter(blob__isnull=False).values_list("blob_id", flat=True)
    return {*moving, *backed}


def release_blob(digest: str) -> None:
    """Remove a transfer blob unless an image artifact or another holder still references it."""
    if not digest:
        return
    s = image_services.store()
    with s.locked(), transaction.atomic():
        if digest in held_digests():
            return
        unused = Blob.objects.filter(digest=digest).annotate(n=Count("artifacts")).filter(n=0)
        if unused.delete()[0]:
            transaction.on_commit(lambda: s.remove(digest))


def progress(p: VolumeProgress) -> bool:
    """Record how far a node is (a late message of an earlier phase changes nothing)."""
    return bool(
        Volume.objects.filter(
            pk=p.volume_id, action_id=p.action_id, status=VolumeStatus.MOVING, move_phase=p.phase
        ).update(move_done=max(0, p.done), move_total=max(0, p.total))
    )


def observe(obs: VolumeObservation) -> str:
    """Settle a move's step from a node's observation; a stale or repeated one changes nothing."""
    if obs.op is VolumeOp.DROP:
        volume = Volume.objects.filter(pk=obs.volume_id).first()
        if volume is not None:
            outcome = Outcome.SUCCESS if obs.ok else Outcome.FAILURE
            what = "dropped the source copy" if obs.ok else f"could not drop the source copy: {obs.message}"
            _event(volume, "node.volume.drop", f"{obs.node} {what}", outcome=outcome)
        return "dropped" if obs.ok else "drop-failed"
    release = ""
    with transaction.atomic():
        volume = (
            Volume.objects.select_for_update(of=("self",))
            .select_related("node", "move_node")
            .filter(pk=obs.volume_id)
            .first()
        )
        if volume is None:
            return "unknown-volume"
        expected_node = volume.node if obs.op is VolumeOp.SEND else volume.move_node
        if (
            obs.action_id != volume.action_id
            or volume.status != VolumeStatus.MOVING
            or volume.move_phase != obs.op
            or expected_node is None
            or obs.node != expected_node.name
        ):
            return "stale"
        target = volume.move_node
        assert target is not None
        if obs.ok and obs.digest != volume.move_digest:
            what = "sent" if obs.op is VolumeOp.SEND else "received"
            obs = _failed(obs, f"the node {what} {obs.digest or 'nothing'}, the portal holds "
                          f"{volume.move_digest or 'nothing'}")  # fmt: skip
        if not obs.ok:
            release = volume.move_digest
            why = f"move to {target.name} failed ({obs.op} on {obs.node}): {obs.message}"
            _end(volume, why[:255])
            _event(volume, "node.volume.move", why, outcome=Outcome.FAILURE)
            # a failed receive cleaned up after itself; the source copy was never touched
        elif obs.op is VolumeOp.SEND:
            volume.move_phase, volume.move_done, volume.move_total = VolumeOp.RECEIVE, 0, obs.size_bytes
            volume.save()
            _event(volume, "node.volume.send", f"{obs.node} sent {obs.size_bytes} bytes ({obs.digest})")
            dispatch.send(
                target.queue,
                VolumeRequest(
                    str(volume.pk),
                    VolumeOp.RECEIVE,
                    volume.action_id,
                    format=VolumeFormat(volume.format),
                    blob_url=f"{settings.SKYPORT_PORTAL_URL}/api/v1/blobs/{volume.move_digest}",
                    digest=volume.move_digest,
                ),
            )
        else:
            source, origin = volume.node, volume.origin_action
            release = volume.move_digest
            volume.node, volume.origin_action = target, volume.action_id
            _end(volume, "")
            _event(
                volume,
                "node.volume.move",
                f"on {target.name}, digest verified; dropping the copy on {source.name}",
            )
            drop = VolumeRequest(str(volume.pk), VolumeOp.DROP, volume.action_id, origin=origin)
            dispatch.send(source.queue, drop)
    if release:
        transaction.on_commit(lambda: release_blob(release))
    return "applied"


def _failed(obs: VolumeObservation, why: str) -> VolumeObservation:
    return dataclasses.replace(obs, ok=False, message=why)


def _end(volume: Volume, reason: str) -> None:
    volume.status, volume.status_reason = VolumeStatus.AVAILABLE, reason
    volume.move_node, volume.move_phase, volume.move_done, volume.move_total = None, "", 0, 0
    volume.move_digest = ""
    volume.save()
