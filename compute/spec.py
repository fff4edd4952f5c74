"""The message contract between the portal (control plane) and compute nodes.

Everything that crosses the Celery broker between ``portal/`` and ``compute/``
is one of these dataclasses turned into plain JSON with :func:`to_json` and
back with :func:`from_json` (one function for every class: nested types come
from the annotations).  Each message names its Celery task (:class:`Task`),
so the sender and the worker cannot disagree on a string; every task takes
exactly one argument, the message's JSON.  A node sees only the specs of its
own instances; it never touches the portal's database.

Portal -> node: :class:`CreateInstance`, :class:`InstanceAction`,
:class:`DeleteInstance`, :class:`ConsoleRequest`, :class:`NetworkSegment`,
:class:`InstanceForwards`, :class:`InstanceSecurity`.
Node -> portal: :class:`Observation`, :class:`NodeReport`, :class:`ConsoleTail`.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar, Union

from compute import logs
from compute.mountpath import MountPathError, check_mount_path, overlaps

SPEC_VERSION = 2  # 2: a NetworkAttachment carries its NetworkSegment

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


class Action(enum.StrEnum):
    """What the portal asks a node to do to one instance, and what an :class:`Observation` reports.

    ``create`` and ``delete`` have messages of their own; the others travel
    in :class:`InstanceAction`.  The portal's state table
    (``portal/cloud/states.py``) has one rule per member.
    """

    CREATE = "create"
    DELETE = "delete"
    START = "start"
    STOP = "stop"
    REBOOT = "reboot"
    PAUSE = "pause"
    RESUME = "resume"
    SNAPSHOT = "snapshot"
    REVERT = "revert"
    DELETE_SNAPSHOT = "delete_snapshot"
    PUBLISH = "publish"
    RESIZE = "resize"
    SEND_DISK = "send_disk"  # cold migration, the source's half: :class:`SendDisk`


#: the actions an :class:`InstanceAction` may carry (create, delete and send_disk have their own messages)
INSTANCE_ACTIONS = frozenset(Action) - {Action.CREATE, Action.DELETE, Action.SEND_DISK}
#: the actions after which the node reports the instance's snapshots (:attr:`Observation.snapshots`)
SNAPSHOT_ACTIONS = frozenset({Action.SNAPSHOT, Action.REVERT, Action.DELETE_SNAPSHOT})


class Capability(enum.StrEnum):
    """What a driver can do beyond spawn, start, stop, reboot and destroy; reported in the heartbeat.

    The portal offers an action that needs a capability only on instances
    whose node reports it for the instance's kind.
    """

    PAUSE = "pause"
    SNAPSHOTS = "snapshots"
    PUBLISH = "publish"  # export the root disk as an image
    CONSOLE = "console"  # a readable console log
    EXEC = "exec"  # run a command inside the instance (containers: crun exec)
    TERMINAL = "terminal"  # an interactive console (VM serial pty, container exec with a pty)
    LOGS = "logs"  # stdout/stderr lines with time and stream, kept after delete (containers)
    VOLUMES = "volumes"  # attach and detach volumes (VMs: virtio disks, hot; containers: ext4, stopped)


class Task(enum.StrEnum):
    """Celery task names, used by both ends: the portal's sender and the node's worker, and back."""

    CREATE = "compute.instance.create"
    ACTION = "compute.instance.action"
    DELETE = "compute.instance.delete"
    CONSOLE = "compute.instance.console"
    ENSURE_NETWORK = "compute.network.ensure"
    RELEASE_NETWORK = "compute.network.release"
    VOLUME = "compute.volume"
    FORWARDS = "compute.network.forwards"
    SECURITY = "compute.network.security"
    SECURITY_BATCH = "compute.network.security_batch"
    OBSERVE = "portal.observe"
    OBSERVE_VOLUME = "portal.observe_volume"
    VOLUME_PROGRESS = "portal.volume_progress"
    NODE_REPORT = "portal.node_report"
    CONSOLE_TAIL = "portal.console"
    CONSOLE_OPEN = "compute.console.open"
    EXEC = "compute.instance.exec"
    LOGS = "compute.instance.logs"
    SEND_DISK = "compute.instance.send_disk"


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


def _check_interface(what: str, value: str) -> None:
    if "/" not in value:
        raise SpecError(f"{what} needs a prefix length, got {value!r}")
    try:
        ipaddress.IPv4Interface(value)
    except ValueError:
        raise SpecError(f"{what} must be an IPv4 address with prefix length, got {value!r}") from None


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
    """A tenant network as one node carries it: bridge, host address, VXLAN tunnel, router.

    Sent alone (:attr:`Task.ENSURE_NETWORK`) when the set of nodes carrying
    the network changes, and inside every :class:`NetworkAttachment`.
    ``vni`` identifies the network's VXLAN segment; ``tunnel_local`` is this
    node's underlay address (``None``: the node does not tunnel, the network
    stays on its bridge) and ``tunnel_peers`` the underlay addresses of the
    other nodes that carry the network: broadcast, unknown-unicast and
    multicast frames are copied to each of them (head-end replication).
    The list is complete as of ``peers_serial``: the portal raises the
    network's serial each time it sends the carriers a new list, under the
    network's row lock, so a higher serial always names every node that
    joined before it.  A node makes its flood list exactly ``tunnel_peers``
    (pruning nodes that left) only for a serial higher than the highest it
    has applied; an older or equal one only adds peers, so a stale list
    handled out of order never cuts off a node that joined since.  0 (the
    default, older portals) never prunes.

    ``gateway`` (``198.18.0.1/24``, the same on every node: an anycast
    gateway) makes the node route for the network and answer DNS there;
    ``egress`` lets the network's traffic out through the node's uplink with
    source NAT.  ``hosts`` are the (hostname, address) pairs of the network's
    instances, which the node's resolver answers.
    """

    TASK: ClassVar[Task] = Task.ENSURE_NETWORK

    network: str
    bridge: str
    mtu: int = 1500
    host_address: str | None = None
    vni: int | None = None
    tunnel_local: str | None = None
    tunnel_peers: tuple[str, ...] = ()
    gateway: str | None = None
    egress: bool = False
    hosts: tuple[tuple[str, str], ...] = ()
    peers_serial: int = 0

    def __post_init__(self) -> None:
        _check_bridge(self.bridge)
        serial = self.peers_serial
        if isinstance(serial, bool) or not isinstance(serial, int) or serial < 0:
            raise SpecError(f"peers_serial must be a non-negative integer, got {serial!r}")
        if not 576 <= self.mtu <= 9000:
            raise SpecError(f"mtu must be within 576..9000, got {self.mtu!r}")
        for what, value in (("host_address", self.host_address), ("gateway", self.gateway)):
            if value is not None:
                _check_interface(what, value)
        if self.egress and self.gateway is None:
            raise SpecError("egress needs a gateway")
        for name, address in self.hosts:
            if not _NAME_RE.match(name):
                raise SpecError(f"host name must be an RFC 1123 label, got {name!r}")
            _check_ipv4("each host address", address)
        _check_tunnel(self.vni, self.tunnel_local, self.tunnel_peers)

    @property
    def subnet(self) -> ipaddress.IPv4Network | None:
        """The network's subnet, from the gateway or the host address (None without either)."""
        iface = self.gateway or self.host_address
        return ipaddress.IPv4Interface(iface).network if iface else None


