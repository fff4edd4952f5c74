"""Snapshots of instance disks and volumes: tenant resources the portal lists.

The node is the authority on what exists: a row is written when a tenant asks
for a snapshot and settled by the node's observation (which carries the
instance's, or the volume's, whole snapshot list), and every heartbeat's
inventory reconciles an instance's rows with the node's list
(``snapshots.sync``).
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q

from portal.cloud.models import ComputeNode, Instance
from portal.images.models import Blob
from portal.storage.choices import BackupStatus, SnapshotStatus, VolumeFormatChoice, VolumeStatus
from portal.tenancy.models import Tenant
from portal.tenancy.querysets import TenantScopedQuerySet


class Snapshot(models.Model):
    """A named internal snapshot of a VM's disk (qcow2), with its size and the node's time."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="snapshots")
    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="snapshots")
    name = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=SnapshotStatus.choices, default=SnapshotStatus.CREATING)
    status_reason = models.CharField(max_length=255, blank=True)
    size_bytes = models.BigIntegerField(default=0, help_text="Saved memory state (VM snapshotted running)")
    taken_at = models.DateTimeField(null=True, blank=True, help_text="When the node took it")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["instance", "taken_at", "created_at", "name"]
        constraints = [
            models.UniqueConstraint(fields=["instance", "name"], name="snapshot_unique_name_per_instance")
        ]

    def __str__(self) -> str:
        return f"{self.name} of {self.instance_id} ({self.status})"


class VolumeQuerySet(TenantScopedQuerySet["Volume"]):
    def live(self) -> VolumeQuerySet:
        """Volumes that exist (and count against quota)."""
        return self.exclude(status=VolumeStatus.DELETED)


class Volume(models.Model):
    """A persistent volume of a tenant on one node, attached to at most one instance at a time.

    ``qcow2``: a disk for VMs; ``ext4``: a file system for containers (docs/storage.md).
    It outlives the instances it is attached to.  ``instance`` and
    ``target`` (the guest disk, ``vdc``…) or ``mount_path`` (in a
    container) describe the attachment; the transitional statuses wait for
    the node's observation of ``action_id``.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="volumes")
    name = models.CharField(max_length=63)
    size_gb = models.PositiveIntegerField()
    format = models.CharField(
        max_length=8,
        choices=VolumeFormatChoice.choices,
        default=VolumeFormatChoice.QCOW2,
        help_text="qcow2: a disk for VMs; ext4: a file system for containers",
    )
    node = models.ForeignKey(ComputeNode, on_delete=models.PROTECT, related_name="volumes")
    status = models.CharField(max_length=16, choices=VolumeStatus.choices, default=VolumeStatus.CREATING)
    status_reason = models.CharField(max_length=255, blank=True)
    instance = models.ForeignKey(
        Instance, null=True, blank=True, on_delete=models.SET_NULL, related_name="volumes"
    )
    target = models.CharField(max_length=8, blank=True, help_text="Guest disk of the attachment (vdc…)")
    mount_path = models.CharField(max_length=255, blank=True, help_text="Where a container mounts it")
    action_id = models.CharField(max_length=64, blank=True, help_text="Id of the node request in flight")
    missing_since = models.DateTimeField(
        null=True, blank=True, help_text="When reconcile found the file missing on its node"
    )
    move_node = models.ForeignKey(
        ComputeNode,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="volumes_arriving",
        help_text="Where a move is copying the volume to",
    )
    move_phase = models.CharField(
        max_length=8, blank=True, help_text="send (source uploads), receive (target)"
    )
    move_done = models.BigIntegerField(default=0, help_text="Bytes of the phase done")
    move_total = models.BigIntegerField(default=0, help_text="Bytes of the phase in all")
    move_digest = models.CharField(max_length=71, blank=True, help_text="The content the portal received")
    origin_action = models.CharField(
        max_length=64, blank=True, help_text="The request that made the copy on its node (create, move)"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="volumes"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    objects = VolumeQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "name"],
                condition=~Q(status=VolumeStatus.DELETED),
                name="volume_unique_live_name",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.size_gb} GB, {self.status})"


class BackupPolicy(models.Model):
    """Back a volume (or a stopped VM's root disk) up every ``interval_hours``, keeping the newest
    ``retention`` backups.  Exactly one of ``volume`` and ``instance`` is set."""

    volume = models.OneToOneField(
        Volume, null=True, blank=True, on_delete=models.CASCADE, related_name="backup_policy"
    )
    instance = models.OneToOneField(
        Instance, null=True, blank=True, on_delete=models.CASCADE, related_name="backup_policy"
    )
    interval_hours = models.PositiveIntegerField()
    retention = models.PositiveIntegerField()
    last_result = models.CharField(max_length=255, blank=True, help_text="What the last due run did")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(interval_hours__gte=1), name="backup_policy_interval_min"),
            models.CheckConstraint(condition=Q(retention__gte=1), name="backup_policy_retention_min"),
            models.CheckConstraint(
                condition=Q(volume__isnull=False, instance__isnull=True)
                | Q(volume__isnull=True, instance__isnull=False),
                name="backup_policy_one_source",
            ),
        ]

    def __str__(self) -> str:
        return f"every {self.interval_hours} h, keep {self.retention} ({self.volume_id or self.instance_id})"


class Backup(models.Model):
    """A copy of a volume's content, or of a stopped VM's root disk, in the portal's content-addressed
    store (shared by digest).

    Its source is ``volume`` or ``instance`` (a VM's flattened disk, always
    qcow2); ``volume_name`` is the source's name.  It keeps the format and
    size, so it can be restored into a new volume after its source is gone;
    ``blob`` is the stored qcow2 (identical contents share one blob).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="backups")
    volume = models.ForeignKey(Volume, null=True, on_delete=models.SET_NULL, related_name="backups")
    instance = models.ForeignKey(
        Instance, null=True, blank=True, on_delete=models.SET_NULL, related_name="disk_backups"
    )
    volume_name = models.CharField(max_length=63, help_text="The name of the volume or instance")
    format = models.CharField(max_length=8, choices=VolumeFormatChoice.choices)
    size_gb = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=BackupStatus.choices, default=BackupStatus.CREATING)
    status_reason = models.CharField(max_length=255, blank=True)
    scheduled = models.BooleanField(default=False, help_text="Started by the volume's policy")
    blob = models.ForeignKey(Blob, null=True, blank=True, on_delete=models.PROTECT, related_name="backups")
    size_bytes = models.BigIntegerField(default=0, help_text="Size of the stored qcow2")
    action_id = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"backup of {self.volume_name} at {self.created_at} ({self.status})"


class VolumeSnapshot(models.Model):
    """A named snapshot of a volume: an internal qcow2 snapshot or a sparse copy of an ext4 file.

    Same states as :class:`Snapshot`; ``size_bytes`` is the data it holds
    (docs/storage.md).  The volume's ``action_id`` names the request in flight.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="volume_snapshots")
    volume = models.ForeignKey(Volume, on_delete=models.CASCADE, related_name="snapshots")
    name = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=SnapshotStatus.choices, default=SnapshotStatus.CREATING)
    status_reason = models.CharField(max_length=255, blank=True)
    size_bytes = models.BigIntegerField(default=0, help_text="Data the snapshot holds")
    taken_at = models.DateTimeField(null=True, blank=True, help_text="When the node took it")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["volume", "taken_at", "created_at", "name"]
        constraints = [models.UniqueConstraint(fields=["volume", "name"], name="volume_snapshot_unique_name")]

    def __str__(self) -> str:
        return f"{self.name} of volume {self.volume_id} ({self.status})"
