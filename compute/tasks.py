"""Node tasks: what a compute worker does for the portal, without Django.

Each task takes one message of :mod:`compute.spec` as JSON, acts through the
driver of the instance's kind and reports an :class:`Observation` on the
``control`` queue.  Tasks are redelivered after a worker crash
(``acks_late``), so each is idempotent: drivers treat "already done" as
success, and the portal ignores an observation whose action id it has seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from compute import fetch, migration, transfer
from compute.config import NodeConfig
from compute.drivers.base import Driver, DriverError, InstanceInfo, InstanceNotFound
from compute.network import router
from compute.spec import (
    MESSAGES,
    SNAPSHOT_ACTIONS,
    VOLUME_SNAPSHOT_OPS,
    Action,
    Capability,
    ConsoleOpen,
    ConsoleRequest,
    ConsoleTail,
    CreateInstance,
    DeleteInstance,
    DriverStatus,
    ExecRequest,
    ExecResult,
    HostLoad,
    InstanceAction,
    InstanceForwards,
    InstanceSecurity,
    InventoryItem,
    Kind,
    LogsRequest,
    LogsResult,
    NetworkSegment,
    NodeReport,
    Observation,
    PowerState,
    ReleaseNetwork,
    SecurityBatch,
    SendDisk,
    SnapshotInfo,
    SpecError,
    Task,
    VolumeFormat,
    VolumeObservation,
    VolumeOp,
    VolumeProgress,
    VolumeRequest,
    from_json,
    to_json,
)
from compute.taken import TakenLog
from compute.volumes import VolumeError, VolumeStore

log = logging.getLogger(__name__)

REPLY_TTL = 60  # seconds a reply waits on its Redis list for a portal that gave up


class Sender(Protocol):
    def __call__(self, task: Task, payload: dict[str, Any]) -> None: ...


#: the messages about one instance's task, whose action ids the heartbeat reports as taken
INSTANCE_TASKS = frozenset({Task.CREATE, Task.ACTION, Task.DELETE})


class NodeService:
    """The node's side of the contract: drivers by kind plus a way to report.

    Drivers are created lazily, in the process that uses them (Celery forks
    its pool after start-up; libvirt connections must not cross a fork).
    """

    def __init__(
        self,
        config: NodeConfig,
        send: Sender,
        drivers: dict[Kind, Driver] | None = None,
        prepare_bridge: Callable[[NetworkSegment], None] | None = None,
        reply: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.send = send
        # the real node routes, filters and answers DNS for its networks; fakes only record segments
        self.router = router.Router(config) if prepare_bridge is None else None
        self.prepare_bridge = prepare_bridge or self._ensure
        self._drivers: dict[Kind, Driver] = dict(drivers or {})
        self._exit_marks: frozenset[tuple[str, float]] = frozenset()
        self._pid = os.getpid()
        self.volumes = VolumeStore(config.state_dir / "volumes")
        self._hubs: list[subprocess.Popen[bytes]] = []
        # answers the portal waits for on a Redis list (logs); tests hand in their own
        self.reply = reply or self._reply_redis
        # monotonic() counts from the host's boot: -inf, not 0, makes the first call act at once
        self._logs_kept_at = -math.inf
        self._idle_checked = -math.inf
        self._cpu_times: tuple[int, int] | None = None  # (busy, total) jiffies at the previous heartbeat
        # the instance messages taken, for the heartbeat (a message lost before it is sent again)
        self.taken = TakenLog(config.state_dir / "taken")

    def driver(self, kind: Kind) -> Driver:
        if os.getpid() != self._pid:
            self._drivers, self._pid = {}, os.getpid()
        if kind not in self._drivers:
            self._drivers[kind] = make_driver(kind, self.config)
        return self._drivers[kind]

    def _ensure(self, seg: NetworkSegment) -> None:
        assert self.router is not None
        try:
            self.router.ensure(seg)
        except router.RouterError as exc:
            raise DriverError(str(exc)) from exc

    def _detach(self, instance_id: str) -> None:
        if self.router is not None:
            try:
                self.router.detach(instance_id)
            except router.RouterError as exc:
                raise DriverError(str(exc)) from exc

    # ------------------------------------------------------------ receiving

    def handle(self, task: str, payload: Mapping[str, Any]) -> Any:
        """Run the message of ``task`` (its JSON ``payload``): the one entry point of the worker's tasks.

        A message that does not satisfy the contract is answered with a failed
        observation when it names an instance and action id, else logged and dropped.
        """
        handlers: dict[Task, Callable[[Any], Any]] = {
            Task.CREATE: self.create,
            Task.ACTION: self.action,
            Task.DELETE: self.delete,
            Task.CONSOLE: self.console,
            Task.ENSURE_NETWORK: self.ensure_network,
            Task.RELEASE_NETWORK: self.release_network,
            Task.VOLUME: self.volume,
            Task.CONSOLE_OPEN: self.console_open,
            Task.EXEC: self.exec,
            Task.LOGS: self.logs,
            Task.FORWARDS: self.forwards,
            Task.SECURITY: self.security,
            Task.SECURITY_BATCH: self.security_batch,
            Task.SEND_DISK: self.send_disk,
        }
        known = next((t for t in handlers if t == task), None)
        if known is None:
            log.error("dropping message of unknown task %r", task)
            return None
        if known in INSTANCE_TASKS:
            self.taken.mark(payload)
        try:
            try:
                message = from_json(MESSAGES[known], payload)
            except SpecError as exc:
                return self._refuse(known, payload, exc)
            return handlers[known](message)
        finally:
            if known in INSTANCE_TASKS:
                self.taken.finish(payload)  # its observation is sent (or it raised: none will come)

    def _refuse(self, task: Task, payload: Mapping[str, Any], exc: SpecError) -> Observation | None:
        """Report a malformed instance message as a failed action, if it says which one."""
        fields = dict(payload) if isinstance(payload, Mapping) else {}
        spec = fields.get("spec")
        iid = fields.get("instance_id") or (spec.get("instance_id") if isinstance(spec, Mapping) else None)
        named = {
            Task.CREATE: Action.CREATE,
            Task.DELETE: Action.DELETE,
            Task.SEND_DISK: Action.SEND_DISK,
        }.get(task, fields.get("action"))
        action = Action(named) if named in set(Action) else None
        if not isinstance(iid, str) or action is None or not isinstance(fields.get("action_id"), str):
            log.error("dropping invalid %s message %r: %s", task, payload, exc)
            return None
        return self._observe(
            iid, action, fields["action_id"], False, PowerState.NOSTATE, f"invalid {task}: {exc}"
        )

    # ------------------------------------------------------------ reporting

    def _observe(
        self,
        instance_id: str,
        action: Action,
        action_id: str,
        ok: bool,
        state: PowerState,
        message: str = "",
        details: dict[str, str] | None = None,
        snapshots: tuple[SnapshotInfo, ...] | None = None,
    ) -> Observation:
        obs = Observation(
            instance_id=instance_id,
            node=self.config.name,
            action=action,
            action_id=action_id,
            ok=ok,
            power_state=state,
            message=message,
            observed_at=time.time(),
            details=tuple(sorted((details or {}).items())),
            snapshots=snapshots,
        )
        self.send(obs.TASK, to_json(obs))
        return obs

    def _run(
        self,
        instance_id: str,
        kind: Kind,
        action: Action,
        action_id: str,
        body: Callable[[Driver], PowerState],
    ) -> Observation:
        # after a snapshot action, success or not, the portal gets the instance's whole list
        listed = action in SNAPSHOT_ACTIONS
        try:
            state = body(self.driver(kind))
        except InstanceNotFound as exc:
            return self._observe(instance_id, action, action_id, False, PowerState.NOSTATE, str(exc))
        except (DriverError, SpecError) as exc:
            log.warning("%s of %s failed: %s", action, instance_id, exc)
            snaps = self._snapshots(kind, instance_id) if listed else None
            current = self._current(kind, instance_id)
            return self._observe(instance_id, action, action_id, False, current, str(exc), snapshots=snaps)
        snaps = self._snapshots(kind, instance_id) if listed else None
        return self._observe(instance_id, action, action_id, True, state, snapshots=snaps)

    def _snapshots(self, kind: Kind, instance_id: str) -> tuple[SnapshotInfo, ...] | None:
        """The instance's snapshots with their sizes, or None when they cannot be read."""
        try:
            return tuple(self.driver(kind).list_snapshots(instance_id, sizes=True))
        except DriverError as exc:
            log.warning("cannot list the snapshots of %s: %s", instance_id, exc)
            return None

    def _current(self, kind: Kind, instance_id: str) -> PowerState:
        try:
            return self.driver(kind).info(instance_id).power_state
        except DriverError:
            return PowerState.NOSTATE

    # ------------------------------------------------------------ the messages

    def create(self, message: CreateInstance) -> Observation:
        """Spawn the instance (a redelivered create finds it and reports it again)."""
        spec = message.spec
        prepared: list[NetworkSegment] = []

        def network() -> None:
            if self.router is not None:
                try:
                    prepared.extend(self.router.prepare(spec))  # networks and NICs, one rule load
                except router.RouterError as exc:
                    raise DriverError(str(exc)) from exc
            else:
                for nic in spec.networks:
                    self.prepare_bridge(nic.segment)

        def body(d: Driver) -> PowerState:
            # Port security is in force before the workload sends a frame; the container driver
            # makes the networks ready while crun creates the container (Driver.spawn_with).
            return d.spawn_with(spec, network).power_state

        observed = self._run(spec.instance_id, spec.kind, Action.CREATE, message.action_id, body)
        # The networks' resolvers learn the new name after the portal has heard of the start (a
        # dnsmasq restart is not on the start's path; a redelivered create runs this again).
        if self.router is not None and prepared:
            self.router.update_resolvers(prepared)
        return observed

    def ensure_network(self, segment: NetworkSegment) -> bool:
        """Bring this node's part of a network to the given state (bridge, address, VXLAN, peers).

        Sent by the portal when the set of nodes carrying a network changes.
        No instance is involved, so a failure is logged, not observed; the
        next create or ensure on the network tries again.
        """
        try:
            self.prepare_bridge(segment)
        except DriverError as exc:
            log.warning("cannot ensure network %s: %s", segment.network, exc)
            return False
        return True

    def release_network(self, message: ReleaseNetwork) -> bool:
        """Stop carrying a network the tenant deleted, now if nothing here still uses its bridge.

        Returns whether it was released; a network still in use (a NIC this
        node records, a port it does not know) is left to the idle release.
        """
        if self.router is None:
            return False
        try:
            released = self.router.release_unused(message.bridge)
        except router.RouterError as exc:
            log.warning("cannot release network %s: %s", message.network, exc)
            return False
        if released:
            log.info("released network %s: its tenant deleted it", message.network)
        else:
            log.info("network %s was deleted but its bridge is still in use here: kept", message.network)
        return released

    def forwards(self, message: InstanceForwards) -> bool:
        """Converge the instance's published ports to the message's complete list.

        No action is in flight (the portal has recorded the ports already), so a
        failure is logged; the portal's reconcile sees it as rule drift.
        """
        if self.router is None:
            return True
        try:
            self.router.set_forwards(message.instance_id, message.forwards)
        except router.RouterError as exc:
            log.warning("cannot publish the ports of %s: %s", message.instance_id, exc)
            return False
        return True

    def security(self, message: InstanceSecurity) -> bool:
        """Converge the instance's security group rules (a live change: nothing restarts)."""
        if self.router is None:
            return True
        try:
            self.router.set_security(message.instance_id, message.rules, message.version)
        except router.RouterError as exc:
            log.warning("cannot apply the security groups of %s: %s", message.instance_id, exc)
            return False
        return True

    def security_batch(self, message: SecurityBatch) -> bool:
        """Converge the rules of several instances and group memberships at once (one transaction)."""
        if self.router is None:
            return True
        try:
            stale = self.router.set_security_many(
                {i.instance_id: i.rules for i in message.items},
                {i.instance_id: i.version for i in message.items},
                message.groups,
            )
            if stale:
                log.info("kept newer security rules of %s (an older batch ran late)", ", ".join(stale))
        except router.RouterError as exc:
            ids = ", ".join([i.instance_id for i in message.items] + [g.group for g in message.groups])
            log.warning("cannot apply the security groups of %s: %s", ids, exc)
            return False
        return True

    def action(self, message: InstanceAction) -> Observation:
        """Run one instance action through the driver (each action's driver call is in ``_ACTIONS``)."""
        step = _ACTIONS[message.action]
        return self._run(
            message.instance_id,
            message.kind,
            message.action,
            message.action_id,
            lambda d: step(self, d, message),
        )

    def _attach_or_detach(self, message: VolumeRequest) -> str:
        """Attach (returns the guest disk, ``vdc``…, or "") or detach a volume of this node."""
        assert message.instance_id is not None and message.kind is not None  # checked by the spec
        store, vid = self.volumes, message.volume_id
        driver = self.driver(message.kind)
        if message.op is not VolumeOp.ATTACH:
            driver.detach_volume(message.instance_id, vid, store.path(vid))
            return ""
        if not store.exists(vid):
            raise VolumeError(f"volume {vid} has no file on node {self.config.name}")
        fmt = store.format(vid)
        wanted = VolumeFormat.EXT4 if message.kind is Kind.CONTAINER else VolumeFormat.QCOW2
        if fmt is not wanted:
            raise VolumeError(f"a {fmt} volume cannot be attached to a {message.kind}")
        return driver.attach_volume(message.instance_id, vid, store.path(vid), mount_path=message.mount_path)

    def volume(self, message: VolumeRequest) -> VolumeObservation:
        """Create, delete, attach, detach or grow a volume; the outcome goes back as a VolumeObservation."""
        target, size, digest = "", 0, ""
        listed: tuple[SnapshotInfo, ...] | None = None
        try:
            store, vid = self.volumes, message.volume_id
            if message.op in (VolumeOp.SEND, VolumeOp.RECEIVE):
                size, digest = self._transfer(message)
            elif message.op is VolumeOp.DROP:
                store.drop(vid, message.origin)
            elif message.op in VOLUME_SNAPSHOT_OPS:
                self._volume_snapshot(message)
            elif message.op is VolumeOp.CREATE:
                size = store.create(vid, message.size_gb, message.format, message.id_base, message.action_id)
            elif message.op is VolumeOp.DELETE:
                store.delete(vid)
            elif message.op is VolumeOp.GROW:
                size = store.grow(vid, message.size_gb)
            else:
                target = self._attach_or_detach(message)
            ok, why = True, ""
        except (VolumeError, DriverError) as exc:
            log.warning("volume %s of %s failed: %s", message.op, message.volume_id, exc)
            ok, why = False, str(exc)
        if message.op in VOLUME_SNAPSHOT_OPS:
            with contextlib.suppress(VolumeError):
                listed = tuple(self.volumes.snapshots(message.volume_id))
        obs = VolumeObservation(
            message.volume_id,
            self.config.name,
            message.op,
            message.action_id,
            ok,
            why,
            target,
            size,
            digest=digest,
            snapshots=listed,
        )
        self.send(obs.TASK, to_json(obs))
        return obs

    def _transfer(self, message: VolumeRequest) -> tuple[int, str]:
        """Send the volume's content to the portal, or make it from a portal blob: (size, digest)."""

        def progress(done: int, total: int) -> None:
            report = VolumeProgress(
                message.volume_id, self.config.name, message.action_id, message.op, done, total
            )
            self.send(report.TASK, to_json(report))

        work = self.config.state_dir / "exports"
        vid = message.volume_id
        if message.op is VolumeOp.SEND:
            sent = transfer.send(self.volumes, vid, message.upload_url, message.upload_token, work, progress)
            return sent.size, sent.digest
        # a file already here is never overwritten (restore refuses it): a redelivered receive whose
        # first delivery finished reports a failure the portal drops as stale (its move is settled)
        size = transfer.receive(
            self.volumes, vid, message.format, message.blob_url, message.digest, work, progress
        )
        self.volumes.stamp(vid, message.action_id)  # this copy came from this request (drop checks it)
        return size, message.digest

    def _volume_snapshot(self, message: VolumeRequest) -> None:
        """Take, revert to or delete one snapshot of a volume (the store refuses one in use)."""
        if message.op is VolumeOp.SNAPSHOT:
            self.volumes.snapshot(message.volume_id, message.snapshot)
        elif message.op is VolumeOp.REVERT:
            self.volumes.revert(message.volume_id, message.snapshot)
        else:
            self.volumes.delete_snapshot(message.volume_id, message.snapshot)

    def publish(self, d: Driver, instance_id: str, url: str, token: str) -> None:
        """Export the instance's disk and upload it to the portal as a new image's file."""
        out = self.config.state_dir / "exports"
        out.mkdir(parents=True, exist_ok=True)
        dest = out / f"{instance_id}-{time.time_ns()}.qcow2"
        try:
            d.export_disk(instance_id, dest)
            try:
                fetch.upload(url, token, dest)
            except fetch.FetchError as exc:
                raise DriverError(str(exc)) from exc
        finally:
            dest.unlink(missing_ok=True)

    def send_disk(self, message: SendDisk) -> Observation:
        """Cold migration's first half: upload the stopped VM's flattened disk (``compute.migration``).

        The observation carries the digest and size the target must verify, and
        what the export and the upload took; the VM is left as it was.
        """
        iid = message.instance_id
        try:
            sent = migration.send_disk(
                self.driver(Kind.VM), iid, message.upload_url, message.upload_token, self.config.state_dir
            )
        except DriverError as exc:  # not stopped, gone, export or upload failed
            log.warning("sending the disk of %s failed: %s", iid, exc)
            state = self._current(Kind.VM, iid)
            return self._observe(iid, Action.SEND_DISK, message.action_id, False, state, str(exc))
        details = {
            "digest": sent.digest,
            "size": str(sent.size),
            "export_seconds": f"{sent.export_seconds:.3f}",
            "upload_seconds": f"{sent.upload_seconds:.3f}",
        }
        state = self._current(Kind.VM, iid)
        return self._observe(iid, Action.SEND_DISK, message.action_id, True, state, details=details)

    def console(self, message: ConsoleRequest) -> ConsoleTail:
        """Send the tail of the instance's console log to the portal (:class:`ConsoleTail`)."""
        try:
            text = self.driver(message.kind).console_log(message.instance_id, message.max_bytes)
        except (DriverError, ValueError) as exc:
            text = f"[console not readable: {exc}]"
        tail = ConsoleTail(message.instance_id, self.config.name, text, time.time())
        self.send(tail.TASK, to_json(tail))
        return tail

    def console_open(self, message: ConsoleOpen) -> subprocess.Popen[bytes]:
        """Start the hub of ``message`` (:mod:`compute.console.hub`) and return at once.

        The hub is this worker process's child and ends when the worker goes
        (it watches its parent); a second open of a live hub exits at once.
        """
        self._hubs = [p for p in self._hubs if p.poll() is None]  # reap ended hubs
        env = {**os.environ, **self.config.as_env()}
        hub = subprocess.Popen(
            [sys.executable, "-m", "compute.console.hub", json.dumps(to_json(message)), str(os.getpid())],
            stdin=subprocess.DEVNULL,
            env=env,
        )
        self._hubs.append(hub)
        return hub

    def exec(self, message: ExecRequest) -> ExecResult:
        """Run a command without a terminal; the result goes onto the Redis list ``message.reply``."""
        import redis

        from compute.console import runexec
        from compute.console.streams import NO_REDIS, redis_url

        url = redis_url(self.config.broker_url)
        if url is None:
            log.error("exec %s: %s", message.instance_id, NO_REDIS)
            return ExecResult(None, "", error=NO_REDIS)
        result = runexec.run(self.driver(message.kind), message)
        client = redis.Redis.from_url(url)
        client.rpush(message.reply, json.dumps(to_json(result)))
        client.expire(message.reply, runexec.REPLY_TTL)
        return result

    def logs(self, message: LogsRequest) -> LogsResult:
        """Read the instance's logs as asked; the result goes onto the Redis list ``message.reply``."""
        try:
            lines, truncated, retained = self.driver(message.kind).logs(
                message.instance_id, message.selection()
            )
            result = LogsResult(
                tuple((line.time, line.stream, line.text) for line in lines), truncated, retained
            )
        except (DriverError, OSError, ValueError) as exc:
            result = LogsResult(error=str(exc) or type(exc).__name__)
        self.reply(message.reply, to_json(result))
        return result

    def _reply_redis(self, key: str, payload: dict[str, Any]) -> None:
        import redis

        from compute.console.streams import NO_REDIS, redis_url

        url = redis_url(self.config.broker_url)
        if url is None:
            log.error("reply to %s: %s", key, NO_REDIS)
            return
        client = redis.Redis.from_url(url)
        client.rpush(key, json.dumps(payload))
        client.expire(key, REPLY_TTL)

    def keep_logs(self, every: float = 1.0) -> list[str]:
        """Rotate container logs, sweep deleted ones past retention (at most every ``every`` s)."""
        now = time.monotonic()
        if now - self._logs_kept_at < every:
            return []
        self._logs_kept_at = now
        try:
            keep = getattr(self.driver(Kind.CONTAINER), "keep_logs", None)  # only the container driver
            return list(keep()) if callable(keep) else []
        except Exception:
            log.exception("keeping container logs failed")
            return []

    def delete(self, message: DeleteInstance) -> Observation:
        """Destroy the workload; deleting what is already gone succeeds."""

        def body(d: Driver) -> PowerState:
            d.destroy(message.instance_id)
            self._detach(message.instance_id)
            return PowerState.NOSTATE

        return self._run(message.instance_id, message.kind, Action.DELETE, message.action_id, body)

    def _attachments(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for kind in Kind:
            with contextlib.suppress(DriverError):
                driver = self.driver(kind)
                if Capability.VOLUMES in driver.capabilities:
                    found += driver.volume_attachments(self.volumes.root)
        return found

    def cached(self) -> list[str]:
        """Digests in the node's caches (VM bases, container layers), read from disk."""
        from compute.imagecache import ImageCache
        from compute.layers import LayerStore

        state = self.config.state_dir
        return sorted(set(ImageCache(state / "images").digests()) | set(LayerStore(state).layers()))

    def supervise(self) -> bool:
        """Apply restart policies of ended containers; True when one was restarted or given up."""
        try:
            driver = self.driver(Kind.CONTAINER)
            supervise = getattr(driver, "supervise", None)  # only the container driver has one
            return bool(supervise()) if callable(supervise) else False
        except Exception:
            log.exception("container supervision failed")
            return False

    def exits_changed(self) -> bool:
        """Whether a container ended since the last call (the heartbeat then reports at once)."""
        try:
            driver = self.driver(Kind.CONTAINER)
            marks_of = getattr(driver, "exit_marks", None)  # only the container driver has them
            marks: frozenset[tuple[str, float]] = marks_of() if callable(marks_of) else frozenset()
        except Exception:  # a broken driver shows in the next heartbeat's health instead
            return False
        changed = marks != self._exit_marks and bool(marks - self._exit_marks)
        self._exit_marks = marks
        return changed

    def report(self) -> NodeReport:
        """Capacity, driver health and capabilities, and inventory, sent as the node's heartbeat."""
        self._release_idle_networks()
        drivers: list[DriverStatus] = []
        inventory: list[InventoryItem] = []
        inventory_at = time.time()
        for kind in Kind:
            capabilities: frozenset[Capability] = frozenset()
            try:
                driver = self.driver(kind)
                capabilities = driver.capabilities
                ok, why = driver.health()
                if ok:
                    inventory += [_item(driver, kind, i) for i in driver.list()]
            except Exception as exc:  # a broken driver is reported, never fatal to the heartbeat
                ok, why = False, f"{type(exc).__name__}: {exc}"
            drivers.append(DriverStatus(kind, ok, why, capabilities))
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        taken, done = self.taken.recent()
        report = NodeReport(
            node=self.config.name,
            queue=self.config.queue,
            vcpus=os.cpu_count() or 1,
            ram_mb=_meminfo_mb("MemTotal"),
            disk_gb=shutil.disk_usage(self.config.state_dir).total // 2**30,
            drivers=tuple(drivers),
            inventory=tuple(inventory),
            sent_at=time.time(),
            inventory_at=inventory_at,
            cached=tuple(self.cached()),
            tunnel_address=self.config.tunnel_address,
            volumes=tuple(self.volumes.ids()),
            attachments=tuple(self._attachments()),
            network_drift=self._network_drift(),
            host=self._host_load(),
            taken=taken,
            done=done,
            taken_window=self.taken.window,
        )
        self.send(report.TASK, to_json(report))
        return report

    def _release_idle_networks(self) -> None:
        """Stop carrying networks no instance here has used for a while (checked once a minute at most)."""
        grace = self.config.network_idle_seconds
        if self.router is None or time.monotonic() - self._idle_checked < min(60.0, grace):
            return
        self._idle_checked = time.monotonic()
        try:
            for network in self.router.release_idle(grace):
                log.info("released network %s: no instance of this node used it for %.0f s", network, grace)
        except router.RouterError as exc:
            log.warning("cannot release an idle network: %s", exc)

    def _host_load(self) -> HostLoad | None:
        """Load averages, CPU busy since the previous beat, memory available, disk free (None: unreadable)."""
        try:
            busy, total = _cpu_jiffies()
            load1, load5, _ = os.getloadavg()
            free = shutil.disk_usage(self.config.state_dir).free
            memory = _meminfo_mb("MemAvailable")
        except (OSError, ValueError, IndexError) as exc:
            log.warning("cannot read the host's load: %s", exc)
            return None
        cpu = 0.0
        if self._cpu_times is not None and total > self._cpu_times[1]:
            cpu = 100.0 * (busy - self._cpu_times[0]) / (total - self._cpu_times[1])
        self._cpu_times = (busy, total)
        cpu = round(max(0.0, cpu), 1)
        return HostLoad(round(load1, 2), round(load5, 2), cpu, memory, round(free / 2**30, 1))

    def _network_drift(self) -> str:
        """Rule drift since the last load, repaired by loading the desired rules again."""
        if self.router is None:
            return ""
        try:
            drift = self.router.drift()
            if drift:
                log.warning("%s; loading them again", drift)
                self.router.converge()
        except router.RouterError as exc:
            return f"{drift or 'rules'}; reloading failed: {exc}"[:255]
        return drift[:255]


def _stop(svc: NodeService, d: Driver, m: InstanceAction) -> PowerState:
    timeout, force = float(m.params.get("timeout", 30)), bool(m.params.get("force"))
    # clean: a shutdown or a refusal, never a forced power-off (a migration's stop)
    return d.stop(m.instance_id, timeout, force, force_after=not m.params.get("clean")).power_state


def _snapshot(svc: NodeService, d: Driver, m: InstanceAction) -> PowerState:
    d.snapshot(m.instance_id, m.param("name"))
    return d.info(m.instance_id).power_state


def _delete_snapshot(svc: NodeService, d: Driver, m: InstanceAction) -> PowerState:
    d.delete_snapshot(m.instance_id, m.param("name"))
    return d.info(m.instance_id).power_state


def _resize(svc: NodeService, d: Driver, m: InstanceAction) -> PowerState:
    sizes = [m.params.get(k) for k in ("vcpus", "ram_mb", "disk_gb")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes[:2]) or not (
        isinstance(sizes[2], int) and not isinstance(sizes[2], bool) and sizes[2] >= 0
    ):
        raise SpecError(f"resize needs whole-number vcpus, ram_mb and disk_gb, got {sizes}")
    return d.resize(m.instance_id, *sizes).power_state  # type: ignore[arg-type]


def _publish(svc: NodeService, d: Driver, m: InstanceAction) -> PowerState:
    svc.publish(d, m.instance_id, m.param("upload_url"), m.param("upload_token"))
    return d.info(m.instance_id).power_state


#: how the node runs each instance action (create and delete have messages of their own)
_ACTIONS: dict[Action, Callable[[NodeService, Driver, InstanceAction], PowerState]] = {
    Action.START: lambda svc, d, m: d.start(m.instance_id).power_state,
    Action.STOP: _stop,
    Action.REBOOT: lambda svc, d, m: d.reboot(m.instance_id).power_state,
    Action.PAUSE: lambda svc, d, m: d.pause(m.instance_id).power_state,
    Action.RESUME: lambda svc, d, m: d.resume(m.instance_id).power_state,
    Action.SNAPSHOT: _snapshot,
    Action.REVERT: lambda svc, d, m: d.revert(m.instance_id, m.param("name")).power_state,
    Action.DELETE_SNAPSHOT: _delete_snapshot,
    Action.PUBLISH: _publish,
    Action.RESIZE: _resize,
}


def _prepare_bridge(seg: NetworkSegment) -> None:
    """The network's devices only (bridge, addresses, VXLAN), as a driver error on failure."""
    try:
        router.prepare_devices(seg)
    except router.RouterError as exc:
        raise DriverError(str(exc)) from exc


def _item(driver: Driver, kind: Kind, info: InstanceInfo) -> InventoryItem:
    """An inventory entry: the workload's counters and snapshots when they can be read, or how it ended."""
    instance_id, state = info.instance_id, info.power_state
    snaps: tuple[SnapshotInfo, ...] | None = None
    if Capability.SNAPSHOTS in driver.capabilities:
        with contextlib.suppress(DriverError):
            snaps = tuple(driver.list_snapshots(instance_id))
    if state != PowerState.RUNNING:
        return InventoryItem(
            instance_id,
            kind,
            state,
            snapshots=snaps,
            exit_code=info.exit_code,
            message=info.message[:1000],
            restarts=info.restarts,
            gave_up=info.gave_up,
        )
    try:
        stats = driver.stats(instance_id)
    except DriverError:
        return InventoryItem(instance_id, kind, state, snapshots=snaps, restarts=info.restarts)
    return InventoryItem(
        instance_id,
        kind,
        state,
        stats.cpu_time_ns,
        stats.memory_bytes,
        snapshots=snaps,
        restarts=info.restarts,
    )


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the host from /proc/stat's first line (idle and iowait are not busy)."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - values[3] - values[4], total


def _meminfo_mb(field: str) -> int:
    """A /proc/meminfo line (``MemTotal``, ``MemAvailable``) in MiB; 0 if absent."""
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) // 1024
    return 0


def make_driver(kind: Kind, config: NodeConfig) -> Driver:
    """The driver of ``kind`` on this node (imported lazily: a VM-less node needs no libvirt)."""
    if kind is Kind.VM:
        from compute.drivers.vm import LibvirtDriver

        return LibvirtDriver(config)
    from compute.drivers.container import ContainerDriver

    return ContainerDriver(config)