@dataclasses.dataclass(frozen=True)
class ReleaseNetwork:
    """The tenant deleted the network: stop carrying it (bridge, VXLAN device, resolver, rules).

    A node releases it at once when none of its recorded NICs is on the
    bridge and no foreign port is; otherwise its idle release does it later.
    """

    TASK: ClassVar[Task] = Task.RELEASE_NETWORK

    network: str
    bridge: str
    vni: int | None = None

    def __post_init__(self) -> None:
        _check_bridge(self.bridge)
        _check_tunnel(self.vni, None, ())


@dataclasses.dataclass(frozen=True)
class NetworkAttachment:
    """One NIC of an instance: its network's :class:`NetworkSegment` plus the NIC's own address.

    ``address`` is an interface address with prefix length
    (``198.18.0.10/24``), ``gateway`` optional (no default route without it),
    ``dns`` the resolver addresses the instance is given (the gateway's).
    The segment's ``host_address`` is this node's own address on the bridge,
    so the host reaches its instances.
    """

    segment: NetworkSegment
    address: str
    mac: str
    gateway: str | None = None
    dns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", self.mac):
            raise SpecError(f"mac must be lower-case aa:bb:cc:dd:ee:ff, got {self.mac!r}")
        _check_interface("address", self.address)
        if self.gateway is not None:
            _check_ipv4("gateway", self.gateway)
        for server in self.dns:
            _check_ipv4("each dns server", server)

    @property
    def ip(self) -> str:
        """The NIC's address without prefix length."""
        return str(ipaddress.IPv4Interface(self.address).ip)

    @property
    def bridge(self) -> str:
        return self.segment.bridge

    @property
    def mtu(self) -> int:
        return self.segment.mtu


@dataclasses.dataclass(frozen=True)
class VolumeMount:
    """A container's ext4 volume (``<state_dir>/volumes/<volume_id>.ext4``) and where it is mounted."""

    volume_id: str
    mount_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.volume_id, str) or not UUID_RE.fullmatch(self.volume_id):
            raise SpecError(f"volume_id must be a lower-case UUID, got {self.volume_id!r}")
        try:
            check_mount_path(self.mount_path)
        except MountPathError as exc:
            raise SpecError(str(exc)) from exc


