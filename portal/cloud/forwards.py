"""Published ports: an instance's tcp/udp port reachable at an external address:port of its node.

Why a service of its own: publishing checks the instance (live, on a node,
with an address), the quota and the node's external address pool, picks a
free external port under a row lock, and then tells the node the instance's
*complete* list of forwards (:class:`compute.spec.InstanceForwards`) on
commit, so a lost or reordered message is repaired by the next one.  The
node DNATs in Skyport's own nftables table; the rows go when the instance
is deleted (the node drops the rules when it destroys the workload).
"""

from __future__ import annotations

from django.db import IntegrityError, transaction

from compute.spec import Forward, InstanceForwards, Protocol
from portal.cloud import dispatch
from portal.cloud.choices import VmState
from portal.cloud.models import ExternalAddress, Instance, PublishedPort
from portal.errors import Conflict, QuotaExceeded
from portal.metering import resources as metering
from portal.tenancy.models import Quota


def publish(instance: Instance, protocol: str, port: int, external_port: int | None = None) -> PublishedPort:
    """Publish ``protocol``/``port`` of ``instance`` on its node (the given or first free external port)."""
    with transaction.atomic():
        # of=self: PostgreSQL refuses FOR UPDATE on the nullable side of the outer join to the node
        instance = (
            Instance.objects.select_for_update(of=("self",))
            .select_related("node", "tenant")
            .get(pk=instance.pk)
        )
        if instance.vm_state in (VmState.DELETED, VmState.ERROR) or instance.node is None:
            raise Conflict(f"Instance {instance.name} is {instance.vm_state} and has no node to publish on.")
        if PublishedPort.objects.filter(instance=instance, protocol=protocol, port=port).exists():
            raise Conflict(f"{protocol}/{port} of {instance.name} is already published.")
        quota = Quota.objects.filter(tenant=instance.tenant).first()
        limit = quota.published_ports if quota else Quota.defaults().get("published_ports", 10)
        used = PublishedPort.objects.filter(tenant=instance.tenant).count()
        if used >= limit:
            raise QuotaExceeded(
                f"Tenant {instance.tenant.slug} has used its quota of {limit} published ports."
            )
        pools = list(ExternalAddress.objects.select_for_update().filter(node=instance.node).order_by("pk"))
        if not pools:
            raise Conflict(
                f"Node {instance.node.name} has no external address; an operator must add one "
                "(manage.py node external-address)."
            )
        external, chosen = _pick(pools, protocol, external_port)
        try:
            with transaction.atomic():
                row = PublishedPort.objects.create(
                    tenant=instance.tenant,
                    instance=instance,
                    protocol=protocol,
                    port=port,
                    external=external,
                    external_port=chosen,
                )
        except IntegrityError:
            raise Conflict(
                f"{external.address}:{chosen}/{protocol} was published meanwhile; try again."
            ) from None
        metering.port_published(row.pk, instance.tenant_id, instance.pk, instance.kind, row.created_at)
        send_forwards(instance)
    return row


def _pick(pools: list[ExternalAddress], protocol: str, wanted: int | None) -> tuple[ExternalAddress, int]:
    for pool in pools:
        taken = set(
            PublishedPort.objects.filter(external=pool, protocol=protocol).values_list(
                "external_port", flat=True
            )
        )
        if wanted is not None:
            if not pool.first_port <= wanted <= pool.last_port:
                continue
            if wanted in taken:
                raise Conflict(f"{pool.address}:{wanted}/{protocol} is already published.")
            return pool, wanted
        for candidate in range(pool.first_port, pool.last_port + 1):
            if candidate not in taken:
                return pool, candidate
    if wanted is not None:
        ranges = ", ".join(f"{p.first_port}-{p.last_port}" for p in pools)
        raise Conflict(f"External port {wanted} is outside this node's published range ({ranges}).")
    raise Conflict("Every external port of this node's external addresses is published.")


def unpublish(row: PublishedPort) -> None:
    with transaction.atomic():
        instance = row.instance
        metering.port_unpublished(row.pk, row.tenant_id, instance.pk, instance.kind)
        row.delete()
        send_forwards(instance)


def forwards_of(instance: Instance) -> InstanceForwards:
    """The instance's complete list of published ports, as its node applies them."""
    port = instance.ports.order_by("index", "pk").first()  # published ports reach the first NIC (eth0)
    rows = PublishedPort.objects.filter(instance=instance).select_related("external")
    return InstanceForwards(
        str(instance.pk),
        tuple(
            Forward(Protocol(r.protocol), r.external.address, r.external_port, port.address, r.port)
            for r in rows
            if port is not None
        ),
    )


def send_forwards(instance: Instance) -> None:
    """After commit, tell the instance's node its complete list of forwards."""
    if instance.node is not None:
        dispatch.send(instance.node.queue, forwards_of(instance))


def forget(instance: Instance) -> int:
    """Drop the rows of a deleted instance (its node removes the rules with the workload)."""
    for pk in PublishedPort.objects.filter(instance=instance).values_list("pk", flat=True):
        metering.port_unpublished(pk, instance.tenant_id, instance.pk, instance.kind)
    deleted, _ = PublishedPort.objects.filter(instance=instance).delete()
    return deleted
