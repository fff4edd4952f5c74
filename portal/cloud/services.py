"""Instance orchestration: claim quota and capacity, place, enqueue, act.

Every state change happens in one transaction that locks what it counts
(quota row and node rows: ``SELECT … FOR UPDATE`` on PostgreSQL; SQLite runs
IMMEDIATE transactions, one writer at a time).  Messages to nodes leave only
in ``transaction.on_commit``, so a node never hears of a row that was rolled
back.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import itertools
import secrets
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any, TypeVar

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, Max, Q, Sum
from django.utils import timezone

from compute.spec import VNI_MAX, InstanceSpec, Kind, NetworkAttachment, NetworkSegment, to_json
from portal.audit.log import record
from portal.cloud import deadlines, metrics, scheduler
from portal.cloud.choices import NodeStatus, NodeTenancy, TaskState, VmState
from portal.cloud.models import ComputeNode, Flavor, HostPort, Instance, Network, Port
from portal.errors import Conflict, InvalidAction, QuotaExceeded
from portal.images import services as image_services
from portal.images.choices import ImageStatus
from portal.images.models import Image
from portal.tenancy.models import Quota, Tenant


@dataclasses.dataclass(frozen=True)
class Request:
    tenant: Tenant
    name: str
    image: Image
    flavor: Flavor
    requested_kind: str
    anti_affinity_group: str = ""
    ssh_keys: tuple[str, ...] = ()
    user_data: str = ""


@dataclasses.dataclass(frozen=True)
class Preview:
    """What a create would do: kind, node, reason and quota effect."""

    kind: str
    node: str
    reason: str
    quota: dict[str, dict[str, int]]
    rejected: tuple[tuple[str, str], ...]


#: action -> (task state while it runs, vm_states it may start from)
ACTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "start": (TaskState.STARTING, (VmState.STOPPED,)),
    "stop": (TaskState.STOPPING, (VmState.ACTIVE, VmState.PAUSED)),
    "reboot": (TaskState.REBOOTING, (VmState.ACTIVE,)),
    "pause": (TaskState.PAUSING, (VmState.ACTIVE,)),
    "resume": (TaskState.RESUMING, (VmState.PAUSED,)),
    "snapshot": (TaskState.SNAPSHOTTING, (VmState.ACTIVE, VmState.STOPPED, VmState.PAUSED)),
    "revert": (TaskState.SNAPSHOTTING, (VmState.ACTIVE, VmState.STOPPED, VmState.PAUSED)),
}
#: states a VM's disk can be published from
PUBLISHABLE = (VmState.ACTIVE, VmState.STOPPED, VmState.PAUSED)
CONTAINER_ACTIONS = {"start", "stop", "reboot", "pause", "resume"}


# ---------------------------------------------------------------- accounting
def usage(tenant_id: int) -> dict[str, int]:
    """What the tenant's live instances use, per quota limit."""
    agg = (
        Instance.objects.filter(tenant_id=tenant_id)
        .live()
        .aggregate(
            instances=Count("id"),
            vcpus=Sum("vcpus"),
            ram_mb=Sum("ram_mb"),
            disk_gb=Sum("disk_gb"),
            containers=Count("id", filter=Q(kind=Kind.CONTAINER)),
            vms=Count("id", filter=Q(kind=Kind.VM)),
        )
    )
    return {k: int(v or 0) for k, v in agg.items()}


def quota_effect(quota: Quota, used: dict[str, int], kind: str, flavor: Flavor) -> dict[str, dict[str, int]]:
    """Per limit: used now, requested, and the limit."""
    asked = {
        "instances": 1,
        "vcpus": flavor.vcpus,
        "ram_mb": flavor.ram_mb,
        "disk_gb": flavor.disk_gb,
        "containers": 1 if kind == Kind.CONTAINER else 0,
        "vms": 1 if kind == Kind.VM else 0,
    }
    return {k: {"used": used[k], "requested": asked[k], "limit": getattr(quota, k)} for k in Quota.LIMITS}