def _check_volume_mounts(kind: Kind, volumes: tuple[VolumeMount, ...]) -> None:
    if volumes and kind is not Kind.CONTAINER:
        raise SpecError("volumes in the spec are for containers; a VM's are attached as disks")
    for i, a in enumerate(volumes):
        for b in volumes[:i]:
            if a.volume_id == b.volume_id or overlaps(a.mount_path, b.mount_path):
                raise SpecError(f"volume mounts {b.mount_path} and {a.mount_path} collide")


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
    vendor_data: str | None = None  # the operator's cloud-init defaults (SKYPORT_VENDOR_DATA), VMs only
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cpu_quota_percent: int = 100
    pids_limit: int = 1024
    # Containers: host uid/gid of root inside the container's user namespace
    # (one 65536-id range per tenant, docs/container-driver.md); 0 = derive on
    # the node (specs stored before the field existed).
    id_base: int = 0
    # Containers: overrides of the image config's User and WorkingDir.
    user: str = ""
    workdir: str = ""
    # Containers: ``no | on-failure[:N] | always``; the node restarts with backoff (restart_rule).
    restart_policy: str = "no"
    # the resolved rules of its security groups (None: no filtering, as before security groups)
    security: tuple[SecurityRule, ...] | None = None
    # their tenant's security serial when resolved (InstanceSecurity.version; 0: unversioned)
    security_version: int = 0
    # the members of the groups its rules name as remote (SecurityRule.remote_group)
    security_members: tuple[GroupMembers, ...] = ()
    # Containers: volumes attached at create (later attachments live on the node, not in the spec).
    volumes: tuple[VolumeMount, ...] = ()
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        _check_instance_id(self.instance_id)
        if not _NAME_RE.match(self.hostname):
            raise SpecError(f"hostname must be an RFC 1123 label, got {self.hostname!r}")
        if self.vcpus < 1 or self.ram_mb < 16 or self.disk_gb < 0:
            raise SpecError("vcpus >= 1, ram_mb >= 16 and disk_gb >= 0 are required")
        if not 1 <= self.cpu_quota_percent <= 100 * self.vcpus:
            raise SpecError("cpu_quota_percent must be within 1..100*vcpus")
        if self.pids_limit < 8:
            raise SpecError("pids_limit must be at least 8")
        base = self.id_base
        if base and (base < ID_RANGE_MIN or base % ID_RANGE_SIZE or base + ID_RANGE_SIZE > 2**32):
            raise SpecError(f"id_base must be 0 or a multiple of {ID_RANGE_SIZE} in {ID_RANGE_MIN}..2^32")
        for name, value in self.env:
            problem = env_problem(name, value)
            if problem:
                raise SpecError(problem)
        if "\x00" in self.user or "\x00" in self.workdir or "\x00" in "".join(self.command):
            raise SpecError("user, workdir and command must not contain NUL")
        restart_rule(self.restart_policy)  # raises SpecError when malformed
        if self.workdir and not self.workdir.startswith("/"):
            raise SpecError(f"workdir must be an absolute path, got {self.workdir!r}")
        _check_volume_mounts(self.kind, self.volumes)

    @property
    def short_id(self) -> str:
        """First 8 hex digits of the id: used in host-side names (taps, veths)."""
        return self.instance_id[:8]


ID_RANGE_SIZE = 65536  # ids per user-namespace range (uid 0..65535 inside)
ID_RANGE_MIN = 1 << 24  # no range starts below host uid 16777216


CRASH_LOOP_LIMIT = 10  # restarts of a container that keeps failing before the node gives up
_RESTART_RE = re.compile(r"(no|always|on-failure)(?::([1-9][0-9]{0,2}))?")


def restart_rule(policy: str) -> tuple[str, int]:
    """``no | on-failure[:N] | always`` → (mode, most restarts in a row); SpecError when malformed.

    ``always`` and a bare ``on-failure`` still stop after :data:`CRASH_LOOP_LIMIT`
    quick failures in a row (a crash loop), as the instance then needs a human.
    """
    m = _RESTART_RE.fullmatch(policy) if isinstance(policy, str) else None
    if m is None or (m.group(2) and m.group(1) != "on-failure"):
        raise SpecError(f"restart_policy must be no, on-failure[:N] (N 1..999) or always, got {policy!r}")
    if m.group(1) == "no":
        return "no", 0
    return m.group(1), int(m.group(2)) if m.group(2) else CRASH_LOOP_LIMIT


def env_problem(name: str, value: str) -> str | None:
    """Why ``name=value`` cannot be a process environment entry, or None."""
    if not name:
        return "an environment variable needs a name"
    if "=" in name or "\x00" in name:
        return f"environment variable name {name!r} must not contain '=' or NUL"
    if "\x00" in value:
        return f"environment variable {name} has a NUL in its value"
    return None


def stored_spec(data: Mapping[str, Any]) -> InstanceSpec:
    """An InstanceSpec a node wrote to disk, from any earlier version of this contract.

    Version 1 kept each NIC's segment fields flat beside its address.
    """
    if isinstance(data, Mapping) and data.get("version", 1) == 1:
        data = dict(data, version=SPEC_VERSION, networks=[_nic_v1(n) for n in data.get("networks", ())])
    return from_json(InstanceSpec, data)


def _nic_v1(nic: Mapping[str, Any]) -> dict[str, Any]:
    own = {k: nic[k] for k in ("address", "mac", "gateway") if k in nic}
    return own | {"segment": {k: v for k, v in nic.items() if k not in own}}


def _check_instance_id(value: str) -> None:
    if not isinstance(value, str) or not UUID_RE.fullmatch(value):
        raise SpecError(f"instance_id must be a lower-case UUID, got {value!r}")


class _AboutInstance:
    """A message about one instance: its ``instance_id`` must be an instance id."""

    instance_id: str

    def __post_init__(self) -> None:
        _check_instance_id(self.instance_id)


