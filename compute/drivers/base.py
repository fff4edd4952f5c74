"""The driver interface shared by the VM (libvirt) and container (crun) drivers.

Every method names its idempotency and cleanup contract.  Drivers are used
from Celery node tasks that may be redelivered (``acks_late``), so every
state-changing method must be safe to call again after a crash half-way.
Errors a caller can act on are :class:`DriverError` subclasses; anything
else is a bug.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from pathlib import Path

from compute import logs
from compute.spec import Capability, InstanceSpec, Kind, PowerState, SnapshotInfo


class DriverError(Exception):
    """An instance operation failed; the message is one sentence for users."""


class InstanceNotFound(DriverError):
    """The node has no workload with that instance id."""


class InvalidState(DriverError):
    """The operation is not possible in the instance's current power state."""


class NotSupported(DriverError):
    """This driver cannot do that operation (e.g. snapshots of containers)."""


@dataclasses.dataclass(frozen=True)
class InstanceInfo:
    """What the node knows of one workload right now."""

    instance_id: str
    kind: Kind
    power_state: PowerState
    pid: int | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    started_at: float | None = None
    message: str = ""
    restarts: int = 0
    gave_up: bool = False


@dataclasses.dataclass(frozen=True)
class Stats:
    """Resource counters.  ``None`` where the driver cannot measure it."""

    cpu_time_ns: int
    memory_bytes: int
    memory_peak_bytes: int | None = None
    memory_limit_bytes: int | None = None
    pids: int | None = None
    disk_read_bytes: int | None = None
    disk_write_bytes: int | None = None
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None


