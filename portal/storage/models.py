"""Snapshots of instance disks and volumes: tenant resources the portal lists.

The node is the authority on what exists: a row is written when a tenant asks
for a snapshot and settled by the node's observation (which carries the
instance's whole snapshot list), and every heartbeat's inventory reconciles
the rows with the node's list (``services.sync_snapshots``).
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q

from portal.cloud.models import ComputeNode, Instance
from portal.storage.choices import SnapshotStatus, VolumeFormatChoice, VolumeStatus
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