class Protocol(enum.StrEnum):
    """Transport protocol of a published port."""

    TCP = "tcp"
    UDP = "udp"


@dataclasses.dataclass(frozen=True)
class Forward:
    """A published port: ``external_address:external_port`` of the node → ``address:port`` of an instance."""

    protocol: Protocol
    external_address: str
    external_port: int
    address: str
    port: int

    def __post_init__(self) -> None:
        _check_ipv4("external_address", self.external_address)
        _check_ipv4("address", self.address)
        for what, port in (("external_port", self.external_port), ("port", self.port)):
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise SpecError(f"{what} must be within 1..65535, got {port!r}")


class Direction(enum.StrEnum):
    INGRESS = "ingress"
    EGRESS = "egress"


#: protocols a security group rule can name ("any": every IPv4 packet)
RULE_PROTOCOLS = ("any", "tcp", "udp", "icmp")


@dataclasses.dataclass(frozen=True)
class SecurityRule:
    """One allow rule of an instance's security groups, resolved by the portal.

    ``remote`` lists the CIDRs the rule admits (``0.0.0.0/0`` is anyone;
    empty admits nobody).  ``remote_group`` instead names a security group:
    the rule admits its members' addresses, which the node keeps in a set of
    its own (:class:`GroupMembers`), so members coming and going change one
    set element, never this rule.  Ports only with tcp/udp; ``None`` means
    every port.
    """

    direction: Direction
    protocol: str = "any"
    port_min: int | None = None
    port_max: int | None = None
    remote: tuple[str, ...] = ("0.0.0.0/0",)
    remote_group: str = ""

    def __post_init__(self) -> None:
        if self.remote_group:
            _check_group(self.remote_group)
            if self.remote:
                raise SpecError("a rule admits either remote CIDRs or a remote group, not both")
        if self.protocol not in RULE_PROTOCOLS:
            raise SpecError(f"protocol must be one of {', '.join(RULE_PROTOCOLS)}, got {self.protocol!r}")
        if (self.port_min is None) != (self.port_max is None):
            raise SpecError("port_min and port_max go together")
        if self.port_min is not None and self.port_max is not None:
            if self.protocol not in ("tcp", "udp"):
                raise SpecError(f"ports need tcp or udp, not {self.protocol}")
            if not 1 <= self.port_min <= self.port_max <= 65535:
                raise SpecError(
                    f"ports must satisfy 1 <= min <= max <= 65535, got {self.port_min}-{self.port_max}"
                )
        for cidr in self.remote:
            try:
                ipaddress.IPv4Network(cidr)
            except ValueError:
                raise SpecError(f"remote must be IPv4 CIDRs, got {cidr!r}") from None


_GROUP_RE = re.compile(r"^[0-9a-z]{1,32}$")


def _check_group(group: str) -> None:
    if not isinstance(group, str) or not _GROUP_RE.match(group):
        raise SpecError(f"a security group id is 1-32 lowercase letters and digits, got {group!r}")


@dataclasses.dataclass(frozen=True)
class GroupMembers:
    """The addresses of a security group's live members, for the rules that name it as remote.

    The node keeps them in one nftables set per group (``grp_<group>``):
    a member created or deleted changes one element of it on each node that
    enforces such a rule, not the rules of every instance the group admits
    (one create in a group of n made every member's rules new: n^2 work in
    a burst).  ``version``: the tenant's security serial when resolved (as
    :class:`InstanceSecurity`); a node ignores a list older than the one it
    applied to the group.
    """

    group: str
    addresses: tuple[str, ...] = ()
    version: int = 0

    def __post_init__(self) -> None:
        _check_group(self.group)
        for address in self.addresses:
            _check_ipv4("addresses", address)


# ---------------------------------------------------------------- portal -> node


@dataclasses.dataclass(frozen=True)
class CreateInstance:
    """Spawn ``spec``; ``action_id`` comes back in the :class:`Observation`."""

    TASK: ClassVar[Task] = Task.CREATE

    spec: InstanceSpec
    action_id: str


@dataclasses.dataclass(frozen=True)
class InstanceAction(_AboutInstance):
    """Run one of :data:`INSTANCE_ACTIONS` on an existing instance.

    ``params`` by action: stop ``timeout`` (seconds), ``force``; snapshot,
    revert, delete_snapshot ``name``; publish ``upload_url``, ``upload_token``;
    resize ``vcpus``, ``ram_mb``, ``disk_gb`` (the new flavor's sizes).
    """

    TASK: ClassVar[Task] = Task.ACTION

    instance_id: str
    kind: Kind
    action: Action
    action_id: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.action not in INSTANCE_ACTIONS:
            raise SpecError(f"{self.action} is not an instance action; it has a message of its own")

    def param(self, name: str) -> str:
        """A parameter the action needs, as text (SpecError when it is missing)."""
        value = self.params.get(name)
        if value is None or str(value) == "":
            raise SpecError(f"{self.action} needs params.{name}")
        return str(value)


@dataclasses.dataclass(frozen=True)
class DeleteInstance(_AboutInstance):
    """Destroy the workload and all it owns on the node."""

    TASK: ClassVar[Task] = Task.DELETE

    instance_id: str
    kind: Kind
    action_id: str


