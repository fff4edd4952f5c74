"""Container driver: OCI bundles run by crun under conmon.

Layout under ``<state_dir>/containers``::

    crun/                 crun --root (this driver's containers only)
    locks/<cid>           per-instance flock
    <cid>/spec.json       the InstanceSpec; written last by spawn (marks "exists")
    <cid>/bundle/         config.json (written at each launch) + rootfs/ (overlay mount point)
    <cid>/upper, work/    the container's private overlay layers, owned by its id range
    <cid>/lowerdir        the image's layer directories, top first, one a line
    <cid>/container.log   stdout+stderr, each line stamped with time and stream (conmon's
                          k8s-file), capped; .1 is the previous file (compute/logs.py)
    <cid>/conmon/conmon.log  conmon's own messages
    <cid>/conmon/exit     exit code written by conmon (survives worker restarts)
    <cid>/result.json     exit code + OOM verdict, saved before the cgroup goes
    <cid>/volumes.json    attached ext4 volumes: volume id, file, mount path (docs/storage.md)

``cid`` is ``sky-<instance_id>``.  Each container runs in a user namespace
whose root is host uid ``id_base`` (one range per tenant); the image layers
are overlay lowers through idmapped mounts (:mod:`compute.idmap`), so they
are shared and never copied or chowned.  The overlay rootfs and the netns bind
mount exist in the worker's private mount namespace only while crun creates
the container; crun's mount namespace keeps its own copy, so the worker's
mount table stays small whatever the density.  The network namespace then
lives exactly as long as the container and takes the veth with it.

conmon is each container's parent: it reaps PID 1 and writes the exit code,
so results survive worker restarts (:mod:`compute.drivers.conmon`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from compute import cgroups, idmap, logs, nsenv, passwd
from compute.config import NodeConfig
from compute.drivers import conmon
from compute.drivers.base import (
    Driver,
    DriverError,
    InstanceInfo,
    InstanceNotFound,
    InvalidState,
    NotSupported,
    Stats,
)
from compute.drivers.common import is_instance_id, mtime, read_int, tail
from compute.layers import ImageError, LayerStore, UnpackedImage
from compute.mountpath import MountPathError, check_mount_path, overlaps
from compute.network import veth
from compute.network.bridge import NetworkError
from compute.oci import BundleSpec, runtime_config
from compute.spec import (
    ID_RANGE_SIZE,
    Capability,
    ImageFormat,
    InstanceSpec,
    Kind,
    PowerState,
    SnapshotInfo,
    restart_rule,
    stored_spec,
    to_json,
)

#: the cgroup all of the node's containers live under (``/<parent>/sky-<id>``).  One node per
#: host needs no other; nodes simulated on one kernel (tests/e2e) set one each, or a copy of an
#: instance on one of them would share the cgroup of its copy on another (and crun's
#: ``delete --force`` of one would kill both).
CGROUP_PARENT = os.environ.get("SKYPORT_CGROUP_PARENT", "skyport")
if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", CGROUP_PARENT) or CGROUP_PARENT in (".", ".."):
    raise RuntimeError(f"SKYPORT_CGROUP_PARENT={CGROUP_PARENT!r}: use letters, digits, '.', '_' and '-'")
CRASH_WINDOW = 10.0  # seconds: a container that ends sooner after its start counts as crashing
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LEGACY_ID_BASE = 1 << 31  # ranges for specs stored before InstanceSpec.id_base
LEGACY_RANGES = (2**32 - LEGACY_ID_BASE) // ID_RANGE_SIZE - 1


def container_id(instance_id: str) -> str:
    return f"sky-{instance_id}"


def id_base(spec: InstanceSpec) -> int:
    """Host uid/gid of the container's root: the tenant's range (docs/container-driver.md).

    The portal sends it; a spec stored before it did gets a range derived
    from the tenant's slug, in the upper half of the id space.
    """
    if spec.id_base:
        return spec.id_base
    digest = hashlib.sha256(spec.tenant.encode()).digest()
    return LEGACY_ID_BASE + int.from_bytes(digest[:4], "big") % LEGACY_RANGES * ID_RANGE_SIZE


def cgroups_path(instance_id: str) -> str:
    return f"/{CGROUP_PARENT}/{container_id(instance_id)}"


@dataclasses.dataclass(frozen=True)
class _Paths:
    root: Path

    @property
    def spec(self) -> Path:
        return self.root / "spec.json"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def rootfs(self) -> Path:
        return self.root / "bundle" / "rootfs"

    @property
    def upper(self) -> Path:
        return self.root / "upper"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def log(self) -> Path:
        return self.root / "container.log"

    @property
    def legacy_log(self) -> Path:
        """stdout+stderr unmarked, of a container started before the k8s-file logs."""
        return self.root / "console.log"

    def log_text(self, max_chars: int) -> str | None:
        text = logs.text_tail(self.log, max_chars)
        return text if text is not None else tail(self.legacy_log, max_chars)

    @property
    def conmon(self) -> Path:
        return self.root / "conmon"

    @property
    def exit(self) -> Path:
        return self.root / "conmon" / "exit"

    @property
    def pidfile(self) -> Path:
        return self.root / "pid"

    @property
    def netns(self) -> Path:
        return self.root / "netns"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def started(self) -> Path:
        return self.root / "started"

    @property
    def stopped(self) -> Path:
        """Marker: stopped on purpose (or its policy is done with it): the supervisor leaves it alone."""
        return self.root / "stopped"

    @property
    def restarts(self) -> Path:
        return self.root / "restarts"

    @property
    def gave_up(self) -> Path:
        return self.root / "gave_up"

    @property
    def volumes(self) -> Path:
        return self.root / "volumes.json"


class ContainerDriver(Driver):
    """Containers on one node, each an OCI bundle run by crun (or runc)."""

    kind = Kind.CONTAINER
    capabilities = frozenset(
        {
            Capability.PAUSE,
            Capability.CONSOLE,
            Capability.EXEC,
            Capability.TERMINAL,
            Capability.LOGS,
            Capability.VOLUMES,
        }
    )

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.base = config.state_dir / "containers"
        self.crun_root = self.base / "crun"
        self.locks = self.base / "locks"
        self.layers = LayerStore(config.state_dir)
        self.runtime = config.container_runtime
        self.fs = cgroups.SysCgroupFS()
        self.fast_start = True

    # ----------------------------------------------------------------- helpers

    def _paths(self, instance_id: str) -> _Paths:
        if not is_instance_id(instance_id):
            raise InstanceNotFound(f"no container {instance_id!r}: not an instance id")
        return _Paths(self.base / container_id(instance_id))

    @contextlib.contextmanager
    def _locked(self, instance_id: str) -> Iterator[_Paths]:
        paths = self._paths(instance_id)
        nsenv.enter_private_mount_ns()
        self.locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.locks / container_id(instance_id), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield paths
        finally:
            os.close(fd)

    def _runtime(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        cmd = [self.runtime, f"--root={self.crun_root}", *args]
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise DriverError(f"{self.runtime} {args[0]} failed: {proc.stderr.strip() or proc.returncode}")
        return proc

    def _crun_state(self, instance_id: str) -> dict[str, Any] | None:
        proc = self._runtime("state", container_id(instance_id), check=False, timeout=10.0)
        if proc.returncode != 0:
            return None
        data = json.loads(proc.stdout)
        return data if isinstance(data, dict) else None

    def _load_spec(self, paths: _Paths) -> InstanceSpec:
        try:
            return stored_spec(json.loads(paths.spec.read_text()))
        except FileNotFoundError:
            raise InstanceNotFound(f"no container {paths.root.name} on this node") from None

    def _image(self, spec: InstanceSpec) -> UnpackedImage:
        if spec.image.format != ImageFormat.OCI:
            raise DriverError(f"containers need an OCI image, {spec.image.name} is {spec.image.format}")
        try:
            if spec.image.location.startswith(("http://", "https://")):
                return self.layers.pull(spec.image.location, spec.image.digest)
            location = Path(spec.image.location)
            if not location.is_absolute() or not location.is_file():
                raise DriverError(f"image {spec.image.name} is not on this node ({spec.image.location})")
            return self.layers.unpack(location, spec.image.digest)
        except (ImageError, OSError, ValueError, KeyError) as exc:
            raise DriverError(f"cannot unpack image {spec.image.name}: {exc}") from exc

    def _bundle_spec(self, spec: InstanceSpec, image: UnpackedImage, paths: _Paths) -> BundleSpec:
        """config.json's inputs: image config, then the spec's overrides; user resolved in the rootfs."""
        cfg = image.config
        args = spec.command or (cfg.entrypoint + cfg.cmd)
        if not args:
            raise DriverError(f"image {spec.image.name} has no command and the spec gives none")
        try:
            user = passwd.resolve(paths.rootfs, spec.user or cfg.user)
        except passwd.UnknownUser as exc:
            raise DriverError(f"cannot run {spec.name}: {exc}") from exc
        if not (user.uid < ID_RANGE_SIZE and user.gid < ID_RANGE_SIZE):
            raise DriverError(
                f"cannot run {spec.name}: user {user.uid}:{user.gid} is above {ID_RANGE_SIZE - 1}"
            )
        env = {"PATH": DEFAULT_PATH, "HOME": user.home}
        env.update(dict(cfg.env))
        env.update(dict(spec.env))
        env["HOSTNAME"] = spec.hostname
        return BundleSpec(
            hostname=spec.hostname,
            args=tuple(args),
            env=tuple(env.items()),
            uid=user.uid,
            gid=user.gid,
            additional_gids=user.additional_gids,
            id_base=id_base(spec),
            cgroups_path=cgroups_path(spec.instance_id),
            memory_bytes=spec.ram_mb * 1024 * 1024,
            cpu_quota_percent=spec.cpu_quota_percent,
            pids_limit=spec.pids_limit,
            cwd=spec.workdir or cfg.working_dir,
            netns_path=None,  # a new one, wired after create (see _launch)
            resolv_conf=self._resolv_conf(spec, paths),
        )

    @staticmethod
    def _resolv_conf(spec: InstanceSpec, paths: _Paths) -> str | None:
        """The container's resolv.conf (its networks' resolvers), written beside the bundle."""
        servers = list(dict.fromkeys(s for nic in spec.networks for s in nic.dns))
        if not servers:
            return None
        path = paths.root / "resolv.conf"
        path.write_text("".join(f"nameserver {s}\n" for s in servers))
        path.chmod(0o644)
        return str(path)

    def _pid(self, paths: _Paths, instance_id: str) -> int | None:
        """PID 1 of the container if it is alive and in our cgroup."""
        try:
            pid = int(paths.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            with open(f"/proc/{pid}/cgroup") as fh:
                cg = fh.read()
            with open(f"/proc/{pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return None
        if state in ("Z", "X") or cgroups_path(instance_id) not in cg:
            return None
        return pid

    def _exit_code(self, paths: _Paths) -> int | None:
        return read_int(paths.exit)

    def _record_result(self, paths: _Paths, instance_id: str) -> dict[str, Any]:
        """Persist exit code and OOM verdict while the cgroup still exists."""
        previous = self._read_result(paths)
        result = dict(previous)
        oom = cgroups.oom_killed(self.fs, cgroups_path(instance_id))
        if oom is not None:
            result["oom_killed"] = result.get("oom_killed", False) or oom
        code = self._exit_code(paths)
        if code is not None:
            result["exit_code"] = code
        if result == previous or not paths.root.is_dir():
            return result
        tmp = paths.result.with_name(f".result.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(result))
            os.replace(tmp, paths.result)
        except FileNotFoundError:  # destroyed meanwhile
            pass
        return result

    def _read_result(self, paths: _Paths) -> dict[str, Any]:
        try:
            data = json.loads(paths.result.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _info(self, paths: _Paths, instance_id: str) -> InstanceInfo:
        if not paths.spec.exists():
            raise InstanceNotFound(f"no container {paths.root.name} on this node")
        started_at = mtime(paths.started)
        pid = self._pid(paths, instance_id)
        if pid is not None:
            frozen = cgroups.frozen(self.fs, cgroups_path(instance_id))
            state = PowerState.PAUSED if frozen else PowerState.RUNNING
            restarts = read_int(paths.restarts) or 0
            return InstanceInfo(
                instance_id, self.kind, state, pid=pid, started_at=started_at, restarts=restarts
            )
        result = self._record_result(paths, instance_id)
        code = result.get("exit_code")
        oom = bool(result.get("oom_killed", False))
        if code is None and started_at is not None and conmon.alive(paths.conmon, container_id(instance_id)):
            # conmon writes the exit file a moment after PID 1 dies.
            deadline = time.monotonic() + 2.0
            while code is None and time.monotonic() < deadline:
                time.sleep(0.01)
                code = self._exit_code(paths)
            if code is not None:
                result = self._record_result(paths, instance_id)
        message = ""
        if code is None and started_at is not None:
            message = "exit code unknown: its supervisor (conmon) is gone, e.g. after a host reboot"
        if oom:
            message = "killed by the kernel: out of memory (memory limit reached)"
        elif code is not None:
            message = exit_reason(code)
        restarts = read_int(paths.restarts) or 0
        gave_up = paths.gave_up.exists()
        if gave_up:
            message = f"crash loop: gave up after {restarts} restarts; {message}"
        if message:
            last = last_lines(paths)
            if last:
                message = f"{message}; last output: {last}"
        state = PowerState.CRASHED if oom or gave_up else PowerState.SHUTDOWN
        return InstanceInfo(
            instance_id,
            self.kind,
            state,
            exit_code=code,
            oom_killed=oom,
            started_at=started_at,
            message=message,
            restarts=restarts,
            gave_up=gave_up,
        )

    # ------------------------------------------------------------- lifecycle

    def health(self) -> tuple[bool, str]:
        try:
            if os.geteuid() != 0:
                return False, "the container driver needs root"
            for binary in (self.runtime, "conmon"):
                if shutil.which(binary) is None:
                    return False, f"{binary} is not installed"
            out = subprocess.run(
                [self.runtime, "--version"], capture_output=True, text=True, timeout=5, check=False
            )
            if out.returncode != 0:
                return False, f"{self.runtime} --version failed: {out.stderr.strip()}"
            version = out.stdout.splitlines()[0].strip() if out.stdout else self.runtime
            m = re.search(r"version (\S+)", version)
            nsenv.enter_private_mount_ns()
            if not nsenv.hybrid_hidden():
                return False, "cannot hide the cgroup2 hybrid mount from crun"
            self.base.mkdir(parents=True, exist_ok=True)
            return True, f"{self.runtime} {m.group(1) if m else version}"
        except Exception as exc:  # health never raises: report instead
            return False, f"container driver unusable: {exc}"

    def spawn(self, spec: InstanceSpec) -> InstanceInfo:
        return self._spawn(spec, None)

    def spawn_with(self, spec: InstanceSpec, network: Callable[[], None]) -> InstanceInfo:
        """``network`` runs while crun creates the container (its PID 1 waits for the start), and
        is done before the veths are wired and the container started."""
        return self._spawn(spec, network)

    def _spawn(self, spec: InstanceSpec, network: Callable[[], None] | None) -> InstanceInfo:
        if spec.kind != Kind.CONTAINER:
            raise DriverError(f"instance {spec.instance_id} is a {spec.kind}, not a container")
        with self._locked(spec.instance_id) as paths:
            if paths.spec.exists():
                if network is not None:
                    network()
                return self._info(paths, spec.instance_id)
            if paths.root.exists():  # a spawn that died half-way: start over
                self._teardown(paths, spec.instance_id)
            image = self._image(spec)
            with contextlib.ExitStack() as undo:
                paths.root.mkdir(parents=True, mode=0o700)
                undo.callback(self._teardown, paths, spec.instance_id)
                for d in (paths.rootfs, paths.upper, paths.work, paths.conmon):
                    d.mkdir(parents=True, mode=0o755)
                # The container's root owns its private layer (the rootfs' "/").
                base = id_base(spec)
                os.chown(paths.upper, base, base)
                (paths.root / "lowerdir").write_text("\n".join(str(p) for p in reversed(image.layers)))
                if spec.volumes:
                    self._write_attached(paths, self._volumes_at_create(spec))
                tmp = paths.spec.with_suffix(".tmp")
                tmp.write_text(json.dumps(to_json(spec)))
                os.replace(tmp, paths.spec)  # from here on the instance exists
                info = self._launch(paths, spec, image, network)
                undo.pop_all()
                return info
        raise AssertionError("unreachable")  # pragma: no cover

    def _launch(
        self,
        paths: _Paths,
        spec: InstanceSpec,
        image: UnpackedImage | None = None,
        network: Callable[[], None] | None = None,
    ) -> InstanceInfo:
        """Mount, wire, create under conmon, start; undo all of it on failure.

        ``image``: the spec's image when the caller has it already (spawn), else it is looked up.
        ``network``: see :meth:`spawn_with`.
        """
        cid = container_id(spec.instance_id)
        for stale in (paths.exit, paths.pidfile, paths.result, paths.stopped):
            stale.unlink(missing_ok=True)
        if (self.crun_root / cid).exists():  # crun's own state dir: a stopped container
            self._runtime("delete", "--force", cid, check=False)
        self.fs.remove(cgroups_path(spec.instance_id))
        with contextlib.ExitStack() as transient, contextlib.ExitStack() as undo:
            if not nsenv.is_mountpoint(paths.rootfs):
                self._mount_rootfs(paths, id_base(spec))
            transient.callback(_umount_quiet, paths.rootfs)
            volumes = self._mount_volumes(paths, id_base(spec), transient)
            image = image or self._image(spec)
            bundle = dataclasses.replace(self._bundle_spec(spec, image, paths), volumes=volumes)
            try:
                config = runtime_config(bundle)
            except ValueError as exc:
                raise DriverError(f"cannot run {spec.name}: {exc}") from exc
            (paths.bundle / "config.json").write_text(json.dumps(config, indent=1))
            undo.callback(self._runtime, "delete", "--force", cid, check=False)
            undo.callback(self.fs.remove, cgroups_path(spec.instance_id))
            logs.close_partials(paths.log)  # a line the last run left open is not joined to this run's
            conmon.create(
                self.runtime,
                self.crun_root,
                cid,
                paths.bundle,
                paths.conmon,
                paths.pidfile,
                paths.log,
                self.config.log_max_bytes,
                meanwhile=network,
            )
            if spec.networks:
                # crun made the netns inside the container's user namespace (its
                # root mounts its own sysfs there); wire it before PID 1 starts.
                hosts = [veth.host_ifname(spec.short_id, i) for i in range(len(spec.networks))]
                undo.callback(veth.delete_links, hosts)
                try:
                    pid = int(paths.pidfile.read_text().strip())
                    veth.wire_netns(f"/proc/{pid}/ns/net", spec.short_id, spec.networks)
                except (NetworkError, OSError, ValueError) as exc:
                    raise DriverError(f"cannot set up the network of {spec.name}: {exc}") from exc
            paths.started.touch()
            self._start_created(cid)
            undo.pop_all()
        info = self._info(paths, spec.instance_id)
        if info.power_state not in (PowerState.RUNNING, PowerState.SHUTDOWN):
            raise DriverError(f"container {spec.name} did not start: {info.message}")
        return info

    def _mount_rootfs(self, paths: _Paths, base: int) -> None:
        """overlay(idmapped image layers, private upper) on ``bundle/rootfs``.

        Every path is given as ``/proc/self/fd/<n>`` (idmapped layer clones,
        upper and work dirs opened ``O_PATH``): overlay shows the strings it
        was given in mountinfo, so the container never sees a node path.
        """
        text = (paths.root / "lowerdir").read_text()
        layers = text.split("\n") if "\n" in text or not text.count(":") else text.split(":")
        fds: list[int] = []
        try:
            for layer in layers:
                fds.append(idmap.open_idmapped(Path(layer), base))
            upper = os.open(paths.upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            fds.append(upper)
            work = os.open(paths.work, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            fds.append(work)
            lower = ":".join(f"/proc/self/fd/{fd}" for fd in fds[:-2])
            opts = f"lowerdir={lower},upperdir=/proc/self/fd/{upper},workdir=/proc/self/fd/{work}"
            nsenv.mount("overlay", paths.rootfs, "overlay", nsenv.MS_NODEV, opts)
        except OSError as exc:
            raise DriverError(f"cannot mount the root file system of {paths.root.name}: {exc}") from exc
        finally:
            for fd in fds:
                os.close(fd)

    def _start_created(self, cid: str) -> None:
        """``crun start``, without its exec when possible.

        crun's created container blocks reading ``<root>/<id>/exec.fifo``;
        ``crun start`` only writes one byte to it and unlinks it (we set no
        poststart hooks).  Doing that here saves an exec (~9 ms of ~40).  Any
        surprise falls back to the real command.
        """
        fifo = self.crun_root / cid / "exec.fifo"
        if self.runtime == "crun" and self.fast_start:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                pass
            else:
                try:
                    fifo.unlink()
                    os.write(fd, b"0")
                    return
                except OSError:
                    pass
                finally:
                    os.close(fd)
        self._runtime("start", cid)

    def start(self, instance_id: str) -> InstanceInfo:
        with self._locked(instance_id) as paths:
            spec = self._load_spec(paths)
            info = self._info(paths, instance_id)
            if info.power_state in (PowerState.RUNNING, PowerState.PAUSED):
                return info
            for marker in (paths.stopped, paths.gave_up, paths.restarts):  # a new run, a new count
                marker.unlink(missing_ok=True)
            return self._launch(paths, spec)

    def stop(
        self, instance_id: str, timeout: float = 30.0, force: bool = False, force_after: bool = True
    ) -> InstanceInfo:
        if not force_after:
            raise NotSupported(
                "a container is stopped by its stop signal, then killed: no stop without the kill"
            )
        with self._locked(instance_id) as paths:
            self._load_spec(paths)
            paths.stopped.touch()  # before the signal: the supervisor must not restart it
            self._stop(paths, instance_id, timeout, force)
            return self._info(paths, instance_id)

    def _stop(self, paths: _Paths, instance_id: str, timeout: float, force: bool) -> None:
        pid = self._pid(paths, instance_id)
        if pid is not None:
            cg = cgroups_path(instance_id)
            with conmon.pidfd(pid) as pidfd:
                if pidfd is not None:
                    # A namespace's PID 1 never gets signals it has no handler
                    # for: without a handler for the stop signal waiting would be pointless.
                    sig = self._stop_signal(paths)
                    if not force and conmon.handles(pid, sig):
                        conmon.send(pidfd, sig)
                        _thaw_quiet(self.fs, cg)
                        select.select([pidfd], [], [], max(timeout, 0.0))
                    conmon.send(pidfd, signal.SIGKILL)
                    _thaw_quiet(self.fs, cg)
                    select.select([pidfd], [], [], 10.0)
            # conmon reaps PID 1 and then writes the exit code.
            deadline = time.monotonic() + 5.0
            while self._exit_code(paths) is None and time.monotonic() < deadline:
                time.sleep(0.005)
        if paths.started.exists() or (self.crun_root / container_id(instance_id)).exists():
            self._record_result(paths, instance_id)
            self._runtime("delete", "--force", container_id(instance_id), check=False)
            self.fs.remove(cgroups_path(instance_id))
            nsenv.forget_unified(cgroups_path(instance_id))

    def _stop_signal(self, paths: _Paths) -> signal.Signals:
        """The image's StopSignal (``SIGQUIT``, ``QUIT`` or ``3``), else SIGTERM."""
        try:
            name = self._image(self._load_spec(paths)).config.stop_signal.upper()
        except (DriverError, InstanceNotFound):
            return signal.SIGTERM
        return stop_signal(name)

    def reboot(self, instance_id: str) -> InstanceInfo:
        with self._locked(instance_id) as paths:
            spec = self._load_spec(paths)
            info = self._info(paths, instance_id)
            if info.power_state not in (PowerState.RUNNING, PowerState.PAUSED):
                raise InvalidState(f"container {spec.name} is not running ({info.power_state})")
            self._stop(paths, instance_id, timeout=10.0, force=False)
            return self._launch(paths, spec)

    def pause(self, instance_id: str) -> InstanceInfo:
        return self._freeze(instance_id, True)

    def resume(self, instance_id: str) -> InstanceInfo:
        return self._freeze(instance_id, False)

    def _freeze(self, instance_id: str, frozen: bool) -> InstanceInfo:
        with self._locked(instance_id) as paths:
            info = self._info(paths, instance_id)
            if info.power_state not in (PowerState.RUNNING, PowerState.PAUSED):
                raise InvalidState(
                    f"container is {info.power_state}, cannot {'pause' if frozen else 'resume'}"
                )
            cg = cgroups_path(instance_id)
            cgroups.freeze(self.fs, cg, frozen)
            deadline = time.monotonic() + 5.0
            while frozen and (self.fs.read("freezer", cg, "freezer.state") or "").strip() != "FROZEN":
                if time.monotonic() > deadline:
                    raise DriverError("the container did not freeze within 5 s")
                time.sleep(0.002)
            return self._info(paths, instance_id)

    def destroy(self, instance_id: str) -> None:
        with self._locked(instance_id) as paths:
            if paths.spec.exists() and self.config.log_retention_hours > 0:
                # kept for the retention period; the container's last words land there too
                logs.retain(paths.log, logs.retained_dir(self.config.state_dir, instance_id))
            self._teardown(paths, instance_id)
        with contextlib.suppress(FileNotFoundError):
            (self.locks / container_id(instance_id)).unlink()

    def _teardown(self, paths: _Paths, instance_id: str) -> None:
        """Kill and remove everything of the instance; safe on half-made ones."""
        with contextlib.suppress(InstanceNotFound):
            self._stop(paths, instance_id, timeout=0.0, force=True)
        cid = container_id(instance_id)
        self._runtime("delete", "--force", cid, check=False)
        conmon.kill(paths.conmon, cid)
        _umount_quiet(paths.rootfs)
        if paths.netns.exists():
            veth.release_netns(paths.netns)
        try:
            spec = self._load_spec(paths)
            veth.delete_links([veth.host_ifname(spec.short_id, i) for i in range(len(spec.networks))])
        except (InstanceNotFound, DriverError, ValueError):
            pass
        left = self.fs.remove(cgroups_path(instance_id))
        nsenv.forget_unified(cgroups_path(instance_id))
        shutil.rmtree(paths.root, ignore_errors=True)
        if left or paths.root.exists():
            raise DriverError(f"could not remove all of {cid}: {', '.join(left) or paths.root}")

    # -------------------------------------------------------------- volumes

    def _attached(self, paths: _Paths) -> list[dict[str, str]]:
        """The container's volumes as ``volumes.json`` lists them (volume_id, path, mount_path)."""
        try:
            items = json.loads(paths.volumes.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise DriverError(f"cannot read the volumes of {paths.root.name}: {exc}") from exc
        keys = {"volume_id", "path", "mount_path"}
        if not isinstance(items, list) or not all(isinstance(i, dict) and set(i) == keys for i in items):
            raise DriverError(f"the volume list of {paths.root.name} is malformed")
        return items

    @staticmethod
    def _write_attached(paths: _Paths, items: list[dict[str, str]]) -> None:
        tmp = paths.volumes.with_suffix(".tmp")
        tmp.write_text(json.dumps(items))
        os.replace(tmp, paths.volumes)

    def attach_volume(self, instance_id: str, volume_id: str, path: Path, mount_path: str = "") -> str:
        """Attach the ext4 volume file ``path`` at ``mount_path`` of a stopped container.

        The attachment is recorded in ``volumes.json``; each launch loop-mounts
        the file and bind-mounts it there.  The mount point is checked (and
        made) in the container's file system now, so a path through a
        symbolic link fails the attach, not the next start.  A running
        container is refused: there is no hot attach.
        """
        try:
            check_mount_path(mount_path)
        except MountPathError as exc:
            raise DriverError(str(exc)) from exc
        if path.suffix != ".ext4" or not path.is_file():
            raise DriverError(f"volume {volume_id} is not an ext4 volume file on this node")
        for vid, other in self.volume_attachments(path.parent):
            if vid == volume_id and other != instance_id:
                raise DriverError(f"volume {volume_id} is attached to container {container_id(other)}")
        with self._locked(instance_id) as paths:
            spec = self._load_spec(paths)
            items = self._attached(paths)
            for item in items:
                if item["volume_id"] == volume_id:
                    if item["mount_path"] == mount_path:
                        return mount_path  # a redelivered attach
                    raise DriverError(f"volume {volume_id} is already attached at {item['mount_path']}")
                if overlaps(item["mount_path"], mount_path):
                    raise DriverError(
                        f"{mount_path} overlaps volume {item['volume_id']} at {item['mount_path']}"
                    )
            info = self._info(paths, instance_id)
            if info.power_state in (PowerState.RUNNING, PowerState.PAUSED):
                raise InvalidState(
                    f"container {spec.name} is {info.power_state}: volumes attach to a stopped container "
                    "(no hot attach); stop it first"
                )
            base = id_base(spec)
            with contextlib.ExitStack() as transient:
                if not nsenv.is_mountpoint(paths.rootfs):
                    self._mount_rootfs(paths, base)
                    transient.callback(_umount_quiet, paths.rootfs)
                mount_point(paths.rootfs, mount_path, base)
            items.append({"volume_id": volume_id, "path": str(path), "mount_path": mount_path})
            self._write_attached(paths, items)
            return mount_path

    def detach_volume(self, instance_id: str, volume_id: str, path: Path) -> None:
        """Forget the volume of a stopped container (its mount went with the container's mount
        namespace when it stopped); succeeds when it is not attached or the container is gone."""
        if not self._paths(instance_id).spec.exists():
            return
        with self._locked(instance_id) as paths:
            spec = self._load_spec(paths)
            items = self._attached(paths)
            keep = [i for i in items if i["volume_id"] != volume_id]
            if len(keep) == len(items):
                return
            info = self._info(paths, instance_id)
            if info.power_state in (PowerState.RUNNING, PowerState.PAUSED):
                raise InvalidState(
                    f"container {spec.name} is {info.power_state}: volumes detach from a stopped container "
                    "(no hot detach); stop it first"
                )
            self._write_attached(paths, keep)

    def volume_attachments(self, volumes: Path) -> list[tuple[str, str]]:
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.base):
                iid = entry.name.removeprefix("sky-")
                if not (entry.name.startswith("sky-") and is_instance_id(iid)):
                    continue
                with contextlib.suppress(DriverError, NotADirectoryError):
                    for item in self._attached(_Paths(Path(entry.path))):
                        if Path(item["path"]).parent == volumes:
                            found.append((item["volume_id"], iid))
        return sorted(found)

    def _volumes_at_create(self, spec: InstanceSpec) -> list[dict[str, str]]:
        """The attachment list of the spec's volumes (checked like an attach; mount points at launch)."""
        root = self.config.state_dir / "volumes"
        taken = dict(self.volume_attachments(root))
        items = []
        for v in spec.volumes:
            path = root / f"{v.volume_id}.ext4"
            if not path.is_file():
                raise DriverError(f"volume {v.volume_id} is not an ext4 volume file on this node")
            if taken.get(v.volume_id, spec.instance_id) != spec.instance_id:
                raise DriverError(
                    f"volume {v.volume_id} is attached to container {container_id(taken[v.volume_id])}"
                )
            items.append({"volume_id": v.volume_id, "path": str(path), "mount_path": v.mount_path})
        return items

    def _mount_volumes(
        self, paths: _Paths, base: int, transient: contextlib.ExitStack
    ) -> tuple[tuple[str, str], ...]:
        """Loop-mount each attached volume under ``<volumes>/mnt/<id>`` (in this thread's private
        mount namespace, like the rootfs) and check its mount point; (mount path, source) pairs.

        crun's mount namespace keeps the mounts; the loop device is set up
        with autoclear by mount(8), so it goes when the container's mount
        namespace does (when the container stops).
        """
        out = []
        for item in self._attached(paths):
            source = Path(item["path"])
            if not source.is_file():
                raise DriverError(f"volume {item['volume_id']} has no file on this node")
            mount_point(paths.rootfs, item["mount_path"], base)
            mnt = source.parent / "mnt" / item["volume_id"]
            mnt.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not nsenv.is_mountpoint(mnt):
                proc = subprocess.run(
                    ["mount", "-t", "ext4", "-o", "loop,nodev,nosuid", str(source), str(mnt)],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                if proc.returncode != 0:
                    why = re.sub(r"\s+", " ", proc.stderr.strip())[-300:]
                    raise DriverError(f"cannot mount volume {item['volume_id']}: {why}")
            transient.callback(_umount_quiet, mnt)
            out.append((item["mount_path"], str(mnt)))
        return tuple(out)

    # ------------------------------------------------------------ snapshots

    def snapshot(self, instance_id: str, name: str) -> SnapshotInfo:
        raise NotSupported("container snapshots are not supported: build a new image instead")

    def revert(self, instance_id: str, name: str) -> InstanceInfo:
        raise NotSupported("container snapshots are not supported: nothing to revert to")

    def delete_snapshot(self, instance_id: str, name: str) -> None:
        raise NotSupported("container snapshots are not supported")

    def list_snapshots(self, instance_id: str, sizes: bool = False) -> list[SnapshotInfo]:
        self.info(instance_id)
        return []

    # ---------------------------------------------------------- observation

    def info(self, instance_id: str) -> InstanceInfo:
        paths = self._paths(instance_id)
        return self._info(paths, instance_id)

    def list(self) -> list[InstanceInfo]:
        out: list[InstanceInfo] = []
        if not self.base.exists():
            return out
        for d in sorted(self.base.iterdir()):
            iid = d.name.removeprefix("sky-")
            if d.name.startswith("sky-") and is_instance_id(iid):
                with contextlib.suppress(InstanceNotFound):
                    out.append(self._info(_Paths(d), iid))
        return out

    def supervise(self, now: float | None = None) -> tuple[str, ...]:
        """Apply each ended container's restart policy; return the ids restarted or given up.

        Restarts back off (0.25 s doubling, at most 8 s after the exit); a
        container that ran 10 s or more before it ended starts a new count.
        When the policy's restarts are used up the container stays down,
        ``crashed``, with the last exit code and output in its message.
        """
        now = time.time() if now is None else now
        acted = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.base):
                iid = entry.name.removeprefix("sky-")
                if not (entry.name.startswith("sky-") and is_instance_id(iid)):
                    continue
                paths = _Paths(Path(entry.path))
                if not paths.exit.exists() or paths.stopped.exists() or paths.gave_up.exists():
                    continue
                with contextlib.suppress(InstanceNotFound, DriverError, OSError):
                    if self._supervise_one(paths, iid, now):
                        acted.append(iid)
        return tuple(acted)

    def _supervise_one(self, paths: _Paths, instance_id: str, now: float) -> bool:
        # Under the instance lock: an action (stop, destroy) may be on this container right now,
        # and nothing may be written into a directory that a destroy is removing.
        with self._locked(instance_id) as locked:
            if not locked.spec.exists() or not locked.exit.exists() or locked.stopped.exists():
                return False
            if self._pid(locked, instance_id) is not None:
                return False  # started again meanwhile
            spec = self._load_spec(locked)
            mode, limit = restart_rule(spec.restart_policy)
            code = self._exit_code(locked)
            if mode == "no" or code is None or (mode == "on-failure" and code == 0):
                locked.stopped.touch()  # the policy is done with it: skip it from now on
                return False
            exited = locked.exit.stat().st_mtime
            started = mtime(locked.started) or exited
            restarts = read_int(locked.restarts) or 0
            if exited - started >= CRASH_WINDOW:
                restarts = 0  # it ran a good while: not a crash loop
            if restarts >= limit:
                locked.gave_up.touch()
                return True
            if now < exited + min(0.25 * 2**restarts, 8.0):
                return False  # backing off
            self._stop(locked, instance_id, timeout=0.0, force=True)  # crun delete, cgroup gone
            locked.restarts.write_text(str(restarts + 1))
            self._launch(locked, spec)
        return True

    def exit_marks(self) -> frozenset[tuple[str, float]]:
        """(container, time) of every exit file conmon has written: a change means a container ended.

        Cheap enough to poll several times a second (one ``stat`` per container),
        so the node reports an exit at once, not at the next heartbeat.
        """
        marks = set()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.base):
                if entry.name.startswith("sky-"):
                    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                        marks.add((entry.name, os.stat(os.path.join(entry.path, "conmon", "exit")).st_mtime))
        return frozenset(marks)

    def stats(self, instance_id: str) -> Stats:
        paths = self._paths(instance_id)
        spec = self._load_spec(paths)
        s = cgroups.read_stats(self.fs, cgroups_path(instance_id))
        if s is None or self._pid(paths, instance_id) is None:
            return Stats(cpu_time_ns=0, memory_bytes=0, memory_limit_bytes=spec.ram_mb * 1024 * 1024, pids=0)
        return Stats(
            cpu_time_ns=s.cpu_time_ns,
            memory_bytes=s.memory_bytes,
            memory_peak_bytes=s.memory_peak_bytes,
            memory_limit_bytes=s.memory_limit_bytes,
            pids=s.pids,
        )

    def exec_argv(self, instance_id: str, command: tuple[str, ...], tty: bool) -> tuple[str, ...]:
        # `crun exec` joins every namespace of PID 1 (the user namespace too) and its cgroup, and takes
        # the container's process settings (capabilities, seccomp, no_new_privs) from its config.
        paths = self._paths(instance_id)
        self._load_spec(paths)
        if self._pid(paths, instance_id) is None:
            raise InvalidState(f"container {container_id(instance_id)} is not running")
        if not command:
            raise DriverError("exec needs a command")
        flags = ["--tty"] if tty else []
        nsenv.enter_private_mount_ns()  # crun refuses hybrid cgroups; the caller spawns it from here
        return (self.runtime, f"--root={self.crun_root}", "exec", *flags, container_id(instance_id), *command)

    def console_log(self, instance_id: str, max_bytes: int = 65536) -> str:
        paths = self._paths(instance_id)
        if not paths.spec.exists():
            raise InstanceNotFound(f"no container {paths.root.name} on this node")
        return paths.log_text(max_bytes) or ""

    def logs(self, instance_id: str, selection: logs.Selection) -> logs.Reading:
        """(lines, truncated, retained): see :meth:`Driver.logs`."""
        paths = self._paths(instance_id)
        retained = False
        if paths.spec.exists():
            path = paths.log
            logs.keep_generation(path)
        else:
            kept = logs.retained_dir(self.config.state_dir, instance_id)
            if not (kept / "deleted").exists():
                raise InstanceNotFound(f"no container {paths.root.name} on this node, and no kept logs")
            path, retained = kept / paths.log.name, True
        lines, truncated = logs.read_selection(path, selection)
        return lines, truncated, retained

    def keep_logs(self, now: float | None = None) -> tuple[str, ...]:
        """Keep each log's replaced generation; drop deleted containers' logs past retention.

        Returns the instance ids whose kept logs were removed.
        """
        for path in logs.each_log(self.base, _Paths(Path()).log.name):
            with contextlib.suppress(OSError):
                logs.keep_generation(path)
        root = self.config.state_dir / "logs" / "containers"
        return tuple(logs.sweep(root, self.config.log_retention_hours * 3600, now))


