"""Tenant networks: IPAM (subnets, VNIs, addresses) and each node's view of a network.

Allocations read a free value and insert it; the unique constraints refuse
the loser of a race and :func:`_allocate` tries again.  ``segment`` is what a
node needs to carry a network (its bridge, its own address, the VXLAN peers);
``sync_network`` tells every carrying node after the set of carriers changed.
"""

from __future__ import annotations

import ipaddress
import itertools
import secrets
from collections.abc import Callable
from typing import TypeVar

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Max

from compute.spec import VNI_MAX, NetworkAttachment, NetworkSegment, ReleaseNetwork
from portal.api.conflicts import FieldConflict
from portal.cloud import dispatch
from portal.cloud.choices import NodeStatus, VmState
from portal.cloud.models import ComputeNode, HostPort, Instance, Network, Port
from portal.errors import Conflict, DomainError, QuotaExceeded
from portal.tenancy.models import Quota, Tenant

_T = TypeVar("_T")
ALLOCATION_ATTEMPTS = 8


def _allocate(create: Callable[[], _T]) -> _T:
    """Run an allocation that picks a free value and inserts it, retrying a lost race.

    The choice is read, then inserted: two transactions can pick the same
    subnet, VNI or address (PostgreSQL runs them side by side).  The unique
    constraints refuse the second insert; only its savepoint rolls back, and
    the next attempt reads again and sees the winner's row.
    """
    for attempt in range(ALLOCATION_ATTEMPTS):
        try:
            with transaction.atomic():
                return create()
        except IntegrityError:
            if attempt == ALLOCATION_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def allocate_vni() -> int:
    """The next free VXLAN network identifier (one past the highest; gaps are reused at the end)."""
    highest = Network.objects.aggregate(m=Max("vni"))["m"] or 0
    if highest < VNI_MAX:
        return int(highest) + 1
    taken = set(Network.objects.values_list("vni", flat=True))
    for vni in range(1, VNI_MAX + 1):
        if vni not in taken:
            return vni
    raise Conflict("Every VXLAN network identifier is in use.")


def default_network(tenant: Tenant) -> Network:
    """The tenant's default network, allocated from the pool on first use."""
    # the usual case, the network exists: no savepoint for an allocation that does not happen
    return _existing_default(tenant) or _allocate(lambda: _default_network(tenant))


def _existing_default(tenant: Tenant) -> Network | None:
    return Network.objects.filter(tenant=tenant, name=DEFAULT_NAME).first()


def _default_network(tenant: Tenant) -> Network:
    existing = _existing_default(tenant)  # again: a lost race retries and finds the winner's
    if existing is not None:
        return existing
    _serialise_subnets()
    return _insert(tenant, DEFAULT_NAME, _free_subnet(settings.SKYPORT_NETWORK_PREFIX))


DEFAULT_NAME = "default"
#: the longest prefix a network may have: .1 is the gateway, .2-.9 are reserved, a /28 leaves 5 addresses
MAX_PREFIX = 28


class InvalidNetwork(DomainError):
    """A CIDR or prefix length that cannot be a tenant network (answered with 400, naming the field)."""

    code = "invalid"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.errors = {field: [message]}


def pool() -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(settings.SKYPORT_NETWORK_POOL)


def _insert(tenant: Tenant, name: str, subnet: ipaddress.IPv4Network) -> Network:
    return Network.objects.create(
        tenant=tenant,
        name=name,
        cidr=str(subnet),
        bridge=f"skn-{secrets.token_hex(4)}",
        vni=allocate_vni(),
        host_address=str(subnet.network_address + 1),
    )


#: the PostgreSQL advisory lock that makes subnet choices of all tenants wait for each other
_SUBNET_LOCK = 0x736B795375626E  # "skySubn"


