"""Volumes: create, attach, detach, extend and delete, each settled by the node's observation.

A volume is a file on one node (``compute/volumes.py``): a ``qcow2`` disk
that attaches to a VM on that node, or an ``ext4`` file system (owned by the
tenant's container root, ``Tenant.id_base``) that a stopped container of
the tenant on that node mounts at a ``mount_path``.  Every request claims
the volume row with a conditional UPDATE (its status must allow it), records ``action_id`` and
sends a :class:`compute.spec.VolumeRequest` after commit; the node's
:class:`compute.spec.VolumeObservation` settles it (:func:`observe`).  A
failed attach leaves the volume ``available`` and the instance untouched (the
driver changes the VM's definition only when the live attach worked).
Quota: the count of live volumes and their total size in GB, checked with
the tenant's quota row locked, as instance creates do.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db import transaction
from django.db.models import Count, Sum
from django.utils import timezone

from compute.mountpath import MountPathError, check_mount_path, overlaps
from compute.spec import (
    VOLUME_SNAPSHOT_OPS,
    Capability,
    Kind,
    VolumeFormat,
    VolumeObservation,
    VolumeOp,
    VolumeRequest,
)
from portal.audit.log import record
from portal.audit.models import Outcome
from portal.cloud import dispatch
from portal.cloud.choices import NodeStatus, NodeTenancy, VmState
from portal.cloud.models import ComputeNode, Instance
from portal.errors import Conflict, DomainError, InvalidAction, NotFound, QuotaExceeded
from portal.metering import resources as metering
from portal.storage import volume_snapshots
from portal.storage.choices import SNAPSHOT_IN_FLIGHT, VolumeStatus
from portal.storage.models import Volume
from portal.tenancy.models import Quota, Tenant

#: what each request needs the volume to be, and what it is while the node works
_CLAIMS: dict[VolumeOp, tuple[tuple[str, ...], VolumeStatus]] = {
    VolumeOp.ATTACH: ((VolumeStatus.AVAILABLE,), VolumeStatus.ATTACHING),
    VolumeOp.DETACH: ((VolumeStatus.IN_USE,), VolumeStatus.DETACHING),
    VolumeOp.GROW: ((VolumeStatus.AVAILABLE,), VolumeStatus.EXTENDING),
    VolumeOp.DELETE: ((VolumeStatus.AVAILABLE, VolumeStatus.ERROR), VolumeStatus.DELETING),
}
#: instance states a volume may be attached or detached in
_ATTACHABLE = (VmState.ACTIVE, VmState.STOPPED, VmState.PAUSED)


_WHAT_TAKES = {
    VolumeFormat.EXT4: "containers mount ext4 volumes",
    VolumeFormat.QCOW2: "VMs take qcow2 volumes",
}


class InvalidMountPath(DomainError):
    """A container mount path the rules refuse (answered with 400)."""

    code = "invalid_mount_path"


def usage(tenant_id: int) -> dict[str, int]:
    """The tenant's live volumes: how many and their total size in GB."""
    agg = (
        Volume.objects.live()
        .filter(tenant_id=tenant_id)
        .aggregate(volumes=Count("id"), volume_gb=Sum("size_gb"))
    )
    return {k: int(v or 0) for k, v in agg.items()}


def _check_quota(tenant: Tenant, volumes: int, gb: int) -> None:
    quota = Quota.objects.select_for_update().get(tenant=tenant)
    used = usage(tenant.pk)
    for limit, asked in (("volumes", volumes), ("volume_gb", gb)):
        if used[limit] + asked > getattr(quota, limit):
            raise QuotaExceeded(
                f"Quota exceeded for {limit}: tenant {tenant.slug} uses {used[limit]} of "
                f"{getattr(quota, limit)} and this volume needs {asked} more."
            )


def _send(volume: Volume, op: VolumeOp, **kw: Any) -> None:
    dispatch.send(volume.node.queue, VolumeRequest(str(volume.pk), op, volume.action_id, **kw))


