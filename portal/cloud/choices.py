"""Choices of the cloud app: instance kinds and the three state axes (as in Nova).

Which action may start from which state, and where it ends, is in
:mod:`portal.cloud.states`, beside these.
"""

from django.db import models

from compute.spec import PowerState as _NodePowerState  # the node is the authority


class Kind(models.TextChoices):
    VM = "vm", "Virtual machine"
    CONTAINER = "container", "Container"


class RequestedKind(models.TextChoices):
    AUTO = "auto", "Automatic (portal chooses)"
    VM = "vm", "Virtual machine"
    CONTAINER = "container", "Container"


class VmState(models.TextChoices):
    """Stable state of an instance, changed only by finished actions."""

    BUILDING = "building"
    ACTIVE = "active"
    STOPPED = "stopped"
    PAUSED = "paused"
    ERROR = "error"
    DELETED = "deleted"


#: every state but deleted: the instance still counts against quota and exists on its node
LIVE_STATES = tuple(s for s in VmState if s != VmState.DELETED)


class TaskState(models.TextChoices):
    """The action in flight, or null; actions claim an instance by setting it."""

    SCHEDULING = "scheduling"
    SPAWNING = "spawning"
    STARTING = "starting"
    STOPPING = "stopping"
    REBOOTING = "rebooting"
    PAUSING = "pausing"
    RESUMING = "resuming"
    SNAPSHOTTING = "snapshotting"
    REVERTING = "reverting"
    DELETING_SNAPSHOT = "deleting_snap", "Deleting snapshot"
    RESIZING = "resizing"
    PUBLISHING = "publishing"
    MIGRATING = "migrating"
    BACKING_UP = "backing_up", "Backing up"
    DELETING = "deleting"


#: choices for the power state last seen on the node: the node's own enum, one source of truth
POWER_STATE_CHOICES = [(s.value, s.name.title()) for s in _NodePowerState]


class NodeTenancy(models.TextChoices):
    SHARED = "shared", "Shared (many tenants, VMs only)"
    DEDICATED = "dedicated", "Dedicated to one tenant"


class NodeStatus(models.TextChoices):
    UP = "up"
    DOWN = "down"
    DISABLED = "disabled"
