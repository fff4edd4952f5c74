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
from django.db import IntegrityError, transaction
from django.db.models import Max

from compute.spec import VNI_MAX, NetworkAttachment, NetworkSegment
from portal.cloud import dispatch
from portal.cloud.choices import NodeStatus, VmState
from portal.cloud.models import ComputeNode, HostPort, Instance, Network, Port
from portal.errors import Conflict
from portal.tenancy.models import Tenant

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
    return _allocate(lambda: _default_network(tenant))


def _default_network(tenant: Tenant) -> Network:
    existing = Network.objects.filter(tenant=tenant, name="default").first()
    if existing is not None:
        return existing
    pool = ipaddress.ip_network(settings.SKYPORT_NETWORK_POOL)
    prefix = settings.SKYPORT_NETWORK_PREFIX
    taken = set(Network.objects.values_list("cidr", flat=True))
    for subnet in pool.subnets(new_prefix=prefix):
        if str(subnet) not in taken:
            net = Network.objects.create(
                tenant=tenant,
                name="default",
                cidr=str(subnet),
                bridge=f"skn-{secrets.token_hex(4)}",
                vni=allocate_vni(),
                host_address=str(subnet.network_address + 1),
            )
            return net
    raise Conflict(f"The network pool {pool} is exhausted; an operator must widen SKYPORT_NETWORK_POOL.")


def _free_address(network: Network) -> str:
    """The lowest free address of the network for a port or a node (.1-.9 are reserved).

    Locks the network row first, so allocations on one network queue up (on
    PostgreSQL; SQLite has one writer anyway) instead of racing on the
    unique address and retrying.
    """
    list(Network.objects.select_for_update().filter(pk=network.pk).values_list("pk", flat=True))
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


def allocate_port(network: Network, instance: Instance) -> Port:
    def create() -> Port:
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        address = _free_address(network)
        return Port.objects.create(network=network, instance=instance, address=address, mac=mac)

    return _allocate(create)


def host_port(network: Network, node: ComputeNode) -> HostPort:
    """The node's own address on the network, allocated on first use and then kept."""

    def create() -> HostPort:
        existing = HostPort.objects.filter(network=network, node=node).first()
        if existing is not None:
            return existing
        return HostPort.objects.create(network=network, node=node, address=_free_address(network))

    return _allocate(create)


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
    full current peer list; nodes only add peers, see
    ``compute.network.router.prepare_devices``), when an instance joined the
    network (the resolvers learn its name) and when an operator switched
    egress (then ``everyone``: also the nodes that do not tunnel).  Returns
    the queues it will send to.
    """
    queues = []
    for node in network_nodes(network):
        if node.status != NodeStatus.UP or (exclude and node.pk == exclude.pk):
            continue
        if not node.tunnel_address and not everyone:
            continue
        dispatch.send(node.queue, segment(network, node))
        queues.append(node.queue)
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


def attachments(instance: Instance, node: ComputeNode) -> tuple[NetworkAttachment, ...]:
    """The instance's NICs as ``node`` carries them: each port on its network's segment."""
    return tuple(
        NetworkAttachment(
            segment=segment(p.network, node),
            address=f"{p.address}/{ipaddress.ip_network(p.network.cidr).prefixlen}",
            mac=p.mac,
            gateway=p.network.host_address,
            dns=(p.network.host_address,),
        )
        for p in instance.ports.select_related("network__tenant")
    )