def check_quota(tenant: Tenant, effect: dict[str, dict[str, int]]) -> None:
    for limit, e in effect.items():
        if e["used"] + e["requested"] > e["limit"]:
            raise QuotaExceeded(
                f"Quota exceeded for {limit}: tenant {tenant.slug} uses {e['used']} of {e['limit']} "
                f"and this instance needs {e['requested']} more."
            )


def node_views(nodes: list[ComputeNode]) -> list[scheduler.NodeView]:
    """The scheduler's view of nodes: capacity, load and residents from live instances."""
    load: dict[int, dict[str, int]] = defaultdict(lambda: {"vcpus": 0, "ram_mb": 0, "disk_gb": 0})
    residents: dict[int, set[tuple[str, str]]] = defaultdict(set)
    groups: dict[int, set[str]] = defaultdict(set)
    rows = (
        Instance.objects.live()
        .filter(node__in=nodes)
        .values_list("node_id", "tenant__slug", "kind", "vcpus", "ram_mb", "disk_gb", "anti_affinity_group")
    )
    for node_id, slug, kind, vcpus, ram, disk, group in rows:
        load[node_id]["vcpus"] += vcpus
        load[node_id]["ram_mb"] += ram
        load[node_id]["disk_gb"] += disk
        residents[node_id].add((slug, kind))
        if group:
            groups[node_id].add(f"{slug}/{group}")
    views = []
    for n in nodes:
        drivers = frozenset(k for k, v in (n.drivers or {}).items() if v.get("ok"))
        views.append(
            scheduler.NodeView(
                name=n.name,
                up=n.status == NodeStatus.UP,
                dedicated_to=n.owner.slug if n.owner_id and n.owner else None,
                vcpus=n.vcpus,
                ram_mb=n.ram_mb,
                disk_gb=n.disk_gb,
                cpu_ratio=n.cpu_allocation_ratio,
                ram_ratio=n.ram_allocation_ratio,
                disk_ratio=n.disk_allocation_ratio,
                used_vcpus=load[n.pk]["vcpus"],
                used_ram_mb=load[n.pk]["ram_mb"],
                used_disk_gb=load[n.pk]["disk_gb"],
                drivers=drivers,
                residents=frozenset(residents[n.pk]),
                groups=frozenset(groups[n.pk]),
            )
        )
    return views


def _place(req: Request, lock: bool) -> tuple[scheduler.Placement, dict[str, dict[str, int]]]:
    quota_qs = Quota.objects.select_for_update() if lock else Quota.objects
    quota = quota_qs.get(tenant=req.tenant)
    node_qs = ComputeNode.objects.select_related("owner").order_by("pk")
    nodes = list(node_qs.select_for_update(of=("self",)) if lock else node_qs)
    sreq = scheduler.Request(
        tenant=req.tenant.slug,
        kind=req.requested_kind,
        vcpus=req.flavor.vcpus,
        ram_mb=req.flavor.ram_mb,
        disk_gb=req.flavor.disk_gb,
        image_formats=frozenset(req.image.formats()),
        anti_affinity_group=f"{req.tenant.slug}/{req.anti_affinity_group}"
        if req.anti_affinity_group
        else None,
        weigher=settings.SKYPORT_SCHEDULER_WEIGHER,
    )
    try:
        placement = scheduler.schedule(sreq, node_views(nodes))
    except scheduler.NoValidHost as exc:
        raise Conflict(str(exc)) from exc
    effect = quota_effect(quota, usage(req.tenant.pk), placement.kind, req.flavor)
    return placement, effect


def preview(req: Request) -> Preview:
    """Dry run: the decision, node and quota effect, without creating anything."""
    placement, effect = _place(req, lock=False)
    check_quota(req.tenant, effect)
    return Preview(placement.kind, placement.node, placement.reason, effect, placement.rejected)


