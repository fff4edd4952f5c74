"""Instance lifecycle: create, act, publish, delete; console and stats; node tenancy.

Every state change happens in one transaction that locks what it counts
(quota row and node rows: ``SELECT … FOR UPDATE`` on PostgreSQL; SQLite runs
IMMEDIATE transactions, one writer at a time).  Which action may start from
which state is :mod:`portal.cloud.states`; placement and quota are
:mod:`portal.cloud.placement`, addresses and segments :mod:`portal.cloud.networks`.
Messages to nodes leave after commit (:mod:`portal.cloud.dispatch`).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from compute.spec import (
    Action,
    ConsoleRequest,
    CreateInstance,
    DeleteInstance,
    InstanceAction,
    InstanceSpec,
    Kind,
    PowerState,
    VolumeMount,
)
from portal.audit.log import record
from portal.cloud import (
    deadlines,
    dispatch,
    forwards,
    metrics,
    networks,
    placement,
    scheduler,
    secgroups,
    states,
)
from portal.cloud.choices import NodeStatus, NodeTenancy, VmState
from portal.cloud.models import ComputeNode, Flavor, Instance
from portal.cloud.placement import Request
from portal.errors import Conflict, InvalidAction, QuotaExceeded
from portal.images import services as image_services
from portal.images.choices import ImageStatus
from portal.images.models import Image
from portal.storage import volumes as storage_volumes
from portal.storage.choices import VolumeStatus
from portal.tenancy.models import Quota, Tenant

__all__ = ["Request", "act", "create_instance", "delete_instance", "dispatch_action", "publish", "resize"]


def build_spec(instance: Instance) -> InstanceSpec:
    if instance.image is None:
        raise Conflict(f"The image of instance {instance.name} has been deleted.")
    artifact = instance.image.artifact_for(instance.kind)
    if artifact is None:
        raise Conflict(f"Image {instance.image} has no artifact for a {instance.kind}.")
    node = _node(instance)
    try:
        id_base = instance.tenant.id_base if instance.kind == Kind.CONTAINER else 0
    except ValueError as exc:
        raise Conflict(str(exc)) from exc
    security_version = secgroups.next_version(instance.tenant_id)  # before the rules are read
    security = secgroups.rules_for(instance)
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
        networks=networks.attachments(instance, node),
        ssh_keys=tuple(instance.ssh_keys),
        user_data=instance.user_data or None,
        vendor_data=settings.SKYPORT_VENDOR_DATA if instance.kind == Kind.VM else None,
        cpu_quota_percent=100 * instance.vcpus,
        id_base=id_base,
        command=tuple(instance.command),
        env=tuple((str(k), str(v)) for k, v in instance.env.items()),
        workdir=instance.workdir,
        user=instance.run_as,
        restart_policy=instance.restart_policy,
        security_version=security_version,
        security=security,
        security_members=secgroups.members_of(security, security_version),
        volumes=_volume_mounts(instance),
    )


def _volume_mounts(instance: Instance) -> tuple[VolumeMount, ...]:
    """A container's attached ext4 volumes (docs/storage.md); a VM's volumes are disks, not in the spec."""
    if instance.kind != Kind.CONTAINER or instance.pk is None:
        return ()
    attached = instance.volumes.filter(status=VolumeStatus.IN_USE).exclude(mount_path="")
    return tuple(VolumeMount(str(v.pk), v.mount_path) for v in attached.order_by("mount_path"))


def _node(instance: Instance) -> ComputeNode:
    if instance.node is None:
        raise Conflict(f"Instance {instance.name} has no node.")
    return instance.node


def _event(instance: Instance, action: str, message: str, actor: Any = None, action_id: str = "") -> None:
    record(action, instance, actor=actor, actor_name="portal", message=message, request_id=action_id)


def _deadline(task: str) -> dt.datetime:
    """When the sweeper may declare ``task`` stuck: after broker redelivery plus the work (deadlines.py)."""
    return timezone.now() + dt.timedelta(seconds=deadlines.deadline_seconds(task))


# ---------------------------------------------------------------- create / act / delete
def create_instance(req: Request, user: Any) -> Instance:
    """Place the instance, claim quota and capacity, and send it to its node."""
    rule = states.RULES[Action.CREATE]
    with transaction.atomic():
        chosen, effect, node = placement.place(req, lock=True)
        if req.overrides and chosen.kind != Kind.CONTAINER:
            raise Conflict(
                f"{', '.join(req.overrides)} apply to containers only, and this instance would be a VM "
                f"({chosen.reason}). Leave them out or launch with kind=container."
            )
        placement.check_quota(req.tenant, effect)
        if Instance.objects.filter(tenant=req.tenant, name=req.name).live().exists():
            raise Conflict(f"Tenant {req.tenant.slug} already has a live instance named '{req.name}'.")
        if any(g.tenant_id != req.tenant.pk for g in req.security_groups):
            raise Conflict("A security group of another tenant cannot be attached.")
        if any(n.tenant_id != req.tenant.pk for n in req.networks):
            raise Conflict("A network of another tenant cannot be attached.")
        nics = list(req.networks) or [networks.default_network(req.tenant)]
        network = nics[0]
        action_id = uuid.uuid4().hex
        instance = Instance.objects.create(
            tenant=req.tenant,
            name=req.name,
            requested_kind=req.requested_kind,
            kind=chosen.kind,
            isolation_reason=chosen.reason,
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
            command=list(req.command),
            env=dict(req.env),
            workdir=req.workdir,
            run_as=req.run_as,
            restart_policy=req.restart_policy,
            vm_state=VmState.BUILDING,
            task_state=rule.task,
            action_id=action_id,
            task_deadline=_deadline(rule.task),
            created_by=user,
        )
        groups = list(req.security_groups) or [secgroups.default_group(req.tenant)]
        instance.security_groups.add(*groups)  # a new row: nothing to replace
        ports = [networks.allocate_port(net, instance, index=i) for i, net in enumerate(nics)]
        instance.addresses = [
            {"network": net.name, "address": port.address, "mac": port.mac}
            for net, port in zip(nics, ports, strict=True)
        ]
        instance.save(update_fields=["addresses"])
        if req.volumes:
            storage_volumes.attach_at_create(instance, req.volumes, user)
        spec = build_spec(instance)
        _event(instance, "instance.schedule", chosen.reason, user, action_id)
        dispatch.send(node.queue, CreateInstance(spec, action_id))
        if node.tunnel_address:  # each segment's other nodes learn the new name and, if new, the peer
            for net in nics:
                networks.sync_network(net, exclude=node)
        # instances whose rules name the new member's groups admit its address
        secgroups.sync_members(groups, exclude=[str(instance.pk)])
    return instance


def _claim(instance: Instance, action: Action) -> str:
    """Set the task state if none is set and the vm_state allows the action (conditional UPDATE), else 409."""
    rule = states.RULES[action]
    action_id = uuid.uuid4().hex
    claimed = Instance.objects.filter(
        pk=instance.pk, task_state__isnull=True, vm_state__in=rule.allowed
    ).update(
        task_state=rule.task,
        action_id=action_id,
        task_deadline=_deadline(rule.task),
        updated_at=timezone.now(),
    )
    if not claimed:
        instance.refresh_from_db()
        if instance.task_state:
            raise Conflict(
                f"Instance {instance.name} is busy ({instance.task_state}); try again when it finishes."
            )
        raise InvalidAction(f"Cannot {action} instance {instance.name} while it is {instance.vm_state}.")
    instance.refresh_from_db()
    return action_id


def check(instance: Instance, action: Action, params: dict[str, Any] | None = None) -> None:
    """Refuse (InvalidAction) what the instance's node cannot do for its kind, or what lacks its params."""
    why = states.unsupported(
        action, instance.kind, instance.node.name if instance.node else "", instance.capabilities
    ) or (states.missing_params(action, params) if params is not None else None)
    if why:
        raise InvalidAction(why)


