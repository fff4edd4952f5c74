"""The scheduler: a pure function from (request, nodes, load) to a placement.

It first decides the isolation technology (containers only on nodes
dedicated to the tenant, VMs anywhere the invariant allows), then filters
the nodes and weighs the survivors.  Every rejected node carries the reason,
so the portal can explain the choice (and the dry-run endpoint can show it).

Invariant kept by the filters, for any sequence of placements:
  * a node runs containers of at most one tenant, and only if dedicated to it;
  * a node with containers of tenant T runs no VM of another tenant
    (VMs of T go to shared nodes or T's own dedicated nodes);
  * used vCPUs, RAM and disk never exceed capacity x allocation ratio.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

CONTAINER = "container"
VM = "vm"


class NoValidHost(Exception):
    """No node can take the request; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class NodeView:
    """What the scheduler knows of one node right now."""

    name: str
    up: bool
    dedicated_to: str | None  # tenant slug, None for shared
    vcpus: int
    ram_mb: int
    disk_gb: int
    cpu_ratio: float = 4.0
    ram_ratio: float = 1.0
    disk_ratio: float = 1.0
    used_vcpus: int = 0
    used_ram_mb: int = 0
    used_disk_gb: int = 0
    drivers: frozenset[str] = frozenset({VM, CONTAINER})
    #: (tenant slug, kind) of every live instance on the node
    residents: frozenset[tuple[str, str]] = frozenset()
    #: anti-affinity group names that already have a member here
    groups: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Request:
    tenant: str
    kind: str  # auto | vm | container
    vcpus: int
    ram_mb: int
    disk_gb: int
    image_formats: frozenset[str]
    anti_affinity_group: str | None = None
    weigher: str = "spread"  # spread | pack


@dataclasses.dataclass(frozen=True)
class Placement:
    kind: str
    node: str
    reason: str
    rejected: tuple[tuple[str, str], ...] = ()


def _capacity_reason(n: NodeView, r: Request) -> str | None:
    checks = (
        ("vCPUs", n.used_vcpus + r.vcpus, n.vcpus * n.cpu_ratio),
        ("RAM", n.used_ram_mb + r.ram_mb, n.ram_mb * n.ram_ratio),
        ("disk", n.used_disk_gb + r.disk_gb, n.disk_gb * n.disk_ratio),
    )
    for what, need, have in checks:
        if need > have:
            return f"not enough {what} ({need} needed of {have:g})"
    return None


def reject_reason(n: NodeView, r: Request, kind: str) -> str | None:
    """Why node ``n`` cannot take request ``r`` as ``kind``; None if it can."""
    if not n.up:
        return "node is down"
    if kind not in n.drivers:
        return f"{kind} driver not operational"
    if kind == CONTAINER:
        if n.dedicated_to != r.tenant:
            return (
                "not dedicated to this tenant" if n.dedicated_to is None else f"dedicated to {n.dedicated_to}"
            )
        if any(t != r.tenant for t, _ in n.residents):
            return "hosts another tenant's instances"
    elif n.dedicated_to is not None and n.dedicated_to != r.tenant:
        return f"dedicated to {n.dedicated_to}"
    elif any(t != r.tenant and k == CONTAINER for t, k in n.residents):
        return "hosts another tenant's containers"
    if r.anti_affinity_group and r.anti_affinity_group in n.groups:
        return f"already hosts a member of group {r.anti_affinity_group}"
    return _capacity_reason(n, r)


def public_reason(reason: str) -> str:
    """A rejection reason without what only operators may know: which tenant a node is dedicated
    to, and the node's capacity and load (the numbers in the capacity reasons)."""
    if reason.startswith("dedicated to "):
        return "dedicated to another tenant"  # reject_reason names a tenant only when it is another
    if reason.startswith("not enough "):
        return reason.split(" (", 1)[0]
    return reason


#: said when nodes were refused for capacity: the tenant's quota is not what stops the launch
CAPACITY_HINT = (
    "This is the cloud's capacity, not your quota: choose a smaller flavor, delete or stop instances "
    "you no longer need, try again later, or ask an operator to add capacity."
)


