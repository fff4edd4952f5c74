"""An in-memory driver that keeps the full contract, for fast functional tests."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from compute import logs
from compute.drivers.base import (
    Driver,
    DriverError,
    InstanceInfo,
    InstanceNotFound,
    InvalidState,
    NotSupported,
    Stats,
)
from compute.spec import Capability, InstanceSpec, Kind, PowerState, SnapshotInfo

#: what the real driver of each kind reports (tests/compute/test_node_tasks.py checks they agree)
REAL_CAPABILITIES = {
    Kind.VM: frozenset(
        {
            Capability.PAUSE,
            Capability.SNAPSHOTS,
            Capability.PUBLISH,
            Capability.CONSOLE,
            Capability.TERMINAL,
            Capability.VOLUMES,
        }
    ),
    Kind.CONTAINER: frozenset(
        {
            Capability.PAUSE,
            Capability.CONSOLE,
            Capability.EXEC,
            Capability.TERMINAL,
            Capability.LOGS,
            Capability.VOLUMES,
        }
    ),
}


class FakeDriver(Driver):
    """Keeps workloads in a dict; state changes follow the real drivers' rules."""

    def __init__(self, kind: Kind = Kind.VM, capabilities: frozenset[Capability] | None = None) -> None:
        self.kind = kind
        self.capabilities = REAL_CAPABILITIES[kind] if capabilities is None else capabilities
        self.workloads: dict[str, PowerState] = {}
        self.snapshots: dict[str, dict[str, SnapshotInfo]] = {}
        self.spawn_calls = 0
        # attached volume files per instance: path -> target, as the VM driver keeps them in the definition
        self.disks: dict[str, dict[str, str]] = {}
        self.sizes: dict[str, tuple[int, int, int]] = {}  # what resize set: vcpus, ram_mb, disk_gb
        self.ignores_shutdown: set[str] = set()  # guests that never answer the power button (tests)
        # what a test may read back: a console line per state change, and counters that
        # grow like a workload busy at a quarter of one CPU with 48 MiB resident
        self.console: dict[str, list[str]] = {}
        self.started: dict[str, float] = {}
        # k8s-file records of each container, kept after destroy (as the real driver keeps its logs)
        self.log_records: dict[str, bytes] = {}

    def _get(self, instance_id: str) -> PowerState:
        if instance_id not in self.workloads:
            raise InstanceNotFound(f"no workload {instance_id} on this node")
        return self.workloads[instance_id]

    def _set(self, instance_id: str, state: PowerState) -> InstanceInfo:
        self._get(instance_id)
        self.workloads[instance_id] = state
        self.console.setdefault(instance_id, []).append(f"fake: {state.value}")
        return self.info(instance_id)

    def health(self) -> tuple[bool, str]:
        return True, "fake"

    def spawn(self, spec: InstanceSpec) -> InstanceInfo:
        self.spawn_calls += 1
        if spec.instance_id not in self.workloads:
            self.workloads[spec.instance_id] = PowerState.RUNNING
            self.started[spec.instance_id] = time.monotonic()
            self.console[spec.instance_id] = [f"fake: {spec.hostname} booted"]
        return self.info(spec.instance_id)

    def resize(self, instance_id: str, vcpus: int, ram_mb: int, disk_gb: int) -> InstanceInfo:
        if self.kind is not Kind.VM:
            raise NotSupported("the container driver cannot resize")
        if self._get(instance_id) is not PowerState.SHUTDOWN:
            raise InvalidState("only a stopped VM can be resized")
        self.sizes[instance_id] = (vcpus, ram_mb, disk_gb)
        return self.info(instance_id)

    def attach_volume(self, instance_id: str, volume_id: str, path: Path, mount_path: str = "") -> str:
        self._need(Capability.VOLUMES)
        self._get(instance_id)
        disks = self.disks.setdefault(instance_id, {})
        if self.kind is Kind.CONTAINER:
            if self._get(instance_id) is not PowerState.SHUTDOWN:
                raise InvalidState("volumes attach to a stopped container")
            return disks.setdefault(str(path), mount_path)
        return disks.setdefault(str(path), f"vd{'cdefghijklmnopqrstuvwxyz'[len(disks)]}")

    def detach_volume(self, instance_id: str, volume_id: str, path: Path) -> None:
        self._need(Capability.VOLUMES)
        state = self._get(instance_id)
        attached = str(path) in self.disks.get(instance_id, {})
        if self.kind is Kind.CONTAINER and attached and state is not PowerState.SHUTDOWN:
            raise InvalidState("volumes detach from a stopped container")
        self.disks.get(instance_id, {}).pop(str(path), None)

    def volume_attachments(self, volumes: Path) -> list[tuple[str, str]]:
        return sorted(
            (Path(p).stem, iid)
            for iid, disks in self.disks.items()
            for p in disks
            if Path(p).parent == volumes
        )

    def destroy(self, instance_id: str) -> None:
        self.workloads.pop(instance_id, None)
        self.disks.pop(instance_id, None)
        self.snapshots.pop(instance_id, None)
        self.started.pop(instance_id, None)

    def start(self, instance_id: str) -> InstanceInfo:
        return self._set(instance_id, PowerState.RUNNING)

    def stop(
        self, instance_id: str, timeout: float = 30.0, force: bool = False, force_after: bool = True
    ) -> InstanceInfo:
        if instance_id in self.ignores_shutdown and not force and not force_after:
            raise InvalidState(f"{instance_id} did not shut down within {timeout:g} s; left running")
        return self._set(instance_id, PowerState.SHUTDOWN)

    def reboot(self, instance_id: str) -> InstanceInfo:
        if self._get(instance_id) is not PowerState.RUNNING:
            raise InvalidState("only a running instance can be rebooted")
        return self.info(instance_id)

    def pause(self, instance_id: str) -> InstanceInfo:
        self._need(Capability.PAUSE)
        return self._set(instance_id, PowerState.PAUSED)

    def resume(self, instance_id: str) -> InstanceInfo:
        return self._set(instance_id, PowerState.RUNNING)

    def _need(self, capability: Capability) -> None:
        if capability not in self.capabilities:
            raise NotSupported(f"this {self.kind} driver does not support {capability}")

    def snapshot(self, instance_id: str, name: str) -> SnapshotInfo:
        self._need(Capability.SNAPSHOTS)
        self._get(instance_id)
        return self.snapshots.setdefault(instance_id, {}).setdefault(name, SnapshotInfo(name, time.time()))

    def revert(self, instance_id: str, name: str) -> InstanceInfo:
        self._need(Capability.SNAPSHOTS)
        if name not in self.snapshots.get(instance_id, {}):
            raise InstanceNotFound(f"no snapshot {name} of {instance_id}")
        return self.info(instance_id)

    def delete_snapshot(self, instance_id: str, name: str) -> None:
        self.snapshots.get(instance_id, {}).pop(name, None)

    def list_snapshots(self, instance_id: str, sizes: bool = False) -> list[SnapshotInfo]:
        return sorted(self.snapshots.get(instance_id, {}).values(), key=lambda s: s.created_at)

    def export_disk(self, instance_id: str, dest: Path) -> None:
        """A real (empty) 8 MiB qcow2, so what the portal receives is checked for real."""
        self._get(instance_id)
        self._need(Capability.PUBLISH)
        proc = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(dest), "8M"],
            check=False,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise DriverError(f"qemu-img create failed: {proc.stderr.strip()}")

    def info(self, instance_id: str) -> InstanceInfo:
        return InstanceInfo(instance_id, self.kind, self._get(instance_id))

    def list(self) -> list[InstanceInfo]:
        return [self.info(i) for i in self.workloads]

    def stats(self, instance_id: str) -> Stats:
        self._get(instance_id)
        busy = time.monotonic() - self.started.get(instance_id, time.monotonic())
        return Stats(cpu_time_ns=1 + int(busy * 0.25e9), memory_bytes=48 << 20)

    def logs(self, instance_id: str, selection: logs.Selection) -> logs.Reading:
        """The k8s-file text a test put in ``log_records`` (as conmon would write it), selected."""
        if Capability.LOGS not in self.capabilities:
            return super().logs(instance_id, selection)
        retained = instance_id not in self.workloads
        if retained and instance_id not in self.log_records:
            raise InstanceNotFound(f"no workload {instance_id} on this node, and no kept logs")
        lines, truncated = logs.select(logs.parse(self.log_records.get(instance_id, b"")), selection)
        return lines, truncated, retained

    def console_log(self, instance_id: str, max_bytes: int = 65536) -> str:
        self._get(instance_id)
        return "\n".join(self.console.get(instance_id, []))[-max_bytes:]