# ---------------------------------------------------------------- networks
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
    """The network as ``node`` carries it: bridge, the node's address, VNI and tunnel peers.

    Peers are the other nodes that carry the network, are up and tunnel.  A
    node without a tunnel address gets no tunnel (its bridge stays local).
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
    )


def sync_network(network: Network, exclude: ComputeNode | None = None) -> list[str]:
    """After commit, send ``compute.network.ensure`` to the tunnelling, up nodes that carry the network.

    Each gets its full current peer list (nodes only add peers, see
    ``compute.tasks._prepare_bridge``).  Returns the queues it will send to.
    """
    queues = []
    for node in network_nodes(network):
        if node.status != NodeStatus.UP or not node.tunnel_address or (exclude and node.pk == exclude.pk):
            continue
        payload = to_json(segment(network, node))
        queue = node.queue
        transaction.on_commit(
            lambda queue=queue, payload=payload: _send(queue, "compute.network.ensure", [payload])  # type: ignore[misc]
        )
        queues.append(queue)
    return queues


# ---------------------------------------------------------------- specs
def build_spec(instance: Instance) -> InstanceSpec:
    if instance.image is None:
        raise Conflict(f"The image of instance {instance.name} has been deleted.")
    artifact = instance.image.artifact_for(instance.kind)
    if artifact is None:
        raise Conflict(f"Image {instance.image} has no artifact for a {instance.kind}.")
    node = instance.node
    if node is None:
        raise Conflict(f"Instance {instance.name} has no node.")
    nics = []
    for p in instance.ports.select_related("network__tenant"):
        seg = segment(p.network, node)
        prefix = ipaddress.ip_network(p.network.cidr).prefixlen
        nics.append(
            NetworkAttachment(
                network=seg.network,
                bridge=seg.bridge,
                address=f"{p.address}/{prefix}",
                mac=p.mac,
                mtu=seg.mtu,
                host_address=seg.host_address,
                vni=seg.vni,
                tunnel_local=seg.tunnel_local,
                tunnel_peers=seg.tunnel_peers,
            )
        )
    return InstanceSpec(
        instance_id=str(instance.pk),
        name=instance.name,
        hostname=instance.name,
        tenant=instance.tenant.slug,
        kind=Kind(instance.kind),
        vcpus=instance.vcpus,
        ram_mb=instance.ram_mb,
        disk_gb=instance.disk_gb,
        image=artifact.ref(),
        networks=tuple(nics),
        ssh_keys=tuple(instance.ssh_keys),
        user_data=instance.user_data or None,
        cpu_quota_percent=100 * instance.vcpus,
    )


def _send(queue: str, task: str, args: list[Any]) -> None:
    from portal.celery import app

    app.send_task(task, args=args, queue=queue)


def _event(instance: Instance, action: str, message: str, actor: Any = None, action_id: str = "") -> None:
    record(action, instance, actor=actor, actor_name="portal", message=message, request_id=action_id)


def _deadline(task: str) -> dt.datetime:
    """When the sweeper may declare ``task`` stuck: after broker redelivery plus the work (deadlines.py)."""
    return timezone.now() + dt.timedelta(seconds=deadlines.deadline_seconds(task))


# ---------------------------------------------------------------- create / act / delete
def create_instance(req: Request, user: Any) -> Instance:
    """Place the instance, claim quota and capacity, and send it to its node."""
    with transaction.atomic():
        placement, effect = _place(req, lock=True)
        check_quota(req.tenant, effect)
        if Instance.objects.filter(tenant=req.tenant, name=req.name).live().exists():
            raise Conflict(f"Tenant {req.tenant.slug} already has a live instance named '{req.name}'.")
        node = ComputeNode.objects.get(name=placement.node)
        network = default_network(req.tenant)
        action_id = uuid.uuid4().hex
        instance = Instance.objects.create(
            tenant=req.tenant,
            name=req.name,
            requested_kind=req.requested_kind,
            kind=placement.kind,
            isolation_reason=placement.reason,
            image=req.image,
            network=network,
            flavor=req.flavor,
            vcpus=req.flavor.vcpus,
            ram_mb=req.flavor.ram_mb,
            disk_gb=req.flavor.disk_gb,
            node=node,
            anti_affinity_group=req.anti_affinity_group,
            ssh_keys=list(req.ssh_keys),
            user_data=req.user_data,
            vm_state=VmState.BUILDING,
            task_state=TaskState.SPAWNING,
            action_id=action_id,
            task_deadline=_deadline(TaskState.SPAWNING),
            created_by=user,
        )
        new_on_node = node not in network_nodes(network)
        port = allocate_port(network, instance)
        instance.addresses = [{"network": network.name, "address": port.address, "mac": port.mac}]
        instance.save(update_fields=["addresses"])
        spec = to_json(build_spec(instance))
        _event(instance, "instance.schedule", placement.reason, user, action_id)
        transaction.on_commit(lambda: _send(node.queue, "compute.instance.create", [spec, action_id]))
        if new_on_node and node.tunnel_address:
            sync_network(network, exclude=node)  # the others learn the new peer
    return instance


def _claim(instance: Instance, task: str, allowed: tuple[str, ...], what: str) -> str:
    """Set task_state if none is set (conditional UPDATE), else 409."""
    action_id = uuid.uuid4().hex
    claimed = Instance.objects.filter(pk=instance.pk, task_state__isnull=True, vm_state__in=allowed).update(
        task_state=task, action_id=action_id, task_deadline=_deadline(task), updated_at=timezone.now()
    )
    if not claimed:
        instance.refresh_from_db()
        if instance.task_state:
            raise Conflict(
                f"Instance {instance.name} is busy ({instance.task_state}); try again when it finishes."
            )
        raise InvalidAction(f"Cannot {what} instance {instance.name} while it is {instance.vm_state}.")
    instance.refresh_from_db()
    return action_id


def act(instance: Instance, action: str, params: dict[str, Any], user: Any) -> Instance:
    """Claim the instance for ``action`` and send it to its node (202)."""
    if action not in ACTIONS:
        raise InvalidAction(f"Unknown action '{action}'; use one of {', '.join(sorted(ACTIONS))}.")
    if instance.kind == Kind.CONTAINER and action not in CONTAINER_ACTIONS:
        raise InvalidAction(f"Containers do not support '{action}'; snapshots are for VMs.")
    if action in ("snapshot", "revert") and not str(params.get("name", "")).strip():
        raise InvalidAction(f"'{action}' needs a snapshot name in params.name.")
    task, allowed = ACTIONS[action]
    with transaction.atomic():
        action_id = _claim(instance, task, allowed, action)
        node = instance.node
        if node is None:
            raise Conflict(f"Instance {instance.name} has no node.")
        _event(instance, f"dispatch.{action}", f"sent to {node.name}", user, action_id)
        args = [str(instance.pk), instance.kind, action, action_id, params]
        transaction.on_commit(lambda: _send(node.queue, "compute.instance.action", args))
    return instance


def publish(instance: Instance, name: str, version: str, description: str, user: Any) -> Image:
    """Publish a VM's disk as a new private image of its tenant.

    The image is created ``queued``; the node exports the disk (pausing a
    running VM for the copy), uploads it with a one-image token, and the
    upload is validated and imported like any other.
    """
    if instance.kind != Kind.VM:
        raise InvalidAction("Only VMs can be published; for a container, upload its OCI archive as an image.")
    source = instance.image
    with transaction.atomic():
        image = Image.objects.create(
            owner=instance.tenant,
            name=name,
            version=version,
            description=description or f"Disk of instance {instance.name}",
            os=source.os if source else "",
            min_ram_mb=source.min_ram_mb if source else 0,
            source_instance=instance,
            status=ImageStatus.QUEUED,
        )
        action_id = _claim(instance, TaskState.SNAPSHOTTING, PUBLISHABLE, "publish")
        node = instance.node
        if node is None:
            raise Conflict(f"Instance {instance.name} has no node.")
        image.status_reason = f"waiting for node {node.name} to upload the disk of {instance.name}"
        image.save(update_fields=["status_reason"])
        params = {
            "upload_url": f"{settings.SKYPORT_PORTAL_URL}/api/v1/blobs/uploads/{image.pk}",
            "upload_token": image_services.upload_token(image),
        }
        _event(
            instance, "dispatch.publish", f"image {image} (id {image.pk}) from {node.name}", user, action_id
        )
        args = [str(instance.pk), instance.kind, "publish", action_id, params]
        transaction.on_commit(lambda: _send(node.queue, "compute.instance.action", args))
    return image


def console(instance: Instance) -> dict[str, Any]:
    """The newest console tail the portal has, asking the node for a fresh one (rate-limited)."""
    refreshing = False
    node = instance.node
    if (
        node is not None
        and instance.vm_state != VmState.DELETED
        and metrics.should_refresh_console(str(instance.pk))
    ):
        _send(node.queue, "compute.instance.console", [str(instance.pk), instance.kind])
        refreshing = True
    tail = metrics.console(str(instance.pk))
    return {
        "text": tail["text"] if tail else "",
        "at": dt.datetime.fromtimestamp(tail["at"], tz=dt.UTC) if tail else None,
        "node": tail["node"] if tail else (node.name if node else None),
        "refreshing": refreshing,
    }


def stats(instance: Instance) -> dict[str, Any]:
    """Recent CPU and memory samples from the node's heartbeats, oldest first."""
    return {
        "vcpus": instance.vcpus,
        "memory_limit_bytes": instance.ram_mb * 2**20,
        "samples": [
            {**s, "at": dt.datetime.fromtimestamp(s["at"], tz=dt.UTC)}
            for s in metrics.samples(str(instance.pk))
        ],
    }


