"""Snapshots of instance disks (and, next, volumes) as tenant resources the portal lists.

The node is the authority on what exists: a row is written when a tenant asks
for a snapshot and settled by the node's observation (which carries the
instance's whole snapshot list), and every heartbeat's inventory reconciles
the rows with the node's list (``services.sync_snapshots``).
"""

from __future__ import annotations

from django.db import models

from portal.cloud.models import Instance
from portal.storage.choices import SnapshotStatus
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
