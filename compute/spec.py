"""The message contract between the portal (control plane) and compute nodes.

Everything that crosses the Celery broker between ``portal/`` and ``compute/``
is one of these dataclasses turned into plain JSON with :func:`to_json` and
back with the class's ``from_json``.  A node sees only the specs of its own
instances; it never touches the portal's database.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from collections.abc import Mapping
from typing import Any, TypeVar

SPEC_VERSION = 1

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
#: how instance ids look on the wire and in node-side names (a lower-case UUID)
UUID_RE = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}")


class SpecError(ValueError):
    """A spec or observation that does not satisfy the contract."""


class Kind(enum.StrEnum):
    """Isolation technology of an instance."""

    VM = "vm"
    CONTAINER = "container"


class PowerState(enum.StrEnum):
    """Power state as last seen on the node (the node is the authority)."""

    NOSTATE = "nostate"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    CRASHED = "crashed"
    SUSPENDED = "suspended"


class ImageFormat(enum.StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"
    OCI = "oci"


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """An image artifact the node must have before it can spawn.

    ``digest`` is ``sha256:<hex>`` of the artifact file.  ``location`` is
    where the node gets it: an absolute local path (sample images built on the
    node) or an ``http(s)://`` URL on the portal's authenticated artifact
    endpoint.
    """

    name: str
    version: str
    format: ImageFormat
    digest: str
    location: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", self.digest):
            raise SpecError(f"image digest must be sha256:<64 hex>, got {self.digest!r}")


#: VXLAN network identifiers are 24 bits; 0 is not used.
VNI_MAX = 2**24 - 1


def _check_ipv4(what: str, value: str) -> None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise SpecError(f"{what} must be an IPv4 address, got {value!r}") from None


def _check_bridge(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", name):
        raise SpecError(f"bridge name must be 1-15 of [A-Za-z0-9_.-], got {name!r}")


def _check_tunnel(vni: int | None, local: str | None, peers: tuple[str, ...]) -> None:
    if vni is not None and (isinstance(vni, bool) or not isinstance(vni, int) or not 1 <= vni <= VNI_MAX):
        raise SpecError(f"vni must be an integer within 1..{VNI_MAX}, got {vni!r}")
    if local is not None:
        _check_ipv4("tunnel_local", local)
        if vni is None:
            raise SpecError("tunnel_local needs a vni")
    if peers and local is None:
        raise SpecError("tunnel_peers need a tunnel_local address")
    for peer in peers:
        _check_ipv4("each tunnel peer", peer)
        if peer == local:
            raise SpecError(f"tunnel peer {peer} is this node's own tunnel address")
    if len(set(peers)) != len(peers):
        raise SpecError(f"tunnel peers must be distinct, got {list(peers)}")


@dataclasses.dataclass(frozen=True)
class NetworkSegment:
    """A tenant network as one node carries it: bridge, host address, VXLAN tunnel.

    ``vni`` identifies the network's VXLAN segment; ``tunnel_local`` is this
    node's underlay address (``None``: the node does not tunnel, the network
    stays on its bridge) and ``tunnel_peers`` the underlay addresses of the
    other nodes that carry the network: broadcast, unknown-unicast and
    multicast frames are copied to each of them (head-end replication).
    The list is complete: a node drops peers that are not in it.
    """

    network: str
    bridge: str
    mtu: int = 1500
    host_address: str | None = None
    vni: int | None = None
    tunnel_local: str | None = None
    tunnel_peers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_bridge(self.bridge)
        if not 576 <= self.mtu <= 9000:
            raise SpecError(f"mtu must be within 576..9000, got {self.mtu!r}")
        if self.host_address is not None and "/" not in self.host_address:
            raise SpecError(f"host_address needs a prefix length, got {self.host_address!r}")
        _check_tunnel(self.vni, self.tunnel_local, self.tunnel_peers)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NetworkSegment:
        return _from_json(cls, data)


@dataclasses.dataclass(frozen=True)
class NetworkAttachment:
    """One NIC of an instance on a tenant network.

    ``bridge`` is the Linux bridge on the node for this network (at most 15
    characters), ``address`` an interface address with prefix length
    (``198.18.0.10/24``), ``gateway`` optional (no default route without it).
    ``host_address`` (with prefix) is this node's own address on the bridge,
    so the host reaches its instances; the node does not forward for them.
    ``vni``, ``tunnel_local`` and ``tunnel_peers`` describe the network's
    VXLAN segment as in :class:`NetworkSegment`.
    """

    network: str
    bridge: str
    address: str
    mac: str
    gateway: str | None = None
    mtu: int = 1500
    host_address: str | None = None
    vni: int | None = None
    tunnel_local: str | None = None
    tunnel_peers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_bridge(self.bridge)
        if not re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", self.mac):
            raise SpecError(f"mac must be lower-case aa:bb:cc:dd:ee:ff, got {self.mac!r}")
        if "/" not in self.address:
            raise SpecError(f"address needs a prefix length, got {self.address!r}")
        _check_tunnel(self.vni, self.tunnel_local, self.tunnel_peers)

    @property
    def segment(self) -> NetworkSegment:
        """The node-wide part of the attachment (the same for every NIC on the network)."""
        return NetworkSegment(
            network=self.network,
            bridge=self.bridge,
            mtu=self.mtu,
            host_address=self.host_address,
            vni=self.vni,
            tunnel_local=self.tunnel_local,
            tunnel_peers=self.tunnel_peers,
        )


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    """What a node needs to create one instance (VM or container).

    ``instance_id`` is the portal's UUID and the idempotency key: a node that
    receives the same spec twice ends with one workload.
    """

    instance_id: str
    name: str
    hostname: str
    tenant: str
    kind: Kind
    vcpus: int
    ram_mb: int
    disk_gb: int
    image: ImageRef
    networks: tuple[NetworkAttachment, ...] = ()
    ssh_keys: tuple[str, ...] = ()
    user_data: str | None = None
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cpu_quota_percent: int = 100
    pids_limit: int = 1024
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if not UUID_RE.fullmatch(self.instance_id):
            raise SpecError(f"instance_id must be a lower-case UUID, got {self.instance_id!r}")
        if not _NAME_RE.match(self.hostname):
            raise SpecError(f"hostname must be an RFC 1123 label, got {self.hostname!r}")
        if self.vcpus < 1 or self.ram_mb < 16 or self.disk_gb < 0:
            raise SpecError("vcpus >= 1, ram_mb >= 16 and disk_gb >= 0 are required")
        if not 1 <= self.cpu_quota_percent <= 100 * self.vcpus:
            raise SpecError("cpu_quota_percent must be within 1..100*vcpus")
        if self.pids_limit < 8:
            raise SpecError("pids_limit must be at least 8")

    @property
    def short_id(self) -> str:
        """First 8 hex digits of the id: used in host-side names (taps, veths)."""
        return self.instance_id[:8]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InstanceSpec:
        return _from_json(cls, data)


@dataclasses.dataclass(frozen=True)
class Observation:
    """What a node saw after acting on an instance, sent to the control queue.

    ``action_id`` ties the observation to the request that caused it, so a
    duplicate delivery can be recognised and ignored.  ``ok`` is false when
    the action failed; ``message`` then says why in one sentence.
    """

    instance_id: str
    node: str
    action: str
    action_id: str
    ok: bool
    power_state: PowerState
    message: str = ""
    observed_at: float = 0.0
    details: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Observation:
        return _from_json(cls, data)


@dataclasses.dataclass(frozen=True)
class InventoryItem:
    """One workload a node actually has, for reconcile."""

    instance_id: str
    kind: Kind
    power_state: PowerState
    # counters at the time of the report (0 when the driver could not read them)
    cpu_time_ns: int = 0
    memory_bytes: int = 0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InventoryItem:
        return _from_json(cls, data)


@dataclasses.dataclass(frozen=True)
class NodeReport:
    """Heartbeat of a compute node: capacity, driver health and inventory."""

    node: str
    queue: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    drivers: tuple[tuple[str, bool, str], ...]
    inventory: tuple[InventoryItem, ...] = ()
    sent_at: float = 0.0
    # Digests the node holds: VM base disks in its image cache and unpacked container layers.
    cached: tuple[str, ...] = ()
    # The node's underlay IPv4 address for VXLAN tunnels; "" when it does not tunnel.
    tunnel_address: str = ""

    def __post_init__(self) -> None:
        if self.tunnel_address:
            _check_ipv4("tunnel_address", self.tunnel_address)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NodeReport:
        return _from_json(cls, data)


def to_json(obj: Any) -> Any:
    """Turn a spec dataclass (recursively) into JSON-compatible values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [to_json(v) for v in obj]
    return obj


_T = TypeVar("_T")

_NESTED: dict[tuple[str, str], type] = {}


def _from_json(cls: type[_T], data: Mapping[str, Any]) -> _T:
    if not isinstance(data, Mapping):
        raise SpecError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise SpecError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _convert(cls.__name__, name, value)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise SpecError(f"{cls.__name__}: {exc}") from exc


_ENUMS: dict[str, type[enum.Enum]] = {"kind": Kind, "format": ImageFormat, "power_state": PowerState}


def _convert(owner: str, name: str, value: Any) -> Any:
    nested = _NESTED.get((owner, name))
    if nested is not None and isinstance(value, list):
        return tuple(_from_json(nested, v) for v in value)
    if nested is not None:
        return _from_json(nested, value)
    if name in _ENUMS:
        try:
            return _ENUMS[name](value)
        except ValueError as exc:
            raise SpecError(f"{owner}.{name}: {exc}") from exc
    if isinstance(value, list):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


_NESTED.update(
    {
        ("InstanceSpec", "image"): ImageRef,
        ("InstanceSpec", "networks"): NetworkAttachment,
        ("NodeReport", "inventory"): InventoryItem,
    }
)