def _event(
    volume: Volume, action: str, message: str, user: Any = None, outcome: str = Outcome.SUCCESS
) -> None:
    record(
        action,
        volume,
        tenant_id=volume.tenant_id,
        actor=user,
        outcome=outcome,
        message=message,
        request_id=volume.action_id,
    )


def default_node(tenant: Tenant, fmt: VolumeFormat = VolumeFormat.QCOW2) -> ComputeNode:
    """Where a volume goes when the tenant names no node: most disk first, an up node it may run VMs
    on (qcow2) or one dedicated to it, where its containers run (ext4)."""
    for candidate in ComputeNode.objects.filter(status=NodeStatus.UP).order_by("-disk_gb", "name"):
        if candidate.owner_id == tenant.pk or (
            fmt is VolumeFormat.QCOW2 and candidate.tenancy == NodeTenancy.SHARED
        ):
            return candidate
    if fmt is VolumeFormat.EXT4:
        raise Conflict(
            f"No node dedicated to tenant {tenant.slug} is up: ext4 volumes are for containers, which run "
            "only on a tenant's dedicated nodes; ask an operator for one, or create a qcow2 volume for VMs."
        )
    raise Conflict("No compute node is up to hold the volume; try again later or name a node.")


def create(
    tenant: Tenant,
    name: str,
    size_gb: int,
    node: ComputeNode | None,
    user: Any,
    fmt: VolumeFormat = VolumeFormat.QCOW2,
    source: tuple[str, str] | None = None,
) -> Volume:
    """Write the volume row (``creating``) and ask its node for the file: empty, or made from the
    blob ``source`` (URL, digest: a backup's restore)."""
    node = node or default_node(tenant, fmt)
    if node.tenancy == NodeTenancy.DEDICATED and node.owner_id != tenant.pk:
        raise Conflict(f"Node {node.name} is dedicated to another tenant; choose another node.")
    if fmt is VolumeFormat.EXT4 and node.owner_id != tenant.pk:
        raise Conflict(
            f"Node {node.name} is not dedicated to tenant {tenant.slug}: ext4 volumes are for containers, "
            "which run only on the tenant's dedicated nodes; choose one of those."
        )
    id_base = 0
    if fmt is VolumeFormat.EXT4:
        try:
            id_base = tenant.id_base
        except ValueError as exc:
            raise Conflict(str(exc)) from exc
    with transaction.atomic():
        _check_quota(tenant, 1, size_gb)
        if Volume.objects.live().filter(tenant=tenant, name=name).exists():
            raise Conflict(f"Tenant {tenant.slug} already has a volume named {name!r}.")
        action_id = uuid.uuid4().hex
        volume = Volume.objects.create(
            tenant=tenant,
            name=name,
            size_gb=size_gb,
            format=fmt,
            node=node,
            created_by=user,
            action_id=action_id,
            origin_action=action_id,  # the node stamps its copy with it (a move's drop checks it)
        )
        if source is None:
            _event(volume, "dispatch.volume.create", f"{size_gb} GB {fmt} on {node.name}", user)
            _send(volume, VolumeOp.CREATE, size_gb=size_gb, format=fmt, id_base=id_base)
        else:
            _event(
                volume, "dispatch.volume.restore", f"{size_gb} GB {fmt} on {node.name} from {source[1]}", user
            )
            _send(volume, VolumeOp.RECEIVE, format=fmt, blob_url=source[0], digest=source[1])
    return volume