def _serialise_subnets() -> None:
    """Until this transaction ends, no other one picks or checks a subnet (PostgreSQL; SQLite has one
    writer).  The unique ``cidr`` refuses two equal subnets, not two overlapping ones (a /24 and its /26)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_SUBNET_LOCK])


def _taken() -> list[tuple[ipaddress.IPv4Network, Network]]:
    return [
        (ipaddress.IPv4Network(n.cidr), n)
        for n in Network.objects.select_related("tenant").only("cidr", "name", "tenant__slug")
    ]


def _free_subnet(prefix: int) -> ipaddress.IPv4Network:
    """The first subnet of the pool with ``prefix`` that overlaps no network (of any tenant)."""
    taken = sorted(net for net, _ in _taken())
    whole = pool()
    for subnet in whole.subnets(new_prefix=prefix):
        if not any(subnet.overlaps(t) for t in taken):
            return subnet
    raise Conflict(
        f"The network pool {whole} has no free /{prefix} left; choose a longer prefix or ask an "
        "operator to widen SKYPORT_NETWORK_POOL."
    )


def parse_cidr(text: str) -> ipaddress.IPv4Network:
    """A tenant's own CIDR: IPv4, a network address, inside the pool, /pool.prefixlen../28 (else 400)."""
    whole = pool()
    try:
        subnet = ipaddress.IPv4Network(text.strip(), strict=True)
    except ValueError as exc:
        raise InvalidNetwork(
            "cidr",
            f"{text[:50]!r} is not an IPv4 network address with a prefix, such as {whole[0]}/24 ({exc}).",
        ) from None
    if not subnet.subnet_of(whole):
        raise InvalidNetwork("cidr", f"{subnet} is not inside the network pool {whole}.")
    if subnet.prefixlen > MAX_PREFIX:
        raise InvalidNetwork(
            "cidr", f"{subnet} is too small: a network needs a prefix of at most /{MAX_PREFIX}."
        )
    return subnet


def check_prefix(prefix: int) -> int:
    low = pool().prefixlen
    if not low <= prefix <= MAX_PREFIX:
        raise InvalidNetwork(
            "prefix_length", f"The prefix length must be between {low} (the pool) and {MAX_PREFIX}."
        )
    return prefix


def _overlap(subnet: ipaddress.IPv4Network, tenant: Tenant) -> str | None:
    for net, other in _taken():
        if net.overlaps(subnet):
            if other.tenant_id == tenant.pk:
                return f"{subnet} overlaps network {other.name} ({net}) of tenant {tenant.slug}."
            return f"{subnet} overlaps a network of another tenant; choose another range or leave cidr out."
    return None


def create_network(tenant: Tenant, name: str, cidr: str = "", prefix: int | None = None) -> Network:
    """A new network of ``tenant``: its own ``cidr`` (inside the pool, overlapping nothing) or the pool's next
    free subnet of ``prefix`` (default ``SKYPORT_NETWORK_PREFIX``).  Quota ``networks`` counts them (409).
    """
    subnet = parse_cidr(cidr) if cidr else None
    length = check_prefix(prefix) if prefix is not None else None
    if subnet is not None and length is not None and length != subnet.prefixlen:
        raise InvalidNetwork("prefix_length", f"Give either cidr or prefix_length, not both ({subnet}).")
    with transaction.atomic():
        quota = Quota.objects.select_for_update().filter(tenant=tenant).first()
        limit = quota.networks if quota else Quota.defaults().get("networks", 5)
        used = Network.objects.filter(tenant=tenant).count()
        if used >= limit:
            raise QuotaExceeded(
                f"Quota exceeded for networks: tenant {tenant.slug} has {used} of {limit}; delete one first."
            )
        if Network.objects.filter(tenant=tenant, name=name).exists():
            raise FieldConflict("name", f"Tenant {tenant.slug} already has a network named {name}.")

        def create() -> Network:
            _serialise_subnets()
            if subnet is not None:
                clash = _overlap(subnet, tenant)
                if clash:
                    raise FieldConflict("cidr", clash)
                return _insert(tenant, name, subnet)
            return _insert(tenant, name, _free_subnet(length or settings.SKYPORT_NETWORK_PREFIX))

        return _allocate(create)


def users(network: Network) -> list[str]:
    """Names of the live instances with a NIC on the network."""
    return sorted(
        set(Instance.objects.live().filter(ports__network=network).values_list("name", flat=True))
        | set(Instance.objects.live().filter(network=network).values_list("name", flat=True))
    )