@dataclasses.dataclass(frozen=True)
class SendDisk(_AboutInstance):
    """Cold migration, the source node's half: flatten the stopped VM's disk and PUT it to the portal.

    ``upload_url`` is the portal's upload endpoint of a hidden image made for
    the move and ``upload_token`` its one-image token (the publish path).  The
    :class:`Observation` (action ``send_disk``) carries ``digest`` and ``size``
    in its ``details``; the VM stays defined and stopped on the node whatever
    happens (``compute.migration.send_disk``).
    """

    TASK: ClassVar[Task] = Task.SEND_DISK

    instance_id: str
    action_id: str
    upload_url: str
    upload_token: str

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.upload_url.startswith(("http://", "https://")):
            raise SpecError(f"upload_url must be an http(s) URL, not {self.upload_url!r}")
        if not self.upload_token:
            raise SpecError("upload_token is empty")


@dataclasses.dataclass(frozen=True)
class InstanceForwards(_AboutInstance):
    """The complete list of an instance's published ports; the node converges to it (empty: none)."""

    TASK: ClassVar[Task] = Task.FORWARDS

    instance_id: str
    forwards: tuple[Forward, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        keys = [(f.protocol, f.external_address, f.external_port) for f in self.forwards]
        if len(set(keys)) != len(keys):
            raise SpecError("an external address and port is published twice")


@dataclasses.dataclass(frozen=True)
class InstanceSecurity(_AboutInstance):
    """The complete, resolved rule list of an instance's security groups; the node converges to it.

    ``version`` is the tenant's security serial the portal took (an UPDATE
    holding the tenant row until commit) before it resolved the rules, so a
    higher version was resolved after every lower one committed.  A node
    ignores a list older than the one it applied to the instance (two
    changes whose batches its two worker processes run out of order).  0:
    unversioned (older portals), always applied.
    """

    TASK: ClassVar[Task] = Task.SECURITY

    instance_id: str
    rules: tuple[SecurityRule, ...] = ()
    version: int = 0


@dataclasses.dataclass(frozen=True)
class SecurityBatch:
    """Rules of several instances of one node and group memberships, converged in one transaction.

    What one change sends each node that enforces something it alters: a
    rule added or removed, groups attached (``items``: those instances' new
    rules), a member created or deleted (``groups``: the new member lists of
    the groups that admit it; no instance's rules change).
    """

    TASK: ClassVar[Task] = Task.SECURITY_BATCH

    items: tuple[InstanceSecurity, ...] = ()
    groups: tuple[GroupMembers, ...] = ()

    def __post_init__(self) -> None:
        if not self.items and not self.groups:
            raise SpecError("a security batch needs at least one instance or group")
        if len({i.instance_id for i in self.items}) != len(self.items):
            raise SpecError("items: an instance appears twice in one security batch")
        if len({g.group for g in self.groups}) != len(self.groups):
            raise SpecError("groups: a group appears twice in one security batch")


@dataclasses.dataclass(frozen=True)
class ConsoleRequest(_AboutInstance):
    """Send back the tail of the instance's console log (:class:`ConsoleTail`)."""

    TASK: ClassVar[Task] = Task.CONSOLE

    instance_id: str
    kind: Kind
    max_bytes: int = 16384


class VolumeOp(enum.StrEnum):
    """What a :class:`VolumeRequest` asks the node to do with one volume."""

    CREATE = "create"
    DELETE = "delete"
    ATTACH = "attach"
    DETACH = "detach"
    GROW = "grow"
    SEND = "send"  # copy the detached volume's content to the portal (a move or a backup)
    RECEIVE = "receive"  # make the volume from content the portal serves (a move's target, a restore)
    DROP = "drop"  # forget the source copy after a move the target confirmed (never settles the row)
    SNAPSHOT = "snapshot"  # take snapshot ``snapshot`` of a volume that nothing uses
    REVERT = "revert"  # return a detached volume to snapshot ``snapshot``
    DELETE_SNAPSHOT = "delete_snapshot"


#: the volume requests about one snapshot; the node's observation lists the volume's snapshots after them
VOLUME_SNAPSHOT_OPS = (VolumeOp.SNAPSHOT, VolumeOp.REVERT, VolumeOp.DELETE_SNAPSHOT)


class VolumeFormat(enum.StrEnum):
    """What a volume is on its node: a disk for VMs, or a file system for containers."""

    QCOW2 = "qcow2"  # a qcow2 file, attached to a VM as a virtio disk
    EXT4 = "ext4"  # ext4 in a sparse file, loop-mounted and bind-mounted into a container


@dataclasses.dataclass(frozen=True)
class VolumeRequest:
    """Create, delete, attach, detach or grow one volume (a file in the node's volume dir).

    ``volume_id`` is the portal's UUID and the idempotency key: a volume
    created twice is one file, attached twice one disk, detached or deleted
    when already gone a success.  ``size_gb`` for create and grow;
    ``instance_id`` and ``kind`` for attach and detach.  An ``ext4`` volume
    is created with its root directory owned by ``id_base`` (root of the
    tenant's containers) and attached to a container at ``mount_path``.
    ``snapshot`` names the snapshot of a snapshot, revert or delete_snapshot
    (a portal name; idempotent too: taking an existing one keeps it,
    deleting a missing one succeeds).
    The node answers with a :class:`VolumeObservation` carrying ``action_id``.
    """

    TASK: ClassVar[Task] = Task.VOLUME

    volume_id: str
    op: VolumeOp
    action_id: str
    size_gb: int = 0
    instance_id: str | None = None
    kind: Kind | None = None
    format: VolumeFormat = VolumeFormat.QCOW2
    id_base: int = 0
    mount_path: str = ""
    #: send: where to PUT the content (qcow2) and the one-transfer token
    upload_url: str = ""
    upload_token: str = ""
    #: receive: the portal blob to fetch (with the node key) and the digest it must have
    blob_url: str = ""
    digest: str = ""
    #: drop: the request that made the copy to delete (a copy made by another is kept)
    origin: str = ""
    snapshot: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.volume_id, str) or not UUID_RE.fullmatch(self.volume_id):
            raise SpecError(f"volume_id must be a lower-case UUID, got {self.volume_id!r}")
        if self.op is VolumeOp.SEND and not (self.upload_url and self.upload_token):
            raise SpecError("send needs upload_url and upload_token")
        if self.op is VolumeOp.RECEIVE and not (
            self.blob_url and re.fullmatch(r"sha256:[0-9a-f]{64}", self.digest)
        ):
            raise SpecError(f"receive needs blob_url and a sha256 digest, got {self.digest!r}")
        if (self.op in VOLUME_SNAPSHOT_OPS) != bool(self.snapshot):
            raise SpecError(f"snapshot names the snapshot of {', '.join(VOLUME_SNAPSHOT_OPS)} only")
        if self.snapshot and not _NAME_RE.fullmatch(self.snapshot):
            raise SpecError(f"not a snapshot name: {self.snapshot!r}")
        if self.op in (VolumeOp.CREATE, VolumeOp.GROW) and not 1 <= self.size_gb <= 16384:
            raise SpecError(f"{self.op} needs size_gb within 1..16384, got {self.size_gb!r}")
        if self.op is VolumeOp.CREATE and self.format is VolumeFormat.EXT4:
            base = self.id_base
            if base < ID_RANGE_MIN or base % ID_RANGE_SIZE or base + ID_RANGE_SIZE > 2**32:
                raise SpecError(
                    f"an ext4 volume needs the tenant's id_base (>= {ID_RANGE_MIN}), got {base!r}"
                )
        if self.op in (VolumeOp.ATTACH, VolumeOp.DETACH):
            if self.instance_id is None or self.kind is None:
                raise SpecError(f"{self.op} needs instance_id and kind")
            _check_instance_id(self.instance_id)
        if self.op is VolumeOp.ATTACH and self.kind is Kind.CONTAINER:
            try:
                check_mount_path(self.mount_path)
            except MountPathError as exc:
                raise SpecError(str(exc)) from exc