def _claim(volume: Volume, op: VolumeOp, **fields: Any) -> Volume:
    """Move the volume to the op's working status if its status allows it (conditional UPDATE), else 409."""
    allowed, working = _CLAIMS[op]
    action_id = uuid.uuid4().hex
    busy = Volume.objects.filter(pk=volume.pk, snapshots__status__in=SNAPSHOT_IN_FLIGHT)
    claimed = (
        Volume.objects.filter(pk=volume.pk, status__in=allowed)
        .exclude(pk__in=busy)
        .update(status=working, action_id=action_id, status_reason="", updated_at=timezone.now(), **fields)
    )
    volume.refresh_from_db()
    if not claimed and volume.status in allowed:
        raise Conflict(f"A snapshot of volume {volume.name} is in progress; try again when it finishes.")
    if not claimed:
        hint = {
            VolumeOp.DELETE: "detach it first" if volume.status == VolumeStatus.IN_USE else "try again later",
            VolumeOp.ATTACH: "detach it first" if volume.status == VolumeStatus.IN_USE else "try again later",
        }.get(op, "try again later")
        raise Conflict(f"Cannot {op} volume {volume.name} while it is {volume.status}; {hint}.")
    return volume


def container_mount_path(volume: Volume, instance: Instance, mount_path: str | None) -> str:
    """The checked mount path of an attach to ``instance`` ("" for a VM); 400 when it is refused."""
    if instance.kind != Kind.CONTAINER:
        if mount_path:
            raise InvalidMountPath(f"mount_path applies to containers only; {instance.name} is a VM.")
        return ""
    if not mount_path:
        raise InvalidMountPath(f"Attaching to container {instance.name} needs a mount_path such as /data.")
    try:
        path = check_mount_path(mount_path)
    except MountPathError as exc:
        raise InvalidMountPath(f"{exc}.") from exc
    others = Volume.objects.live().filter(instance=instance).exclude(pk=volume.pk).exclude(mount_path="")
    for other in others:
        if overlaps(other.mount_path, path):
            raise InvalidMountPath(
                f"mount_path {path} overlaps volume {other.name} at {other.mount_path} on {instance.name}."
            )
    return path


def attach_at_create(instance: Instance, mounts: tuple[tuple[str, str], ...], user: Any) -> None:
    """Attach ext4 volumes to a container being created (inside its create transaction).

    The volumes are ``in-use`` at once: the attachment is part of the
    container's spec, made by the node before its first start.  A create that
    fails leaves them attached to the instance in ``error``; deleting it
    releases them.  The scheduler already put the container on their node.
    """
    for vid, path in mounts:
        volume = Volume.objects.select_for_update().live().filter(pk=vid, tenant=instance.tenant).first()
        if volume is None:
            raise NotFound(f"No volume {vid} in tenant {instance.tenant.slug}.")
        if volume.format != VolumeFormat.EXT4:
            raise InvalidAction(f"Volume {volume.name} is {volume.format}: {_WHAT_TAKES[VolumeFormat.EXT4]}.")
        if volume.node_id != instance.node_id:
            raise Conflict(f"Volume {volume.name} is on another node than {instance.name}.")
        if volume.status != VolumeStatus.AVAILABLE:
            raise Conflict(f"Cannot attach volume {volume.name} while it is {volume.status}.")
        volume.status, volume.instance, volume.mount_path, volume.target = (
            VolumeStatus.IN_USE,
            instance,
            path,
            "",
        )
        volume.action_id, volume.status_reason = instance.action_id, ""
        volume.save()
        _event(volume, "dispatch.volume.attach", f"to {instance.name} at {path} (at create)", user)


