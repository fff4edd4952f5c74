"""Node settings, read from the environment only."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
from pathlib import Path


class ConfigError(ValueError):
    """A node setting has a value the node cannot use."""


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(allowed)}")
    return value


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """Settings of one compute node.

    ``state_dir`` holds everything the node owns (image cache, instance
    disks, bundles, logs); it must be traversable by the QEMU user.
    ``tunnel_address`` is the node's underlay IPv4 address for VXLAN
    (``SKYPORT_TUNNEL_ADDRESS``); empty when the node does not tunnel.
    """

    name: str
    state_dir: Path
    libvirt_uri: str
    accelerator: str  # auto | kvm | qemu
    container_runtime: str  # crun | runc
    broker_url: str
    tunnel_address: str = ""

    @property
    def queue(self) -> str:
        return f"node.{self.name}"

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
        return cls(
            name=name,
            state_dir=state,
            libvirt_uri=os.environ.get("SKYPORT_LIBVIRT_URI", "qemu:///system"),
            accelerator=_choice("SKYPORT_ACCEL", "auto", ("auto", "kvm", "qemu")),
            container_runtime=_choice("SKYPORT_CONTAINER_RUNTIME", "crun", ("crun", "runc")),
            broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
            tunnel_address=tunnel,
        )