class ConsoleMode(enum.StrEnum):
    """What a console session may do: watch the serial console, type into it, or run a shell (exec)."""

    VIEW = "view"
    WRITE = "write"
    EXEC = "exec"


@dataclasses.dataclass(frozen=True)
class ConsoleOpen(_AboutInstance):
    """Make sure a console hub runs for ``hub`` (docs/console.md).

    The hub is a process on the node that owns the terminal (a VM's serial
    pty, or a pty around ``crun exec --tty``) and moves its bytes through the
    two Redis streams named after ``hub``; the portal's relay reads and writes
    those, so nothing on the node listens.  A VM's hub is shared by every
    viewer of its serial console (``hub`` is the instance id); an exec hub is
    one session's own.  Idempotent: a second open of a live hub does nothing.
    """

    TASK: ClassVar[Task] = Task.CONSOLE_OPEN

    instance_id: str
    kind: Kind
    hub: str
    mode: ConsoleMode
    command: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9-]{8,64}", self.hub):
            raise SpecError(f"hub: {self.hub!r} is not a hub name")
        if self.mode is ConsoleMode.EXEC and not self.command:
            raise SpecError("command: an exec console needs a command")


@dataclasses.dataclass(frozen=True)
class ExecRequest(_AboutInstance):
    """Run ``command`` in the instance without a terminal; the node pushes an :class:`ExecResult`
    onto the Redis list ``reply`` (the portal's request waits on it, so no Celery hop back)."""

    TASK: ClassVar[Task] = Task.EXEC

    instance_id: str
    kind: Kind
    command: tuple[str, ...]
    reply: str
    timeout: float = 30.0
    max_bytes: int = 65536


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """What a non-interactive exec did: ``exit_code`` is None when it timed out or could not start."""

    exit_code: int | None
    output: str
    truncated: bool = False
    timed_out: bool = False
    error: str = ""
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class LogsRequest(_AboutInstance):
    """Read a container's logs; the node pushes a :class:`LogsResult` onto the Redis list ``reply``.

    The last ``tail`` lines (None: all) at or after ``since`` (RFC 3339, "":
    from the start) of ``stream`` ("stdout", "stderr", "": both); ``skip``
    lines stamped exactly ``since`` were already seen (a follow's cursor).
    Readable after the container exited and, for the node's retention
    period, after it was deleted (docs/container-driver.md, Logs).
    """

    TASK: ClassVar[Task] = Task.LOGS

    instance_id: str
    kind: Kind
    reply: str
    tail: int | None = None
    since: str = ""
    stream: str = ""
    skip: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.reply.startswith("skyport:logs:"):
            raise SpecError(f"reply must be a skyport:logs: list, got {self.reply!r}")
        try:
            self.selection()
        except logs.LogError as exc:
            raise SpecError(str(exc)) from None

    def selection(self) -> logs.Selection:
        since = logs.parse_time(self.since) if self.since else None
        return logs.Selection(self.tail, since, self.stream or None, self.skip)