def dispatch_action(
    instance: Instance, action: Action, params: dict[str, Any], user: Any, message: str = ""
) -> None:
    """Claim the instance for ``action`` and send it to its node after commit (inside a transaction).

    Conflict (409) when the instance is busy or in a state the action cannot start from.
    """
    action_id = _claim(instance, action)
    node = _node(instance)
    _event(instance, f"dispatch.{action}", message or f"sent to {node.name}", user, action_id)
    dispatch.send(
        node.queue, InstanceAction(str(instance.pk), Kind(instance.kind), action, action_id, params)
    )


def act(instance: Instance, action: str, params: dict[str, Any], user: Any) -> Instance:
    """Claim the instance for one of the public actions and send it to its node (202)."""
    unknown = states.unknown(action)
    if unknown:
        raise InvalidAction(unknown)
    check(instance, Action(action), params)
    with transaction.atomic():
        dispatch_action(instance, Action(action), params, user, "")
    return instance


def publish(instance: Instance, name: str, version: str, description: str, user: Any) -> Image:
    """Publish an instance's disk as a new private image of its tenant.

    The image is created ``queued``; the node exports the disk (pausing a
    running VM for the copy), uploads it with a one-image token, and the
    upload is validated and imported like any other.
    """
    check(instance, Action.PUBLISH)
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
        node = _node(instance)
        image.status_reason = f"waiting for node {node.name} to upload the disk of {instance.name}"
        image.save(update_fields=["status_reason"])
        params = {
            "upload_url": f"{settings.SKYPORT_PORTAL_URL}/api/v1/blobs/uploads/{image.pk}",
            "upload_token": image_services.upload_token(image),
        }
        message = f"image {image} (id {image.pk}) from {node.name}"
        dispatch_action(instance, Action.PUBLISH, params, user, message)
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
        dispatch.send(node.queue, ConsoleRequest(str(instance.pk), Kind(instance.kind)))
        refreshing = True
    tail = metrics.console(str(instance.pk))
    asked = time.time() - metrics.first_console_request(str(instance.pk)) if tail is None else 0.0
    return {
        # the node answered (an empty text: the workload has printed nothing yet)
        "answered": tail is not None,
        # how long the portal has been asking without an answer (seconds)
        "waiting": asked,
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


def resize(instance: Instance, flavor: Flavor, user: Any) -> Instance:
    """Give a stopped VM another flavor, with quota and its node's capacity checked as a create.

    The new sizes count at once (under the quota and node locks, as a
    create); ``resize_from`` keeps the old ones until the node reports, and
    a failed resize puts them back.  The disk only grows.
    """
    if instance.kind != Kind.VM:
        raise InvalidAction(f"Only VMs can be resized; {instance.name} is a {instance.kind}.")
    if flavor.disk_gb < instance.disk_gb:
        raise Conflict(
            f"Flavor {flavor.name} has a {flavor.disk_gb} GB disk and {instance.name} has "
            f"{instance.disk_gb} GB; disks only grow."
        )
    if (flavor.vcpus, flavor.ram_mb, flavor.disk_gb) == (instance.vcpus, instance.ram_mb, instance.disk_gb):
        raise Conflict(f"Instance {instance.name} already has the sizes of flavor {flavor.name}.")
    with transaction.atomic():
        quota = Quota.objects.select_for_update().get(tenant=instance.tenant)
        node = ComputeNode.objects.select_for_update().get(pk=_node(instance).pk)
        delta = {
            "vcpus": flavor.vcpus - instance.vcpus,
            "ram_mb": flavor.ram_mb - instance.ram_mb,
            "disk_gb": flavor.disk_gb - instance.disk_gb,
        }
        used = placement.usage(instance.tenant_id)
        for limit, more in delta.items():
            if more > 0 and used[limit] + more > getattr(quota, limit):
                raise QuotaExceeded(
                    f"Quota exceeded for {limit}: tenant {instance.tenant.slug} uses {used[limit]} of "
                    f"{getattr(quota, limit)} and this resize needs {more} more."
                )
        (view,) = placement.node_views([node])
        for what, now, more, cap in (
            ("vCPUs", view.used_vcpus, delta["vcpus"], view.vcpus * view.cpu_ratio),
            ("RAM", view.used_ram_mb, delta["ram_mb"], view.ram_mb * view.ram_ratio),
            ("disk", view.used_disk_gb, delta["disk_gb"], view.disk_gb * view.disk_ratio),
        ):
            if more > 0 and now + more > cap:
                raise Conflict(f"Node {node.name} has no room for this resize: not enough {what}.")
        previous = {
            "flavor": instance.flavor_id,
            "vcpus": instance.vcpus,
            "ram_mb": instance.ram_mb,
            "disk_gb": instance.disk_gb,
        }
        params = {"vcpus": flavor.vcpus, "ram_mb": flavor.ram_mb, "disk_gb": flavor.disk_gb}
        dispatch_action(instance, Action.RESIZE, params, user, f"to {flavor.name} on {node.name}")
        Instance.objects.filter(pk=instance.pk).update(flavor=flavor, resize_from=previous, **params)
        instance.refresh_from_db()
    return instance


def delete_instance(instance: Instance, user: Any) -> Instance:
    """Ask the node to destroy the workload; the row is marked deleted when it reports.

    An instance that never reached a node (or whose node is gone from the
    database) is marked deleted at once.
    """
    with transaction.atomic():
        if instance.vm_state == VmState.DELETED:
            return instance
        action_id = _claim(instance, Action.DELETE)
        forwards.forget(instance)  # the node removes the rules with the workload
        groups = list(instance.security_groups.all())
        instance.security_groups.clear()  # no longer admitted as a member
        secgroups.sync_members(groups, exclude=[str(instance.pk)])
        node = instance.node
        if node is None:
            Instance.objects.filter(pk=instance.pk).update(
                vm_state=VmState.DELETED,
                task_state=None,
                deleted_at=timezone.now(),
                power_state=PowerState.NOSTATE,
            )
            instance.refresh_from_db()
            _event(instance, "dispatch.delete", "deleted (it had no node)", user, action_id)
            return instance
        _event(instance, "dispatch.delete", f"sent to {node.name}", user, action_id)
        dispatch.send(node.queue, DeleteInstance(str(instance.pk), Kind(instance.kind), action_id))
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
