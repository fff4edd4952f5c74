"""Instance bookkeeping: quota claims in one locked transaction."""

from __future__ import annotations

import dataclasses
from typing import Any

from django.db import transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone

from portal.api.exceptions import Conflict
from portal.cloud import isolation
from portal.cloud.choices import Kind, NodeStatus, NodeTenancy, VmState
from portal.cloud.models import ComputeNode, Flavor, Instance
from portal.tenancy.models import Quota, Tenant


class QuotaExceeded(Conflict):
    default_code = "quota_exceeded"


@dataclasses.dataclass(frozen=True)
class Request:
    tenant: Tenant
    name: str
    image: str
    flavor: Flavor
    requested_kind: str


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


def dedicated_nodes(tenant: Tenant) -> list[str]:
    return list(
        ComputeNode.objects.filter(
            tenancy=NodeTenancy.DEDICATED, owner=tenant, status=NodeStatus.UP
        ).values_list("name", flat=True)
    )


def create_instance(req: Request, user: Any) -> Instance:
    """Decide the kind, claim quota and write the record, atomically.

    The quota row is locked (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite
    runs IMMEDIATE transactions, one writer at a time), so concurrent
    requests can never overshoot a limit.
    """
    with transaction.atomic():
        quota = Quota.objects.select_for_update().get(tenant=req.tenant)
        try:
            decision = isolation.decide(
                req.requested_kind, req.tenant.slug, dedicated_nodes(req.tenant), image_has_container=True
            )
        except isolation.IsolationRefused as exc:
            raise Conflict(str(exc)) from exc
        effect = quota_effect(quota, usage(req.tenant.pk), decision.kind, req.flavor)
        for limit, e in effect.items():
            if e["used"] + e["requested"] > e["limit"]:
                raise QuotaExceeded(
                    f"Quota exceeded for {limit}: tenant {req.tenant.slug} uses {e['used']} of {e['limit']} "
                    f"and this instance needs {e['requested']} more."
                )
        if Instance.objects.filter(tenant=req.tenant, name=req.name).live().exists():
            raise Conflict(f"Tenant {req.tenant.slug} already has a live instance named '{req.name}'.")
        return Instance.objects.create(
            tenant=req.tenant,
            name=req.name,
            requested_kind=req.requested_kind,
            kind=decision.kind,
            isolation_reason=decision.reason,
            image=req.image,
            flavor=req.flavor,
            vcpus=req.flavor.vcpus,
            ram_mb=req.flavor.ram_mb,
            disk_gb=req.flavor.disk_gb,
            created_by=user,
        )


def delete_instance(instance: Instance) -> Instance:
    """Mark the record deleted (releasing its quota); refuse while an action runs."""
    updated = (
        Instance.objects.filter(pk=instance.pk, task_state__isnull=True)
        .exclude(vm_state=VmState.DELETED)
        .update(vm_state=VmState.DELETED, deleted_at=timezone.now(), power_state="nostate")
    )
    if not updated:
        instance.refresh_from_db()
        if instance.vm_state == VmState.DELETED:
            return instance
        raise Conflict(
            f"Instance {instance.name} is busy ({instance.task_state}); try again when it finishes."
        )
    instance.refresh_from_db()
    return instance