@dataclasses.dataclass(frozen=True)
class LogsResult:
    """Lines as (RFC 3339 time, stream, text), oldest first; ``truncated``: older lines were left
    out to keep the reply small; ``retained``: read from a deleted container's kept logs;
    ``error`` says why there are none (unknown instance, a VM, an unreadable log)."""

    lines: tuple[tuple[str, str, str], ...] = ()
    truncated: bool = False
    retained: bool = False
    error: str = ""


# ---------------------------------------------------------------- node -> portal


@dataclasses.dataclass(frozen=True)
class VolumeObservation:
    """What a node did with a volume: ``ok``, or ``message`` says why not in one sentence.

    ``target`` is the guest disk an attach gave it (``vdc``…); ``size_bytes``
    the file's virtual size after create or grow.  After a snapshot, revert
    or delete_snapshot ``snapshots`` is the volume's whole list (None when
    the node could not read it).
    """

    TASK: ClassVar[Task] = Task.OBSERVE_VOLUME

    volume_id: str
    node: str
    op: VolumeOp
    action_id: str
    ok: bool
    message: str = ""
    target: str = ""
    size_bytes: int = 0
    snapshots: tuple[SnapshotInfo, ...] | None = None
    digest: str = ""  # send: what the node uploaded; receive: what it verified


@dataclasses.dataclass(frozen=True)
class VolumeProgress:
    """How far a node is in sending or receiving a volume's content (at most one a second).

    ``phase`` is the request's op (send, receive); ``done`` and ``total``
    are bytes of the transfer (the qcow2 that travels through the portal).
    """

    TASK: ClassVar[Task] = Task.VOLUME_PROGRESS

    volume_id: str
    node: str
    action_id: str
    phase: VolumeOp
    done: int
    total: int


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot of an instance's disk as its node has it.

    ``created_at`` is the node's clock (seconds since the epoch).
    ``size_bytes`` is what the snapshot holds beyond the disk's shared
    blocks: the saved memory state of a VM snapshotted while running
    (``qemu-img`` reports it as ``vm-state-size``); 0 when unknown.  For
    a volume's snapshot it is the data the snapshot holds: what a qcow2 copy
    of it needs (``qemu-img measure``), or the blocks of an ext4 copy.
    """

    name: str
    created_at: float
    size_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class Observation:
    """What a node saw after acting on an instance, sent to the control queue.

    ``action_id`` ties the observation to the request that caused it, so a
    duplicate delivery can be recognised and ignored.  ``ok`` is false when
    the action failed; ``message`` then says why in one sentence.
    """

    TASK: ClassVar[Task] = Task.OBSERVE

    instance_id: str
    node: str
    action: Action
    action_id: str
    ok: bool
    power_state: PowerState
    message: str = ""
    observed_at: float = 0.0
    details: tuple[tuple[str, str], ...] = ()
    # after snapshot, revert and delete_snapshot: every snapshot the instance now has; else None
    snapshots: tuple[SnapshotInfo, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ConsoleTail(_AboutInstance):
    """The end of an instance's console log, as the node read it at ``at``."""

    TASK: ClassVar[Task] = Task.CONSOLE_TAIL

    instance_id: str
    node: str
    text: str
    at: float


@dataclasses.dataclass(frozen=True)
class InventoryItem:
    """One workload a node actually has, for reconcile."""

    instance_id: str
    kind: Kind
    power_state: PowerState
    # counters at the time of the report (0 when the driver could not read them)
    cpu_time_ns: int = 0
    memory_bytes: int = 0
    # the workload's snapshots (names and times; sizes are 0 here); None: the driver keeps none
    snapshots: tuple[SnapshotInfo, ...] | None = None
    # a workload that ended: how (exit code or signal, OOM) and its last output lines
    exit_code: int | None = None
    message: str = ""
    restarts: int = 0  # by the node's restart policy, in a row
    gave_up: bool = False  # a crash loop: the policy's restarts are used up


@dataclasses.dataclass(frozen=True)
class DriverStatus:
    """One driver of a node: whether it works here (``detail`` says why not) and what it can do."""

    kind: Kind
    ok: bool
    detail: str = ""
    capabilities: frozenset[Capability] = frozenset()


@dataclasses.dataclass(frozen=True)
class HostLoad:
    """The host's own use at a heartbeat (what each workload uses is in the inventory).

    ``cpu_percent`` is the busy share of all CPUs since the node's previous
    heartbeat (100 = every CPU busy; 0 on the first beat); memory is
    ``MemAvailable``; disk is what is free on the file system of the node's
    state directory (disks, layers, volumes).
    """

    load1: float
    load5: float
    cpu_percent: float
    mem_available_mb: int
    disk_free_gb: float