def delete_network(network: Network) -> list[str]:
    """Delete a network no live instance uses (409 naming them) and tell its nodes to release it.

    Returns the queues told.  The nodes that carried it (:class:`HostPort`)
    get :class:`compute.spec.ReleaseNetwork` on commit: each removes the
    bridge, VXLAN device, resolver and rules at once if no workload of its
    own is still on the bridge (else its idle release does it later).
    """
    with transaction.atomic():
        _lock(network)
        in_use = users(network)
        if in_use:
            shown = ", ".join(in_use[:5]) + (f" and {len(in_use) - 5} more" if len(in_use) > 5 else "")
            raise Conflict(f"Network {network.name} is used by instances ({shown}); delete them first.")
        nodes = list(ComputeNode.objects.filter(host_ports__network=network).order_by("pk"))
        message = ReleaseNetwork(
            network=f"{network.tenant.slug}/{network.name}", bridge=network.bridge, vni=network.vni
        )
        network.delete()  # deleted instances keep their rows, with network null (SET_NULL)
        queues = []
        for node in nodes:
            if node.status == NodeStatus.UP:
                dispatch.send(node.queue, message)
                queues.append(node.queue)
        return queues


def _lock(network: Network) -> None:
    """Lock the network's row (no ordering: the model's would join the tenant table)."""
    list(Network.objects.select_for_update().filter(pk=network.pk).order_by().values_list("pk", flat=True))


def _free_address(network: Network) -> str:
    """The lowest free address of the network for a port or a node (.1-.9 are reserved).

    Locks the network row first, so allocations on one network queue up (on
    PostgreSQL; SQLite has one writer anyway) instead of racing on the
    unique address and retrying.
    """
    _lock(network)
    subnet = ipaddress.ip_network(network.cidr)
    used = (
        set(network.ports.values_list("address", flat=True))
        | set(network.host_ports.values_list("address", flat=True))
        | {network.host_address}
    )
    for host in itertools.islice(subnet.hosts(), 9, None):
        if str(host) not in used:
            return str(host)
    raise Conflict(f"Network {network} has no free address left.")


def allocate_port(network: Network, instance: Instance, index: int = 0) -> Port:
    """NIC ``index`` of the instance (0: eth0) on ``network``: the lowest free address and a random MAC."""

    def create() -> Port:
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        address = _free_address(network)
        return Port.objects.create(network=network, instance=instance, address=address, mac=mac, index=index)

    return _allocate(create)


def host_port(network: Network, node: ComputeNode) -> HostPort:
    """The node's own address on the network, allocated on first use and then kept."""

    def kept() -> HostPort | None:
        return HostPort.objects.filter(network=network, node=node).first()

    def create() -> HostPort:
        # again: a lost race retries and finds the winner's
        return kept() or HostPort.objects.create(network=network, node=node, address=_free_address(network))

    return kept() or _allocate(create)  # the usual case, the port is kept: no savepoint


def network_nodes(network: Network) -> list[ComputeNode]:
    """Nodes that carry the network: those with an instance that has a port on it."""
    return list(ComputeNode.objects.filter(instances__ports__network=network).distinct().order_by("pk"))


def segment(network: Network, node: ComputeNode) -> NetworkSegment:
    """The network as ``node`` carries it: bridge, the node's address, VNI and tunnel peers, router.

    Peers are the other nodes that carry the network, are up and tunnel.  A
    node without a tunnel address gets no tunnel (its bridge stays local).
    Every node gets the same gateway (the subnet's first address); egress
    needs both the network's and the tenant's switch on.  ``hosts`` are the
    names of the network's live instances, for the node's resolver.
    """
    prefix = ipaddress.ip_network(network.cidr).prefixlen
    local = node.tunnel_address or None
    serial = Network.objects.filter(pk=network.pk).order_by().values_list("peers_serial", flat=True).first()
    peers: tuple[str, ...] = ()
    if local:
        peers = tuple(
            sorted(
                {
                    str(n.tunnel_address)
                    for n in network_nodes(network)
                    if n.pk != node.pk
                    and n.status == NodeStatus.UP
                    and n.tunnel_address
                    and n.tunnel_address != local
                }
            )
        )
    return NetworkSegment(
        network=f"{network.tenant.slug}/{network.name}",
        bridge=network.bridge,
        mtu=network.mtu,
        host_address=f"{host_port(network, node).address}/{prefix}",
        vni=network.vni,
        tunnel_local=local,
        tunnel_peers=peers,
        gateway=f"{network.host_address}/{prefix}",
        egress=network.egress and network.tenant.network_egress,
        hosts=hosts(network),
        peers_serial=int(serial or 0),
    )