def attach(volume: Volume, instance: Instance, user: Any, mount_path: str | None = None) -> Volume:
    """Attach to a VM (hot when it runs) or a stopped container at ``mount_path``, on the volume's
    node; 409 with the reason when it cannot be, 400 for a bad mount path."""
    if instance.tenant_id != volume.tenant_id:
        raise Conflict(f"Instance {instance.name} belongs to another tenant than volume {volume.name}.")
    wanted = VolumeFormat.EXT4 if instance.kind == Kind.CONTAINER else VolumeFormat.QCOW2
    if volume.format != wanted:
        raise InvalidAction(
            f"Volume {volume.name} is {volume.format} and {instance.name} a {instance.kind}: "
            f"{_WHAT_TAKES[wanted]}; create a {wanted} volume for it."
        )
    path = container_mount_path(volume, instance, mount_path)
    if instance.node_id != volume.node_id:
        raise Conflict(
            f"Volume {volume.name} is on node {volume.node.name} and instance {instance.name} on "
            f"{instance.node.name if instance.node else 'no node'}; a volume attaches only on its own node."
        )
    if Capability.VOLUMES not in instance.capabilities:
        raise InvalidAction(
            f"Node {volume.node.name} does not report the volumes capability for {instance.kind}s."
        )
    if instance.vm_state not in _ATTACHABLE or instance.task_state:
        busy = instance.task_state or instance.vm_state
        raise Conflict(f"Cannot attach to instance {instance.name} while it is {busy}.")
    if instance.kind == Kind.CONTAINER and instance.vm_state != VmState.STOPPED:
        raise Conflict(
            f"Container {instance.name} is {instance.vm_state}: volumes attach to a stopped container "
            "(there is no hot attach into a running one); stop it, attach, then start it."
        )
    with transaction.atomic():
        volume = _claim(volume, VolumeOp.ATTACH, instance=instance, mount_path=path)
        where = f" at {path}" if path else ""
        _event(volume, "dispatch.volume.attach", f"to {instance.name}{where} on {volume.node.name}", user)
        _send(
            volume, VolumeOp.ATTACH, instance_id=str(instance.pk), kind=Kind(instance.kind), mount_path=path
        )
    return volume


def detach(volume: Volume, user: Any) -> Volume:
    """Detach from its instance (hot when it runs; the guest releases the disk)."""
    instance = volume.instance
    if instance is None:
        raise Conflict(f"Volume {volume.name} is not attached.")
    if instance.kind == Kind.CONTAINER and (instance.vm_state != VmState.STOPPED or instance.task_state):
        raise Conflict(
            f"Container {instance.name} is {instance.task_state or instance.vm_state}: volumes detach from "
            "a stopped container (there is no hot detach); stop it first."
        )
    with transaction.atomic():
        volume = _claim(volume, VolumeOp.DETACH)
        _event(volume, "dispatch.volume.detach", f"from {instance.name}", user)
        _send(volume, VolumeOp.DETACH, instance_id=str(instance.pk), kind=Kind(instance.kind))
    return volume


def extend(volume: Volume, size_gb: int, user: Any) -> Volume:
    """Grow a detached volume to ``size_gb`` (quota checked); volumes never shrink."""
    if size_gb <= volume.size_gb:
        raise Conflict(f"Volume {volume.name} is {volume.size_gb} GB; it can only grow.")
    with transaction.atomic():
        _check_quota(volume.tenant, 0, size_gb - volume.size_gb)
        volume = _claim(volume, VolumeOp.GROW)
        _event(volume, "dispatch.volume.extend", f"{volume.size_gb} -> {size_gb} GB", user)
        _send(volume, VolumeOp.GROW, size_gb=size_gb)
    return volume


def delete(volume: Volume, user: Any) -> Volume:
    """Delete the file on the node; only a detached volume (409 otherwise)."""
    with transaction.atomic():
        volume = _claim(volume, VolumeOp.DELETE)
        _event(volume, "dispatch.volume.delete", f"on {volume.node.name}", user)
        _send(volume, VolumeOp.DELETE)
    return volume


def observe(obs: VolumeObservation) -> str:
    """Settle a volume from its node's observation; a stale or repeated one changes nothing."""
    if obs.op in VOLUME_SNAPSHOT_OPS:
        return volume_snapshots.observe(obs)
    with transaction.atomic():
        volume = Volume.objects.select_for_update().filter(pk=obs.volume_id).first()
        if volume is None:
            return "unknown-volume"
        if obs.action_id != volume.action_id or volume.status not in _WORKING:
            return "stale"
        if obs.ok:
            _settle_ok(volume, obs)
        else:
            _settle_failed(volume, obs)
        volume.save()
        _event(
            volume,
            f"node.volume.{obs.op}",
            obs.message or f"{obs.op} done on {obs.node}",
            outcome=Outcome.SUCCESS if obs.ok else Outcome.FAILURE,
        )
    return "applied"


