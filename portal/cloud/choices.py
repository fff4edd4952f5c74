"""Choices of the cloud app: instance kinds and the three state axes (as in Nova)."""

from django.db import models

from compute.spec import PowerState as _NodePowerState


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
    DELETING = "deleting"


class PowerState(models.TextChoices):
    """Last power state seen on the node; mirrors :class:`compute.spec.PowerState`."""

    NOSTATE = "nostate"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    CRASHED = "crashed"
    SUSPENDED = "suspended"


assert {c.value for c in PowerState} == {s.value for s in _NodePowerState}, (
    "PowerState drifted from compute.spec"
)


class NodeTenancy(models.TextChoices):
    SHARED = "shared", "Shared (many tenants, VMs only)"
    DEDICATED = "dedicated", "Dedicated to one tenant"


class NodeStatus(models.TextChoices):
    UP = "up"
    DOWN = "down"
    DISABLED = "disabled"