def hosts(network: Network) -> tuple[tuple[str, str], ...]:
    """(hostname, address) of the network's instances that are not deleted, for DNS."""
    rows = (
        Port.objects.filter(network=network)
        .exclude(instance__vm_state=VmState.DELETED)
        .order_by("address")
        .values_list("instance__name", "address")
    )
    return tuple((str(name), str(address)) for name, address in rows)


def sync_network(network: Network, exclude: ComputeNode | None = None, everyone: bool = False) -> list[str]:
    """After commit, send the network's segment to the up, tunnelling nodes that carry it (but ``exclude``).

    Sent when the set of carriers changed (each tunnelling node gets its
    full current peer list), when an instance joined the network (the
    resolvers learn its name), when a node stopped carrying it (the others
    prune it from their flood lists) and when an operator switched egress
    (then ``everyone``: also the nodes that do not tunnel).  Raises the
    network's ``peers_serial`` first: the UPDATE holds the row lock until
    commit, as address allocation does, so the lists of two concurrent
    changes are ordered and a node prunes only on the newer one
    (``compute.network.router.Router.ensure``).  Returns the queues it will
    send to.
    """
    Network.objects.filter(pk=network.pk).update(peers_serial=F("peers_serial") + 1)
    queues = []
    for node in network_nodes(network):
        if node.status != NodeStatus.UP or (exclude and node.pk == exclude.pk):
            continue
        if not node.tunnel_address and not everyone:
            continue
        dispatch.send(node.queue, segment(network, node))
        queues.append(node.queue)
    return queues


def release_node(node: ComputeNode, network_ids: list[int]) -> list[str]:
    """After ``node`` lost its last instance on these networks, prune it from the other carriers.

    Called when a delete is observed (the instance's ports are gone).  A
    network the node still carries through another instance is left alone.
    Returns the queues told.
    """
    queues: list[str] = []
    for network in Network.objects.filter(pk__in=network_ids).exclude(ports__instance__node=node).distinct():
        queues += sync_network(network)
    return queues


def set_egress(network: Network | None, tenant: Tenant | None, on: bool) -> list[str]:
    """Operators: switch egress of one network or of all of a tenant's networks; tell their nodes."""
    with transaction.atomic():
        if network is not None:
            Network.objects.filter(pk=network.pk).update(egress=on)
            targets = [network]
        else:
            assert tenant is not None
            Tenant.objects.filter(pk=tenant.pk).update(network_egress=on)
            targets = list(Network.objects.filter(tenant=tenant))
        queues = []
        for net in targets:
            net.refresh_from_db()
            queues += sync_network(net, everyone=True)
    return queues


def nics(instance: Instance) -> list[Port]:
    """The instance's ports in NIC order (eth0 first)."""
    return list(instance.ports.select_related("network__tenant").order_by("index", "pk"))


def attachments(instance: Instance, node: ComputeNode) -> tuple[NetworkAttachment, ...]:
    """The instance's NICs as ``node`` carries them: each port on its network's segment, in NIC order.

    Only the first NIC gets the gateway (the instance's one default route);
    every NIC gets its own network's resolver.
    """
    return tuple(
        NetworkAttachment(
            segment=segment(p.network, node),
            address=f"{p.address}/{ipaddress.ip_network(p.network.cidr).prefixlen}",
            mac=p.mac,
            gateway=p.network.host_address if i == 0 else None,
            dns=(p.network.host_address,),
        )
        for i, p in enumerate(nics(instance))
    )
