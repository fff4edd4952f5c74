"""Placement: the quota a create would use and the node the scheduler picks for it.

``usage`` and ``quota_effect`` count what a tenant's live instances use;
``node_views`` turns node rows and their live instances into the scheduler's
pure input (:mod:`portal.cloud.scheduler`).  ``place`` runs both, with the
quota and node rows locked when the caller is about to create.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from django.conf import settings
from django.db.models import Count, Q, Sum

from compute.spec import Kind
from portal.cloud import scheduler
from portal.cloud.choices import NodeStatus, RequestedKind
from portal.cloud.models import ComputeNode, Flavor, Instance, Network, SecurityGroup
from portal.errors import Conflict, NotFound, QuotaExceeded
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
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = ""
    run_as: str = ""
    restart_policy: str = "no"
    # (volume id, mount path): a container's ext4 volumes attached at create; it is placed on their node
    volumes: tuple[tuple[str, str], ...] = ()

    @property
    def overrides(self) -> list[str]:
        """Names of the container-only launch overrides this request sets."""
        given = {
            "command": self.command,
            "env": self.env,
            "workdir": self.workdir,
            "user": self.run_as,
            "restart_policy": self.restart_policy != "no",
            "volumes": self.volumes,
        }
        return [k for k, v in given.items() if v]

    security_groups: tuple[SecurityGroup, ...] = ()  # none: the tenant's default group
    networks: tuple[Network, ...] = ()  # the NICs in order (eth0 first); none: the tenant's default network


@dataclasses.dataclass(frozen=True)
class Preview:
    """What a create would do: kind, node, reason and quota effect."""

    kind: str
    node: str
    reason: str
    quota: dict[str, dict[str, int]]
    rejected: tuple[tuple[str, str], ...]


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


def scheduler_request(
    tenant: Tenant, kind: str, sizes: tuple[int, int, int], image: Image, group: str
) -> scheduler.Request:
    """The scheduler's request for an instance of ``tenant``: creates and evacuations build it here."""
    vcpus, ram_mb, disk_gb = sizes
    return scheduler.Request(
        tenant=tenant.slug,
        kind=kind,
        vcpus=vcpus,
        ram_mb=ram_mb,
        disk_gb=disk_gb,
        image_formats=frozenset(image.formats()),
        anti_affinity_group=f"{tenant.slug}/{group}" if group else None,
        weigher=settings.SKYPORT_SCHEDULER_WEIGHER,
    )


def place(req: Request, lock: bool) -> tuple[scheduler.Placement, dict[str, dict[str, int]], ComputeNode]:
    """The scheduler's choice for ``req``, its quota effect and the chosen node's row.

    With ``lock`` the quota and node rows are locked until commit."""
    quota_qs = Quota.objects.select_for_update() if lock else Quota.objects
    quota = quota_qs.get(tenant=req.tenant)
    node_qs = ComputeNode.objects.select_related("owner").order_by("pk")
    nodes = list(node_qs.select_for_update(of=("self",)) if lock else node_qs)
    sreq = scheduler_request(
        req.tenant,
        req.requested_kind,
        (req.flavor.vcpus, req.flavor.ram_mb, req.flavor.disk_gb),
        req.image,
        req.anti_affinity_group,
    )
    if req.volumes:
        nodes = [n for n in nodes if n.pk == _volume_node(req)]
    views = node_views(nodes)
    used = usage(req.tenant.pk)
    try:
        placement = scheduler.schedule(sreq, views)
        effect = quota_effect(quota, used, placement.kind, req.flavor)
        full = _full(effect, "containers")
        if req.requested_kind == RequestedKind.AUTO and placement.kind == Kind.CONTAINER and full:
            # kind=auto: a full container quota is no reason to refuse an image that also has
            # a VM disk; it becomes a VM (whose own quota check still applies)
            vm = scheduler.schedule(dataclasses.replace(sreq, kind=Kind.VM), views)
            if vm.kind == Kind.VM:
                why = (
                    vm.reason.split(":", 1)[0]
                    + f": the container quota of {req.tenant.slug} is full ({full})"
                )
                placement = dataclasses.replace(vm, reason=why)
                effect = quota_effect(quota, used, placement.kind, req.flavor)
    except scheduler.NoValidHost as exc:
        raise Conflict(str(exc)) from exc
    chosen = {n.name: n for n in nodes}[placement.node]  # the scheduler chose among these rows
    return placement, effect, chosen


def _volume_node(req: Request) -> int:
    """The node that holds the volumes a container is created with (all on one node, else 409)."""
    from portal.storage.models import Volume

    wanted = [vid for vid, _ in req.volumes]
    found = dict(Volume.objects.live().filter(tenant=req.tenant, pk__in=wanted).values_list("pk", "node_id"))
    for vid in wanted:
        if not any(str(pk) == vid for pk in found):
            raise NotFound(f"No volume {vid} in tenant {req.tenant.slug}.")
    if len(set(found.values())) > 1:
        raise Conflict(
            "These volumes are on different nodes; a container mounts only volumes of its own node."
        )
    return next(iter(found.values()))


def _full(effect: dict[str, dict[str, int]], limit: str) -> str:
    """ "used of limit" when one more of ``limit`` would exceed the quota, else ""."""
    e = effect[limit]
    return f"{e['used']} of {e['limit']}" if e["used"] + e["requested"] > e["limit"] else ""


def preview(req: Request) -> Preview:
    """Dry run: the decision, node and quota effect, without creating anything."""
    placement, effect, _ = place(req, lock=False)
    check_quota(req.tenant, effect)
    return Preview(placement.kind, placement.node, placement.reason, effect, placement.rejected)
