"""Choices of the storage app: the states of snapshots and volumes."""

from django.db import models


class SnapshotStatus(models.TextChoices):
    """Where a snapshot of an instance's disk stands, as the portal last knew it."""

    CREATING = "creating"
    AVAILABLE = "available"
    REVERTING = "reverting"
    DELETING = "deleting"
    MISSING = "missing"  # the node no longer lists it (found by reconcile)


class VolumeStatus(models.TextChoices):
    """Where a volume stands; the transitional ones wait for the node's :class:`VolumeObservation`."""

    CREATING = "creating"
    AVAILABLE = "available"
    ATTACHING = "attaching"
    IN_USE = "in-use"
    DETACHING = "detaching"
    EXTENDING = "extending"
    DELETING = "deleting"
    DELETED = "deleted"
    ERROR = "error"
    BACKING_UP = "backing-up"  # its node sends a copy to the portal's blob store (a Backup)
    MOVING = "moving"  # copied to ``move_node`` through the portal; on ``node`` until the target confirms


class BackupStatus(models.TextChoices):
    """Where a backup stands: its content arrives in the blob store, then it can be restored."""

    CREATING = "creating"
    AVAILABLE = "available"
    ERROR = "error"


class VolumeFormatChoice(models.TextChoices):
    """What a volume is on its node (``compute.spec.VolumeFormat``)."""

    QCOW2 = "qcow2", "qcow2 disk (VMs)"
    EXT4 = "ext4", "ext4 file system (containers)"


#: statuses of a snapshot an action is working on (the instance is claimed meanwhile)
SNAPSHOT_IN_FLIGHT = (SnapshotStatus.CREATING, SnapshotStatus.REVERTING, SnapshotStatus.DELETING)