class Driver(abc.ABC):
    """One isolation technology on one compute node.

    ``capabilities`` says which optional operations work (reported in every
    heartbeat; the portal offers only those).  A method whose capability is
    missing raises :class:`NotSupported`.
    """

    kind: Kind
    capabilities: frozenset[Capability] = frozenset()

    @abc.abstractmethod
    def health(self) -> tuple[bool, str]:
        """Whether the driver can work on this host, and why not.

        Never raises; cheap enough for every heartbeat.
        """

    @abc.abstractmethod
    def spawn(self, spec: InstanceSpec) -> InstanceInfo:
        """Create the workload from ``spec`` and start it.

        Idempotent by ``spec.instance_id``: if the workload already exists it
        is left as it is and its info returned.  On failure everything this
        call made (disks, seeds, bundles, cgroups, netns, taps, veths) is
        removed before the error is raised.
        """

    def spawn_with(self, spec: InstanceSpec, network: Callable[[], None]) -> InstanceInfo:
        """:meth:`spawn`, with ``network`` (the node making the instance's networks and NIC rules
        ready) done before the workload can send a frame.

        Here ``network`` simply runs first.  A driver that can do it while its
        runtime makes the workload (the container driver: while crun creates
        the container, whose process waits for its start) overrides this.  An
        error from ``network`` fails the spawn and undoes it, as any other.
        """
        network()
        return self.spawn(spec)

    @abc.abstractmethod
    def destroy(self, instance_id: str) -> None:
        """Stop the workload at once and remove all it owns on the node.

        Succeeds if the workload is already gone, or half-gone.  Logs that
        the portal shows after deletion may be kept (see ``console_log``).
        """

    @abc.abstractmethod
    def start(self, instance_id: str) -> InstanceInfo:
        """Start a stopped workload.  No-op if it is already running."""

    @abc.abstractmethod
    def stop(
        self, instance_id: str, timeout: float = 30.0, force: bool = False, force_after: bool = True
    ) -> InstanceInfo:
        """Stop gracefully (ACPI power button / SIGTERM), forcing after ``timeout``.

        ``force=True`` skips the graceful phase.  No-op if already stopped.
        ``force_after=False``: never force; if the workload has not stopped
        within ``timeout``, raise :class:`InvalidState` and leave it running
        (a cold migration needs a clean disk, never a pulled plug).
        """

    @abc.abstractmethod
    def reboot(self, instance_id: str) -> InstanceInfo:
        """Restart the workload's OS or process.  The instance must be running."""

    @abc.abstractmethod
    def pause(self, instance_id: str) -> InstanceInfo:
        """Freeze the workload in memory.  No-op if already paused."""

    @abc.abstractmethod
    def resume(self, instance_id: str) -> InstanceInfo:
        """Thaw a paused workload.  No-op if already running."""

    @abc.abstractmethod
    def snapshot(self, instance_id: str, name: str) -> SnapshotInfo:
        """Take a named snapshot.  Taking an existing name again is a no-op."""

    @abc.abstractmethod
    def revert(self, instance_id: str, name: str) -> InstanceInfo:
        """Return the workload to a named snapshot."""

    @abc.abstractmethod
    def delete_snapshot(self, instance_id: str, name: str) -> None:
        """Delete a snapshot; succeeds if it does not exist."""

    @abc.abstractmethod
    def list_snapshots(self, instance_id: str, sizes: bool = False) -> list[SnapshotInfo]:
        """Snapshots of the workload, oldest first (``sizes``: also measure each, which costs more)."""

    def resize(self, instance_id: str, vcpus: int, ram_mb: int, disk_gb: int) -> InstanceInfo:
        """Give a stopped workload new vCPUs, memory and a root disk grown to ``disk_gb`` (never shrunk)."""
        raise NotSupported(f"the {self.kind} driver cannot resize")

    def attach_volume(self, instance_id: str, volume_id: str, path: Path, mount_path: str = "") -> str:
        """Attach the volume file ``path`` to the instance; returns where it appears (``vdc``…, a mount path).

        Persistent (survives stop, start and node restarts) and, on a running
        workload, live (VMs; a container takes volumes only while stopped, at
        ``mount_path``).  Attaching an attached volume returns its place.  On
        failure the instance is left as it was.
        """
        raise NotSupported(f"the {self.kind} driver cannot attach volumes")

    def detach_volume(self, instance_id: str, volume_id: str, path: Path) -> None:
        """Detach the volume file ``path``; succeeds if it is not attached.  Never the root disk."""
        raise NotSupported(f"the {self.kind} driver cannot detach volumes")

    def volume_attachments(self, volumes: Path) -> list[tuple[str, str]]:
        """(volume id, instance id) of every volume file under ``volumes`` attached to a workload here."""
        return []

    def export_disk(self, instance_id: str, dest: Path) -> None:
        """Write the instance's root disk to ``dest`` as a standalone qcow2 (no backing file).

        Only VMs have a disk to publish; a container image is published by
        uploading its OCI archive.
        """
        raise NotSupported("only VM disks can be published as images")

    @abc.abstractmethod
    def info(self, instance_id: str) -> InstanceInfo:
        """Current info; raises :class:`InstanceNotFound` if there is none."""

    @abc.abstractmethod
    def list(self) -> list[InstanceInfo]:
        """Every workload of this driver on the node (inventory for reconcile)."""

    @abc.abstractmethod
    def stats(self, instance_id: str) -> Stats:
        """Resource counters of a workload.

        Raises ``InstanceNotFound`` or ``DriverError`` (never a library's own error) when the
        workload is gone or unreadable, even if it vanishes halfway through the reading.
        """

    def serial_pty(self, instance_id: str) -> str:
        """Path of the host end of the workload's serial console pty (``Capability.TERMINAL``, VMs).

        Raises ``InstanceNotFound``, ``InvalidState`` (not running) or ``NotSupported``.
        """
        raise NotSupported(f"{self.kind} instances have no serial console on this node")

    def exec_argv(self, instance_id: str, command: tuple[str, ...], tty: bool) -> tuple[str, ...]:
        """The argv that runs ``command`` inside the running workload (``Capability.EXEC``).

        The process it starts joins the workload's namespaces (user namespace
        included) and cgroup, so the workload's limits hold for it; with
        ``tty`` its stdio must be a terminal.  Raises ``InstanceNotFound``,
        ``InvalidState`` (not running) or ``NotSupported``.
        """
        raise NotSupported(f"{self.kind} instances cannot run commands on this node")

    def logs(self, instance_id: str, selection: logs.Selection) -> logs.Reading:
        """The workload's output lines ``selection`` asks for (``Capability.LOGS``), oldest first.

        Returns (lines, truncated: older lines left out for size, retained:
        read from the kept logs of a deleted workload).  Readable after the
        workload exited, and after it was destroyed for the node's retention
        period.  Raises ``InstanceNotFound`` (neither the workload nor kept
        logs) or ``NotSupported``.
        """
        raise NotSupported(
            f"{self.kind} instances have no stdout/stderr logs: read the serial console instead"
        )

    @abc.abstractmethod
    def console_log(self, instance_id: str, max_bytes: int = 65536) -> str:
        """Tail of the serial console (VM) or stdout/stderr (container) log.

        Readable after the workload stopped or exited.
        """