_WORKING = (
    VolumeStatus.CREATING,
    VolumeStatus.ATTACHING,
    VolumeStatus.DETACHING,
    VolumeStatus.EXTENDING,
    VolumeStatus.DELETING,
)


def _settle_ok(volume: Volume, obs: VolumeObservation) -> None:
    volume.status_reason = ""
    if obs.op is VolumeOp.ATTACH:
        volume.status, volume.target = VolumeStatus.IN_USE, "" if volume.mount_path else obs.target
    elif obs.op is VolumeOp.DELETE:
        volume.status, volume.deleted_at = VolumeStatus.DELETED, timezone.now()
        volume.snapshots.all().delete()  # the node removed them with the volume
    else:
        volume.status = VolumeStatus.AVAILABLE
        if obs.op is VolumeOp.DETACH:
            volume.instance, volume.target, volume.mount_path = None, "", ""
        if obs.op is VolumeOp.GROW and obs.size_bytes:
            volume.size_gb = obs.size_bytes // 2**30
    # metering (docs/metering.md): disk from the confirmed create to the confirmed delete, each size
    # from the confirmed extend on; attach and detach change nothing (a volume costs while it exists)
    if obs.op in (VolumeOp.CREATE, VolumeOp.RECEIVE, VolumeOp.GROW, VolumeOp.DELETE):
        size = 0 if obs.op is VolumeOp.DELETE else volume.size_gb
        metering.volume_changed(volume.pk, volume.tenant_id, size)


def _settle_failed(volume: Volume, obs: VolumeObservation) -> None:
    volume.status_reason = f"{obs.op} failed: {obs.message}"[:255]
    if obs.op is VolumeOp.ATTACH:
        volume.status, volume.instance, volume.target = VolumeStatus.AVAILABLE, None, ""
        volume.mount_path = ""
    elif obs.op is VolumeOp.DETACH:
        volume.status = VolumeStatus.IN_USE
    elif obs.op is VolumeOp.GROW:
        volume.status = VolumeStatus.AVAILABLE
    else:
        volume.status = VolumeStatus.ERROR


def release(instance: Instance) -> None:
    """The instance is gone from its node: its volumes stay, detached (inside the caller's transaction)."""
    instance.volumes.select_for_update().update(
        instance=None, target="", mount_path="", status=VolumeStatus.AVAILABLE, updated_at=timezone.now()
    )


def reconcile(node: ComputeNode, files: tuple[str, ...]) -> None:
    """Record volumes whose file the node no longer has (never deletes anything); clear it when seen again."""
    present = set(files)
    settled = Volume.objects.filter(node=node).exclude(
        status__in=(VolumeStatus.CREATING, VolumeStatus.DELETING, VolumeStatus.DELETED)
    )
    # Read as values, lock only what looks drifted (as instances are): locking every volume row of
    # the node on every heartbeat would serialise beats with every volume request (bench/scale.py).
    drifted = [
        pk
        for pk, since in settled.values_list("pk", "missing_since")
        if (str(pk) not in present) != (since is not None)
    ]
    if not drifted:
        return
    for volume in settled.select_for_update(of=("self",)).filter(pk__in=drifted):
        missing = str(volume.pk) not in present
        if missing and volume.missing_since is None:
            volume.missing_since = timezone.now()
            volume.status_reason = f"volume file missing on node {node.name} (found by reconcile)"
            volume.save(update_fields=["missing_since", "status_reason", "updated_at"])
            _event(volume, "reconcile.volume_missing", volume.status_reason, outcome=Outcome.FAILURE)
        elif not missing and volume.missing_since is not None:
            volume.missing_since, volume.status_reason = None, ""
            volume.save(update_fields=["missing_since", "status_reason", "updated_at"])