@dataclasses.dataclass(frozen=True)
class NodeReport:
    """Heartbeat of a compute node: capacity, driver health and capabilities, inventory."""

    TASK: ClassVar[Task] = Task.NODE_REPORT

    node: str
    queue: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    drivers: tuple[DriverStatus, ...]
    inventory: tuple[InventoryItem, ...] = ()
    sent_at: float = 0.0
    # When the node began listing its workloads (its clock; 0: not said).  Reconcile leaves a row
    # changed since then (an observation applied while the list was taken) to the next beat.
    inventory_at: float = 0.0
    # Digests the node holds: VM base disks in its image cache and unpacked container layers.
    cached: tuple[str, ...] = ()
    # The node's underlay IPv4 address for VXLAN tunnels; "" when it does not tunnel.
    tunnel_address: str = ""
    # Ids of the volume files the node has (reconcile reports the ones it lacks).
    volumes: tuple[str, ...] = ()
    # Which instance each attached volume is a disk of, as (volume id, instance id).
    attachments: tuple[tuple[str, str], ...] = ()
    # Why the node's nftables rules differ from what it last loaded ("" when they do not); it reloads them.
    network_drift: str = ""
    # The host's own load, memory and disk; None from nodes older than this field.
    host: HostLoad | None = None
    # Action ids of the instance messages the node took within the last ``taken_window`` seconds
    # (compute/taken.py), and of those it has handled (its observation sent); a window of 0
    # (nodes older than these fields) says nothing either way.
    taken: tuple[str, ...] = ()
    taken_window: float = 0.0
    done: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.tunnel_address:
            _check_ipv4("tunnel_address", self.tunnel_address)


#: every message the portal sends to a node
NodeRequest = (
    CreateInstance
    | InstanceAction
    | DeleteInstance
    | ConsoleRequest
    | NetworkSegment
    | ReleaseNetwork
    | ConsoleOpen
    | ExecRequest
    | LogsRequest
    | InstanceForwards
    | InstanceSecurity
    | SecurityBatch
    | VolumeRequest
    | SendDisk
)
#: the tasks a compute node's worker runs (the others run on the portal's control queue)
NODE_TASKS: tuple[Task, ...] = tuple(cls.TASK for cls in typing.get_args(NodeRequest))
#: each task's message class, for the receiving end
MESSAGES: dict[Task, type[Any]] = {
    cls.TASK: cls
    for cls in (
        CreateInstance,
        InstanceAction,
        DeleteInstance,
        ConsoleRequest,
        NetworkSegment,
        ReleaseNetwork,
        VolumeRequest,
        ConsoleOpen,
        ExecRequest,
        LogsRequest,
        InstanceForwards,
        InstanceSecurity,
        SecurityBatch,
        SendDisk,
        Observation,
        VolumeObservation,
        VolumeProgress,
        NodeReport,
        ConsoleTail,
    )
}


def to_json(obj: Any) -> Any:
    """Turn a spec dataclass (recursively) into JSON-compatible values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, frozenset):
        return sorted(to_json(v) for v in obj)
    if isinstance(obj, tuple | list):
        return [to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    return obj


_T = TypeVar("_T")


def from_json(cls: type[_T], data: Any) -> _T:
    """Build ``cls`` (a dataclass of this module) from JSON, converting nested values by annotation.

    Unknown fields, wrong types and values the class refuses raise :class:`SpecError`.
    """
    return _build(cls, data, cls.__name__)  # type: ignore[no-any-return]


def _fields(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = {
            f.name: typing.get_type_hints(cls)[f.name]
            for f in dataclasses.fields(cls)  # ClassVars are not fields
        }
    return hints


_HINTS: dict[type, dict[str, Any]] = {}


def _build(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _build(inner, value, where)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _dataclass(hint, value, where)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError as exc:
            raise SpecError(f"{where}: {exc}") from exc
    if origin in (tuple, frozenset):
        return _sequence(origin, args, value, where)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise SpecError(f"{where}: expected an object, got {type(value).__name__}")
        return dict(value)
    return _scalar(hint, value, where)


def _dataclass(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: expected an object, got {type(value).__name__}")
    hints = _fields(cls)
    unknown = set(value) - set(hints)
    if unknown:
        raise SpecError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    kwargs = {k: _build(hints[k], v, f"{cls.__name__}.{k}") for k, v in value.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise SpecError(f"{cls.__name__}: {exc}") from exc


def _sequence(origin: Any, args: tuple[Any, ...], value: Any, where: str) -> Any:
    if not isinstance(value, list | tuple):
        raise SpecError(f"{where}: expected a list, got {type(value).__name__}")
    if origin is frozenset:
        return frozenset(_build(args[0], v, where) for v in value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_build(args[0], v, where) for v in value)
    if len(value) != len(args):
        raise SpecError(f"{where}: expected {len(args)} items, got {len(value)}")
    return tuple(_build(a, v, where) for a, v in zip(args, value, strict=True))


def _scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (str, int, float, bool) and (
        not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    ):
        raise SpecError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
    return value
