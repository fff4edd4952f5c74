"""The isolation policy: which technology an instance gets, and why.

Containers share the host kernel, so they isolate applications of one owner
only: a tenant's containers run only on nodes dedicated to that tenant.  VMs
isolate mutually untrusted tenants and may run anywhere.  This module is a
pure function of its arguments; the scheduler places the result.
"""

from __future__ import annotations

import dataclasses

from portal.cloud.choices import Kind, RequestedKind


class IsolationRefused(Exception):
    """The requested kind is not allowed for this tenant now; says what to do."""


@dataclasses.dataclass(frozen=True)
class Decision:
    kind: str
    reason: str


def decide(
    requested: str,
    tenant: str,
    dedicated_nodes: list[str],
    image_has_container: bool,
    image_has_disk: bool = True,
) -> Decision:
    """Choose ``vm`` or ``container`` for a request of kind ``auto|vm|container``.

    ``dedicated_nodes`` are the names of up nodes dedicated to ``tenant`` that
    have room.  Raises :class:`IsolationRefused` for ``container`` without
    such a node or without a container artifact.
    """
    if requested == RequestedKind.VM:
        if not image_has_disk:
            raise IsolationRefused("This image has no VM disk; choose kind 'container' or another image.")
        return Decision(Kind.VM, "vm as requested: VMs may run on any node")
    if requested == RequestedKind.CONTAINER:
        if not image_has_container:
            raise IsolationRefused("This image has no container artifact; choose kind 'vm' or another image.")
        if not dedicated_nodes:
            raise IsolationRefused(
                f"Containers run only on nodes dedicated to one tenant, and tenant '{tenant}' has no "
                "dedicated node with room. Ask an operator to dedicate a node, "
                "or launch with kind 'vm' or 'auto'."
            )
        return Decision(
            Kind.CONTAINER, f"container as requested: node {dedicated_nodes[0]} is dedicated to {tenant}"
        )
    if dedicated_nodes and image_has_container:
        return Decision(Kind.CONTAINER, f"container: node {dedicated_nodes[0]} is dedicated to {tenant}")
    if not image_has_disk:
        raise IsolationRefused(
            f"This image has only a container artifact and tenant '{tenant}' has no dedicated node with room."
        )
    if dedicated_nodes:
        return Decision(Kind.VM, "vm: the image has no container artifact")
    return Decision(
        Kind.VM, f"vm: tenant {tenant} has no dedicated node, so it shares hosts with other tenants"
    )