def capacity_hint(rejected: Sequence[tuple[str, str]]) -> str:
    """:data:`CAPACITY_HINT` (with a leading space) when a node was refused for capacity, else ""."""
    return " " + CAPACITY_HINT if any(why.startswith("not enough ") for _, why in rejected) else ""


def summarize(rejected: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Rejected nodes as tenants see them: how many nodes per public reason, no node names."""
    counts: dict[str, int] = {}
    for _, why in rejected:
        public = public_reason(why)
        counts[public] = counts.get(public, 0) + 1
    return tuple((f"{n} node{'s' if n != 1 else ''}", why) for why, n in counts.items())


def tenancy_change_refusal(residents: frozenset[tuple[str, str]], new_owner: str | None) -> str | None:
    """Why a node with these residents cannot be dedicated to ``new_owner`` (None: shared)."""
    if new_owner is not None:
        others = sorted({t for t, _ in residents if t != new_owner})
        if others:
            return f"it hosts instances of {', '.join(others)}; move or delete them before dedicating it"
        return None
    if any(k == CONTAINER for _, k in residents):
        return "it hosts containers; delete them before sharing the node"
    return None


def _weight(n: NodeView, r: Request) -> tuple[float, str]:
    """Lower sorts first.  Spread prefers free RAM; pack prefers full nodes."""
    free = n.ram_mb * n.ram_ratio - n.used_ram_mb
    return (-free if r.weigher == "spread" else free, n.name)


def _best(nodes: Sequence[NodeView], r: Request, kind: str) -> tuple[NodeView | None, list[tuple[str, str]]]:
    ok: list[NodeView] = []
    rejected: list[tuple[str, str]] = []
    for n in nodes:
        why = reject_reason(n, r, kind)
        if why is None:
            ok.append(n)
        else:
            rejected.append((n.name, why))
    ok.sort(key=lambda n: _weight(n, r))
    return (ok[0] if ok else None), rejected


def schedule(r: Request, nodes: Sequence[NodeView]) -> Placement:
    """Choose kind and node, or raise :class:`NoValidHost` saying why."""
    has_container = "oci" in r.image_formats
    has_disk = bool(r.image_formats & {"qcow2", "raw"})
    if r.kind == CONTAINER and not has_container:
        raise NoValidHost("This image has no container artifact; launch it with kind 'vm'.")
    if r.kind == VM and not has_disk:
        raise NoValidHost("This image has no VM disk; launch it with kind 'container'.")

    if r.kind in (CONTAINER, "auto") and has_container:
        node, rejected = _best(nodes, r, CONTAINER)
        if node is not None:
            why = f"container on {node.name}: dedicated to {r.tenant}"
            return Placement(CONTAINER, node.name, why, tuple(rejected))
        if r.kind == CONTAINER or not has_disk:
            dedicated = [n for n in nodes if n.dedicated_to == r.tenant]
            detail = "; ".join(
                f"{name}: {why}" for name, why in rejected if any(d.name == name for d in dedicated)
            )
            raise NoValidHost(
                "Containers run only on nodes dedicated to one tenant, and "
                f"tenant '{r.tenant}' has no dedicated node with room"
                + (f" ({detail})" if detail else "")
                + ". Ask an operator to dedicate a node, or launch with kind 'vm' or 'auto'."
                + capacity_hint([r for r in rejected if any(d.name == r[0] for d in dedicated)])
            )

    node, rejected = _best(nodes, r, VM)
    if node is None:
        # counted, not named: the tenant learns why, not other tenants' node names and load
        detail = "; ".join(f"{label}: {why}" for label, why in summarize(rejected))
        raise NoValidHost(
            f"No node can take this VM now ({detail or 'no compute nodes are registered'})."
            + capacity_hint(rejected)
        )
    if r.kind == VM:
        why = f"vm on {node.name}: requested"
    elif not has_container:
        why = f"vm on {node.name}: the image has no container artifact"
    elif any(n.dedicated_to == r.tenant for n in nodes):
        why = f"vm on {node.name}: the dedicated nodes of {r.tenant} have no room for a container"
    else:
        why = f"vm on {node.name}: tenant {r.tenant} has no dedicated node, so it shares hosts with others"
    return Placement(VM, node.name, why, tuple(rejected))