# ---------------------------------------------------------------- utilities


def exit_reason(code: int) -> str:
    """``exited with code 3`` or ``killed by SIGKILL (exit code 137)``."""
    if code > 128:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(code - 128).name} (exit code {code})"
    return f"exited with code {code}"


def last_lines(paths: _Paths, lines: int = 5, max_chars: int = 600) -> str:
    """The last few lines of a container's output, joined by `` | `` (for reasons and events)."""
    text = paths.log_text(8192) or ""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    out = " | ".join(kept)
    return out[-max_chars:]


def stop_signal(name: str) -> signal.Signals:
    """A StopSignal value as a signal; SIGTERM when empty or unknown."""
    name = name.strip().upper()
    try:
        if name.isdigit():
            return signal.Signals(int(name))
        return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except (KeyError, ValueError):
        return signal.SIGTERM


def mount_point(rootfs: Path, mount_path: str, owner: int) -> None:
    """Make sure ``mount_path`` is a directory inside ``rootfs`` reached without any symbolic link.

    Each component is looked up from the previous one's ``O_PATH`` fd with
    ``AT_SYMLINK_NOFOLLOW``: a link (``/data -> ../../..``, planted in the
    image or by an earlier run of the container) is refused, never followed,
    so a mount can never land outside the rootfs.  Missing directories are
    made, owned by the container's root (``owner``), mode 0755.
    """
    fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = ""
    try:
        for name in mount_path.strip("/").split("/"):
            walked += "/" + name
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                os.mkdir(name, 0o755, dir_fd=fd)
                os.chown(name, owner, owner, dir_fd=fd, follow_symlinks=False)
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise DriverError(
                    f"cannot mount a volume at {mount_path}: {walked} is a symbolic link in the container's "
                    "file system (links are not followed); choose another path"
                )
            if not stat.S_ISDIR(st.st_mode):
                raise DriverError(f"cannot mount a volume at {mount_path}: {walked} is not a directory")
            nfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except OSError as exc:
        raise DriverError(f"cannot make the mount point {mount_path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def _umount_quiet(path: Path) -> None:
    while nsenv.is_mountpoint(path):
        try:
            nsenv.umount(path)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return
            raise


def _thaw_quiet(fs: cgroups.SysCgroupFS, path: str) -> None:
    with contextlib.suppress(OSError):
        if cgroups.frozen(fs, path):
            cgroups.freeze(fs, path, False)
