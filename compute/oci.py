"""OCI runtime ``config.json`` built from typed objects (never from strings).

:func:`runtime_config` turns a :class:`BundleSpec` into the dict crun reads.
Security defaults live here: a user namespace whose root is an unprivileged
host range, Docker's default capability set inside it, ``noNewPrivileges``,
a seccomp deny-list, masked and read-only ``/proc`` and ``/sys`` paths,
devices deny-all except the standard character devices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from compute.spec import ID_RANGE_MIN, ID_RANGE_SIZE

# Capabilities root inside the container's user namespace keeps (Docker's
# default set, without NET_RAW and MKNOD).  They act only on objects that
# namespace owns: its mounts, its pid/ipc/uts namespaces, files of its own id
# range; never on the host.  A non-root user gets none in effect (they are
# bounding/permitted only for uid 0, as in Docker); inheritable and ambient
# stay empty, so exec'd programs regain nothing.
DEFAULT_CAPS: tuple[str, ...] = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_NET_BIND_SERVICE",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_SETFCAP", "CAP_SYS_CHROOT", "CAP_AUDIT_WRITE",
)  # fmt: skip

# Syscalls that let a process reach the host kernel's global state or other
# namespaces.  Denied with EPERM; everything else is allowed.
DENIED_SYSCALLS: tuple[str, ...] = (
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module", "delete_module",
    "finit_module", "fsconfig", "fsmount", "fsopen", "fspick", "get_kernel_syms", "get_mempolicy",
    "init_module", "io_uring_enter", "io_uring_register", "io_uring_setup", "ioperm", "iopl", "kcmp",
    "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie", "mbind", "mount", "mount_setattr",
    "move_mount", "move_pages", "name_to_handle_at", "nfsservctl", "open_by_handle_at", "open_tree",
    "perf_event_open", "personality", "pivot_root", "process_vm_readv", "process_vm_writev", "ptrace",
    "query_module", "quotactl", "reboot", "request_key", "set_mempolicy", "setns", "settimeofday",
    "stime", "swapoff", "swapon", "sysfs", "_sysctl", "umount", "umount2", "unshare", "uselib",
    "userfaultfd", "ustat", "vm86", "vm86old",
)  # fmt: skip

MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
    "/sys/fs/selinux", "/sys/dev/block",
)  # fmt: skip
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

# (path, major, minor) of the character devices every container gets.
STANDARD_DEVICES = (
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
)

CPU_PERIOD_US = 100_000
# Paths inside the container, private tmpfs each.
SHM = "/dev/shm"  # noqa: S108
TMP = "/tmp"  # noqa: S108


@dataclasses.dataclass(frozen=True)
class BundleSpec:
    """Everything that varies between containers."""

    hostname: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    uid: int  # inside the user namespace
    gid: int
    cgroups_path: str
    memory_bytes: int
    cpu_quota_percent: int
    pids_limit: int
    cwd: str = "/"
    netns_path: str | None = None
    rootfs: str = "rootfs"
    tmp_size_mb: int = 16
    readonly_rootfs: bool = False
    capabilities: tuple[str, ...] = DEFAULT_CAPS
    id_base: int = 0  # host uid/gid of root inside
    id_size: int = ID_RANGE_SIZE
    additional_gids: tuple[int, ...] = ()
    resolv_conf: str | None = None  # host file bind-mounted read-only on /etc/resolv.conf
    # (destination inside, host directory): volumes bind-mounted read-write, nosuid, nodev
    volumes: tuple[tuple[str, str], ...] = ()


def _mount(dest: str, fstype: str, source: str, options: tuple[str, ...]) -> dict[str, Any]:
    return {"destination": dest, "type": fstype, "source": source, "options": list(options)}


def runtime_config(b: BundleSpec) -> dict[str, Any]:
    if b.id_base < ID_RANGE_MIN or b.id_size < 1 or b.id_base + b.id_size > 2**32:
        raise ValueError(f"containers run in a user namespace of an unprivileged id range, not {b.id_base}")
    if not (0 <= b.uid < b.id_size and 0 <= b.gid < b.id_size):
        raise ValueError(f"user {b.uid}:{b.gid} is outside the container's id range (0..{b.id_size - 1})")
    if not b.args:
        raise ValueError("a container needs a command")
    caps = list(b.capabilities)
    # Like Docker: a non-root user starts with no effective capabilities.
    effective = caps if b.uid == 0 else []
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("user", "pid", "ipc", "uts", "mount", "cgroup")]
    namespaces.append({"type": "network", "path": b.netns_path} if b.netns_path else {"type": "network"})
    device_rules: list[dict[str, Any]] = [{"allow": False, "access": "rwm"}]
    device_rules += [
        {"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"}
        for _, major, minor in STANDARD_DEVICES
    ]
    device_rules.append({"allow": True, "type": "c", "major": 136, "access": "rwm"})  # /dev/pts/*
    device_rules.append({"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"})  # ptmx
    return {
        "ociVersion": "1.0.2",
        "hostname": b.hostname,
        "root": {"path": b.rootfs, "readonly": b.readonly_rootfs},
        "process": {
            "terminal": False,
            "user": {"uid": b.uid, "gid": b.gid, "additionalGids": list(b.additional_gids)},
            "args": list(b.args),
            "env": [f"{k}={v}" for k, v in b.env],
            "cwd": b.cwd or "/",
            "capabilities": {
                "bounding": caps,
                "permitted": effective,
                "effective": effective,
                "inheritable": [],
                "ambient": [],
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 1024}],
            "noNewPrivileges": True,
            "oomScoreAdj": 500,
        },
        "mounts": [
            _mount("/proc", "proc", "proc", ("nosuid", "noexec", "nodev")),
            _mount("/dev", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
            _mount(
                "/dev/pts",
                "devpts",
                "devpts",
                ("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"),
            ),
            _mount(SHM, "tmpfs", "shm", ("nosuid", "noexec", "nodev", "mode=1777", "size=8m")),
            _mount("/dev/mqueue", "mqueue", "mqueue", ("nosuid", "noexec", "nodev")),
            _mount("/sys", "sysfs", "sysfs", ("nosuid", "noexec", "nodev", "ro")),
            _mount(TMP, "tmpfs", "tmpfs", ("nosuid", "nodev", "mode=1777", f"size={b.tmp_size_mb}m")),
            *(
                [
                    _mount(
                        "/etc/resolv.conf",
                        "bind",
                        b.resolv_conf,
                        ("rbind", "ro", "nosuid", "nodev", "noexec"),
                    )
                ]
                if b.resolv_conf
                else []
            ),
            *(_mount(dest, "bind", source, ("bind", "rw", "nosuid", "nodev")) for dest, source in b.volumes),
        ],
        "linux": {
            "namespaces": namespaces,
            "uidMappings": [{"containerID": 0, "hostID": b.id_base, "size": b.id_size}],
            "gidMappings": [{"containerID": 0, "hostID": b.id_base, "size": b.id_size}],
            "cgroupsPath": b.cgroups_path,
            "resources": {
                "devices": device_rules,
                "memory": {"limit": b.memory_bytes, "swap": b.memory_bytes},
                "cpu": {"quota": CPU_PERIOD_US * b.cpu_quota_percent // 100, "period": CPU_PERIOD_US},
                "pids": {"limit": b.pids_limit},
            },
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
            "rootfsPropagation": "private",
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "syscalls": [{"names": list(DENIED_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
            },
        },
    }
