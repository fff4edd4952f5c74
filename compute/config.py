"""Node settings, read from the environment only, and only here.

Every variable a compute node reads is a field of :class:`NodeConfig`;
``from_env`` checks each and names the variable when a value is unusable.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
from pathlib import Path

from compute import celeryconf


class ConfigError(ValueError):
    """A node setting has a value the node cannot use."""


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(allowed)}")
    return value


def seconds(name: str, default: float) -> float:
    """A positive, finite number of seconds from the environment, else ConfigError naming the variable."""
    raw = os.environ.get(name, "").strip() or str(default)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={raw!r}: expected a positive number of seconds")
    return value


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """Settings of one compute node.

    ``state_dir`` holds everything the node owns (image cache, instance
    disks, bundles, logs); it must be traversable by the QEMU user.
    ``tunnel_address`` is the node's underlay IPv4 address for VXLAN
    (``SKYPORT_TUNNEL_ADDRESS``); empty when the node does not tunnel.
    ``node_key`` authenticates the node to the portal's blob endpoint
    (``SKYPORT_NODE_KEY``, printed by ``manage.py node key``).  The heartbeat
    period and the broker's visibility timeout must match the portal's
    (``SKYPORT_HEARTBEAT_SECONDS``, ``SKYPORT_BROKER_VISIBILITY_SECONDS``).
    ``network_lock`` is the host-wide lock file of network changes.
    ``uplink`` is the interface egress traffic is source-NATed onto
    (``SKYPORT_UPLINK``; empty, the default, means no egress at all);
    ``nft_table`` names Skyport's own nftables tables (``inet`` and
    ``bridge`` families, ``SKYPORT_NFT_TABLE``, default ``skyport``);
    ``dns_servers`` are the upstream resolvers the networks' resolvers
    forward to (``SKYPORT_DNS_SERVERS``, comma-separated; none: they answer
    only the networks' instance names).
    ``log_max_bytes`` caps each container's log file (``SKYPORT_LOG_MAX_BYTES``,
    2 MiB; the node keeps one previous file too) and ``log_retention_hours``
    says how long a deleted container's logs stay readable
    (``SKYPORT_LOG_RETENTION_HOURS``, 72; the portal reads the same variable).
    ``network_idle_seconds``: a network no instance of this node has used for
    that long is released (bridge, VXLAN device, resolver, rules;
    ``SKYPORT_NETWORK_IDLE_SECONDS``, default 300).
    ``libvirt_netns`` is the network namespace libvirtd runs in when it is
    not this node's (``SKYPORT_LIBVIRT_NETNS``, e.g. ``/proc/1/ns/net``;
    empty, the default, for a node in libvirtd's own namespace).  Set, VM
    NICs are unbridged taps libvirtd makes there, which the driver moves into
    this node's namespace and onto the network's bridge after QEMU opened
    them (the multi-node tests simulate hosts with namespaces on one libvirtd).
    ``broker_master`` names the primary the sentinels watch when ``broker_url``
    lists ``sentinel://`` URLs (``SKYPORT_BROKER_MASTER``; compute/celeryconf.py).
    """

    name: str
    state_dir: Path
    libvirt_uri: str
    accelerator: str  # auto | kvm | qemu
    container_runtime: str  # crun | runc
    broker_url: str
    tunnel_address: str = ""
    node_key: str = ""
    heartbeat_seconds: float = 5.0
    visibility_timeout_seconds: float = 300.0
    network_lock: Path = Path("/run/lock/skyport-network.lock")
    uplink: str = ""
    nft_table: str = "skyport"
    dns_servers: tuple[str, ...] = ()
    broker_master: str = ""
    log_max_bytes: int = 2 << 20
    log_retention_hours: float = 72.0
    network_idle_seconds: float = 300.0
    libvirt_netns: str = ""

    @property
    def queue(self) -> str:
        return f"node.{self.name}"

    def as_env(self) -> dict[str, str]:
        """The environment :meth:`from_env` reads back as this config (for processes a node starts)."""
        return {
            "SKYPORT_NODE_NAME": self.name,
            "SKYPORT_NODE_DIR": str(self.state_dir),
            "SKYPORT_LIBVIRT_URI": self.libvirt_uri,
            "SKYPORT_ACCEL": self.accelerator,
            "SKYPORT_CONTAINER_RUNTIME": self.container_runtime,
            "CELERY_BROKER_URL": self.broker_url,
            "SKYPORT_TUNNEL_ADDRESS": self.tunnel_address,
            "SKYPORT_NODE_KEY": self.node_key,
            "SKYPORT_HEARTBEAT_SECONDS": str(self.heartbeat_seconds),
            "SKYPORT_BROKER_VISIBILITY_SECONDS": str(self.visibility_timeout_seconds),
            "SKYPORT_NETWORK_LOCK": str(self.network_lock),
            "SKYPORT_BROKER_MASTER": self.broker_master,
            "SKYPORT_LOG_MAX_BYTES": str(self.log_max_bytes),
            "SKYPORT_LOG_RETENTION_HOURS": str(int(self.log_retention_hours)),
            "SKYPORT_NETWORK_IDLE_SECONDS": str(self.network_idle_seconds),
            "SKYPORT_LIBVIRT_NETNS": self.libvirt_netns,
        }

    @classmethod
    def from_env(cls) -> NodeConfig:
        name = os.environ.get("SKYPORT_NODE_NAME", socket.gethostname().split(".")[0]).strip()
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ConfigError(f"SKYPORT_NODE_NAME={name!r}: use letters, digits, '-' and '_'")
        state = Path(os.environ.get("SKYPORT_NODE_DIR", f"/var/lib/skyport/nodes/{name}"))
        tunnel = os.environ.get("SKYPORT_TUNNEL_ADDRESS", "").strip()
        if tunnel:
            try:
                tunnel = str(ipaddress.IPv4Address(tunnel))
            except ValueError:
                raise ConfigError(
                    f"SKYPORT_TUNNEL_ADDRESS={tunnel!r}: expected this node's underlay IPv4 address"
                ) from None
        uplink = os.environ.get("SKYPORT_UPLINK", "").strip()
        if uplink and not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", uplink):
            raise ConfigError(f"SKYPORT_UPLINK={uplink!r}: expected an interface name")
        table = os.environ.get("SKYPORT_NFT_TABLE", "skyport").strip()
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,31}", table):
            raise ConfigError(f"SKYPORT_NFT_TABLE={table!r}: expected letters, digits and '_'")
        servers = tuple(s.strip() for s in os.environ.get("SKYPORT_DNS_SERVERS", "").split(",") if s.strip())
        for server in servers:
            try:
                ipaddress.IPv4Address(server)
            except ValueError:
                raise ConfigError(f"SKYPORT_DNS_SERVERS: {server!r} is not an IPv4 address") from None
        broker_url = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
        broker_master = os.environ.get("SKYPORT_BROKER_MASTER", "").strip()
        visibility = seconds("SKYPORT_BROKER_VISIBILITY_SECONDS", 300.0)
        try:  # the same check the portal makes at start-up, naming the variable to fix
            celeryconf.broker_settings(broker_url, visibility, broker_master or None)
        except celeryconf.BrokerConfigError as exc:
            raise ConfigError(str(exc)) from None
        return cls(
            name=name,
            state_dir=state,
            libvirt_uri=os.environ.get("SKYPORT_LIBVIRT_URI", "qemu:///system"),
            accelerator=_choice("SKYPORT_ACCEL", "auto", ("auto", "kvm", "qemu")),
            container_runtime=_choice("SKYPORT_CONTAINER_RUNTIME", "crun", ("crun", "runc")),
            broker_url=broker_url,
            tunnel_address=tunnel,
            node_key=os.environ.get("SKYPORT_NODE_KEY", "").strip(),
            heartbeat_seconds=seconds("SKYPORT_HEARTBEAT_SECONDS", 5.0),
            visibility_timeout_seconds=visibility,
            network_lock=Path(os.environ.get("SKYPORT_NETWORK_LOCK", "/run/lock/skyport-network.lock")),
            uplink=uplink,
            nft_table=table,
            dns_servers=servers,
            broker_master=broker_master,
            log_max_bytes=_log_max_bytes(),
            log_retention_hours=_retention_hours(),
            network_idle_seconds=seconds("SKYPORT_NETWORK_IDLE_SECONDS", 300.0),
            libvirt_netns=os.environ.get("SKYPORT_LIBVIRT_NETNS", "").strip(),
        )


def _log_max_bytes() -> int:
    raw = os.environ.get("SKYPORT_LOG_MAX_BYTES", "").strip() or str(2 << 20)
    if not raw.isdigit() or not 65536 <= int(raw) <= 1 << 30:
        raise ConfigError(f"SKYPORT_LOG_MAX_BYTES={raw!r}: expected a number of bytes within 64 KiB..1 GiB")
    return int(raw)


def _retention_hours() -> float:
    raw = os.environ.get("SKYPORT_LOG_RETENTION_HOURS", "").strip() or "72"
    if not raw.isdigit() or int(raw) > 24 * 366:
        raise ConfigError(f"SKYPORT_LOG_RETENTION_HOURS={raw!r}: expected whole hours within 0..8784")
    return float(raw)