def delete_instance(instance: Instance, user: Any) -> Instance:
    """Ask the node to destroy the workload; the row is marked deleted when it reports.

    An instance that never reached a node (or whose node is gone from the
    database) is marked deleted at once.
    """
    with transaction.atomic():
        if instance.vm_state == VmState.DELETED:
            return instance
        allowed = tuple(s for s in VmState.values if s != VmState.DELETED)
        action_id = _claim(instance, TaskState.DELETING, allowed, "delete")
        node = instance.node
        if node is None:
            Instance.objects.filter(pk=instance.pk).update(
                vm_state=VmState.DELETED, task_state=None, deleted_at=timezone.now(), power_state="nostate"
            )
            instance.refresh_from_db()
            _event(instance, "dispatch.delete", "deleted (it had no node)", user, action_id)
            return instance
        _event(instance, "dispatch.delete", f"sent to {node.name}", user, action_id)
        args = [str(instance.pk), instance.kind, action_id]
        transaction.on_commit(lambda: _send(node.queue, "compute.instance.delete", args))
    return instance


# ---------------------------------------------------------------- nodes
def set_node_tenancy(node: ComputeNode, owner: Tenant | None) -> ComputeNode:
    """Dedicate ``node`` to ``owner`` (or share it with None), keeping the invariant.

    Dedicating is refused while the node hosts another tenant's instances;
    sharing is refused while it hosts containers.
    """
    with transaction.atomic():
        node = ComputeNode.objects.select_for_update().get(pk=node.pk)
        residents = frozenset(Instance.objects.live().filter(node=node).values_list("tenant__slug", "kind"))
        refusal = scheduler.tenancy_change_refusal(residents, owner.slug if owner else None)
        if refusal:
            raise Conflict(f"Cannot change node {node.name}: {refusal}.")
        if owner is not None:
            node.tenancy, node.owner = NodeTenancy.DEDICATED, owner
        else:
            node.tenancy, node.owner = NodeTenancy.SHARED, None
        node.save(update_fields=["tenancy", "owner"])
    return node


def set_node_enabled(node: ComputeNode, enabled: bool) -> ComputeNode:
    """Drain (disable) a node so the scheduler skips it, or enable it again.

    An enabled node is ``down`` until its next heartbeat marks it up; its
    instances keep running either way.
    """
    node.status = NodeStatus.DOWN if enabled else NodeStatus.DISABLED
    node.status_reason = "waiting for heartbeat" if enabled else "disabled by an operator"
    node.save(update_fields=["status", "status_reason"])
    return node
