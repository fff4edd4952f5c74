"""What pages show, computed from the domain: allowed actions, usage bars, node load."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from django.db.models import Exists, OuterRef

from compute.spec import Action
from portal.cloud import placement, states
from portal.cloud.models import ComputeNode, ExternalAddress, Instance, Port, PublishedPort, SecurityGroup
from portal.images.models import Image
from portal.tenancy.choices import Role
from portal.tenancy.models import Quota
from portal.tenancy.querysets import Actor
from portal.web.access import role_refusal

#: buttons shown on an instance, in this order (snapshot/revert have their own form)
BUTTON_ACTIONS = states.BUTTON_ACTIONS
LIMIT_LABELS = {
    "instances": "Instances",
    "vcpus": "vCPUs",
    "ram_mb": "Memory (MiB)",
    "disk_gb": "Disk (GiB)",
    "containers": "Containers",
    "vms": "VMs",
}


def action_refusal(instance: Instance, action: Action) -> str | None:
    """Why the instance's node cannot run ``action`` for its kind at all, or None (``states``)."""
    node = instance.node.name if instance.node else ""
    return states.unsupported(action, instance.kind, node, instance.capabilities)


def action_allowed(instance: Instance, action: Action) -> bool:
    """Whether ``services.act`` (or ``publish``) would accept ``action`` now: the same rules."""
    return action_refusal(instance, action) is None and states.may_start(
        action, instance.vm_state, instance.task_state
    )


def delete_allowed(instance: Instance) -> bool:
    return states.may_start(Action.DELETE, instance.vm_state, instance.task_state)


def image_delete_refusal(who: Actor, image: Image) -> str | None:
    """Why ``who`` may not delete ``image`` (public images: operators only), or None."""
    if image.owner_id is None and not who.is_operator:
        return "Only operators delete public images."
    return role_refusal(who, image.owner_id, Role.MEMBER)


@dataclasses.dataclass(frozen=True)
class Bar:
    """One usage bar: ``used`` of ``limit`` (percent is capped at 100 for drawing)."""

    label: str
    used: int
    limit: int

    @property
    def percent(self) -> int:
        if self.limit <= 0:
            return 100 if self.used else 0
        return min(100, round(100 * self.used / self.limit))

    @property
    def level(self) -> str:
        return "high" if self.percent >= 90 else "mid" if self.percent >= 70 else "low"


def quota_bars(quota: Quota, used: dict[str, int]) -> list[Bar]:
    return [Bar(LIMIT_LABELS[k], used.get(k, 0), getattr(quota, k)) for k in Quota.LIMITS]


@dataclasses.dataclass(frozen=True)
class EffectRow:
    label: str
    used: int
    requested: int
    limit: int

    @property
    def after(self) -> int:
        return self.used + self.requested

    @property
    def over(self) -> bool:
        return self.after > self.limit


def quota_effect_rows(effect: dict[str, dict[str, int]]) -> list[EffectRow]:
    """The quota effect of ``placement.preview`` as table rows."""
    return [
        EffectRow(LIMIT_LABELS.get(k, k), e["used"], e["requested"], e["limit"]) for k, e in effect.items()
    ]


@dataclasses.dataclass(frozen=True)
class NodeLoad:
    node: ComputeNode
    bars: list[Bar]


def node_loads(nodes: list[ComputeNode]) -> list[NodeLoad]:
    """Capacity bars per node, from the scheduler's own view (allocation ratios applied)."""
    views = {v.name: v for v in placement.node_views(nodes)}
    out = []
    for node in nodes:
        v = views[node.name]
        out.append(
            NodeLoad(
                node,
                [
                    Bar("vCPUs", v.used_vcpus, int(v.vcpus * v.cpu_ratio)),
                    Bar("Memory (MiB)", v.used_ram_mb, int(v.ram_mb * v.ram_ratio)),
                    Bar("Disk (GiB)", v.used_disk_gb, int(v.disk_gb * v.disk_ratio)),
                ],
            )
        )
    return out


def sparkline_points(values: Sequence[float], width: int = 120, height: int = 30) -> str:
    """SVG polyline points scaling ``values`` into a box of width by height (empty for < 2 values)."""
    if len(values) < 2:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    step = width / (len(values) - 1)
    return " ".join(f"{i * step:.1f},{height - (v - low) / span * height:.1f}" for i, v in enumerate(values))


@dataclasses.dataclass(frozen=True)
class NetworkPanel:
    """An instance's network as its page shows it: groups (all of its tenant's, which are attached),
    its published ports, and whether its node has an external address to publish on."""

    groups: Sequence[SecurityGroup]
    ports: Sequence[PublishedPort]
    can_publish_here: bool
    nics: Sequence[Port] = ()  # in NIC order: eth0 (the default route and published ports) first

    @property
    def attached(self) -> list[SecurityGroup]:
        return [g for g in self.groups if getattr(g, "attached", False)]


def network_panel(instance: Instance) -> NetworkPanel:
    """Four queries whatever the number of groups, ports and NICs."""
    through = SecurityGroup.instances.through
    attached = through.objects.filter(securitygroup_id=OuterRef("pk"), instance_id=instance.pk)
    groups = list(
        SecurityGroup.objects.filter(tenant_id=instance.tenant_id)
        .annotate(attached=Exists(attached))
        .order_by("name")
    )
    ports = list(
        PublishedPort.objects.filter(instance=instance)
        .select_related("external")
        .order_by("protocol", "port")
    )
    external = (
        instance.node_id is not None and ExternalAddress.objects.filter(node_id=instance.node_id).exists()
    )
    nics = list(Port.objects.filter(instance=instance).select_related("network").order_by("index", "pk"))
    return NetworkPanel(groups, ports, external, nics)
