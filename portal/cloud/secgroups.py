"""Security groups: resolve a tenant's named rule sets into what each node enforces, and keep nodes current.

Why resolution happens here: a rule's remote group is a set of instances,
and only the portal knows their addresses.  :func:`rules_for` turns an
instance's groups into :class:`compute.spec.SecurityRule` objects; a rule
whose remote is a group names the group (``remote_group``), and the group's
members go to the nodes as a :class:`compute.spec.GroupMembers` list, which
a node keeps in one nftables set per group.  A change of rules (a rule
added or removed, groups attached or detached) re-sends the complete rule
list of every live instance it changes (:func:`sync`); a change of members
(an instance created or deleted) re-sends only the member lists of its
groups, to the nodes whose instances admit them (:func:`sync_members`):
one message per such node, whatever the number of members.  Both happen on
commit; the nodes converge in one nftables transaction each, nothing
restarts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from django.db import IntegrityError, connection, transaction

from compute.spec import Direction, GroupMembers, InstanceSecurity, SecurityBatch, SecurityRule
from portal.cloud import dispatch
from portal.cloud.choices import VmState
from portal.cloud.models import Instance, Port, SecurityGroup, SecurityGroupRule
from portal.errors import Conflict, DomainError
from portal.tenancy.models import Tenant

ANYONE = "0.0.0.0/0"
DIRECTIONS = tuple(value for value, _ in SecurityGroupRule._meta.get_field("direction").choices or ())
PROTOCOLS = tuple(value for value, _ in SecurityGroupRule._meta.get_field("protocol").choices or ())


def default_group(tenant: Tenant) -> SecurityGroup:
    """The tenant's ``default`` group (all egress; ingress only from its members), made on first use."""
    group, created = SecurityGroup.objects.get_or_create(
        tenant=tenant, name="default", defaults={"description": "All egress; ingress only from this group"}
    )
    if created:
        SecurityGroupRule.objects.create(group=group, direction="egress")
        SecurityGroupRule.objects.create(group=group, direction="ingress", remote_group=group)
    return group


def _members(group_id: int) -> tuple[str, ...]:
    """The addresses of the group's live members (every NIC of each)."""
    addresses = Port.objects.filter(
        instance__security_groups=group_id, instance__vm_state__in=_LIVE
    ).values_list("address", flat=True)
    return tuple(sorted(set(addresses)))


_LIVE = [s for s in VmState.values if s != VmState.DELETED]


def rules_for(instance: Instance) -> tuple[SecurityRule, ...]:
    """The resolved allow rules of the instance's groups, in a stable order (remote groups by id)."""
    resolved: set[SecurityRule] = set()
    for r in SecurityGroupRule.objects.filter(group__instances=instance):
        if r.remote_group_id is not None:
            rule = SecurityRule(
                Direction(r.direction), r.protocol, r.port_min, r.port_max, (), str(r.remote_group_id)
            )
        else:
            rule = SecurityRule(
                Direction(r.direction), r.protocol, r.port_min, r.port_max, (r.remote_cidr or ANYONE,)
            )
        resolved.add(rule)
    return tuple(sorted(resolved, key=_rule_order))


def _rule_order(r: SecurityRule) -> tuple[object, ...]:
    return (r.direction, r.protocol, r.port_min or 0, r.port_max or 0, r.remote, r.remote_group)


def members_of(
    rules: Iterable[SecurityRule], version: int, cache: dict[str, tuple[str, ...]] | None = None
) -> tuple[GroupMembers, ...]:
    """The member lists of the groups ``rules`` name as remote (``cache``: shared by a batch's callers)."""
    cache = {} if cache is None else cache
    out = []
    for group in sorted({r.remote_group for r in rules if r.remote_group}):
        if group not in cache:
            cache[group] = _members(int(group))
        out.append(GroupMembers(group, cache[group], version))
    return tuple(out)


def sync(instances: Iterable[Instance]) -> int:
    """After commit, send each live, placed instance its complete resolved rules.

    One :class:`SecurityBatch` per node, whatever the number of instances,
    with the members of the groups those rules name.  Returns how many
    instances were sent rules.
    """
    cache: dict[str, tuple[str, ...]] = {}
    per_node: dict[str, dict[str, InstanceSecurity]] = {}
    groups: dict[str, dict[str, GroupMembers]] = {}
    live = [i for i in instances if i.node is not None and i.vm_state != VmState.DELETED]
    versions = {tenant: next_version(tenant) for tenant in sorted({i.tenant_id for i in live})}
    for inst in live:
        assert inst.node is not None
        version = versions[inst.tenant_id]
        item = InstanceSecurity(str(inst.pk), rules_for(inst), version)
        per_node.setdefault(inst.node.queue, {})[item.instance_id] = item
        for m in members_of(item.rules, version, cache):
            groups.setdefault(inst.node.queue, {})[m.group] = m
    for queue, items in per_node.items():
        dispatch.send(queue, SecurityBatch(tuple(items.values()), tuple(groups.get(queue, {}).values())))
    return sum(len(items) for items in per_node.values())


def sync_members(groups: Iterable[SecurityGroup], exclude: Iterable[str] = ()) -> int:
    """After commit, send the new member lists of ``groups`` to every node that enforces a rule naming
    one of them (a member created or deleted: no instance's rules change).  Returns how many nodes.

    ``exclude``: instances that do not count as enforcing (the one being created, whose spec
    carries the lists; the one being deleted).
    """
    by_id = {g.pk: g for g in groups}
    if not by_id:
        return 0
    pairs = (
        Instance.objects.live()
        .filter(security_groups__rules__remote_group__in=list(by_id), node__isnull=False)
        .exclude(pk__in=list(exclude))
        .values_list("node__queue", "security_groups__rules__remote_group", "tenant_id")
        .distinct()
    )
    per_node: dict[str, set[int]] = {}
    tenants = set()
    for queue, group_id, tenant_id in pairs:
        per_node.setdefault(queue, set()).add(group_id)
        tenants.add(tenant_id)
    if not per_node:
        return 0
    versions = {t: next_version(t) for t in sorted(tenants | {g.tenant_id for g in by_id.values()})}
    members = {gid: _members(gid) for gid in sorted({g for ids in per_node.values() for g in ids})}
    for queue, ids in sorted(per_node.items()):
        lists = tuple(
            GroupMembers(str(gid), members[gid], versions[by_id[gid].tenant_id]) for gid in sorted(ids)
        )
        dispatch.send(queue, SecurityBatch(groups=lists))
    return len(per_node)


def next_version(tenant_id: int) -> int:
    """Raise the tenant's security serial; rules resolved after this call carry it.

    The UPDATE holds the tenant row until commit, so a concurrent change
    waits here and resolves its rules after this one committed: a higher
    version always reflects every lower one, and nodes ignore a lower one
    that arrives late (``compute.network.router.Router.set_security_many``).
    """
    table = connection.ops.quote_name(Tenant._meta.db_table)
    with connection.cursor() as cursor:  # one statement: SQLite (3.35+) and PostgreSQL return the new value
        cursor.execute(
            f"UPDATE {table} SET security_serial = security_serial + 1 WHERE id = %s "  # noqa: S608
            "RETURNING security_serial",
            [tenant_id],
        )
        row = cursor.fetchone()
    if row is None:
        raise Tenant.DoesNotExist(f"no tenant {tenant_id}")
    return int(row[0])


def affected_by_members_of(groups: Iterable[SecurityGroup], exclude: Iterable[str] = ()) -> list[Instance]:
    """Live instances whose rules name one of ``groups`` as remote (their resolution changes with members)."""
    ids = [g.pk for g in groups]
    return list(
        Instance.objects.live()
        .filter(security_groups__rules__remote_group__in=ids, node__isnull=False)
        .exclude(pk__in=list(exclude))
        .select_related("node")
        .distinct()
    )


def in_group(group: SecurityGroup) -> list[Instance]:
    return list(
        Instance.objects.live().filter(security_groups=group, node__isnull=False).select_related("node")
    )


def name_taken(tenant: Tenant, name: str, exclude_pk: int | None = None) -> str | None:
    """The sentence saying ``name`` is taken in the tenant, or None when it is free."""
    clash = SecurityGroup.objects.filter(tenant=tenant, name=name)
    if exclude_pk is not None:
        clash = clash.exclude(pk=exclude_pk)
    return f"Tenant {tenant} already has a security group named '{name}'." if clash.exists() else None


def create_group(tenant: Tenant, name: str, description: str = "") -> SecurityGroup:
    """A new, empty group (it allows nothing until rules are added); a taken name is a Conflict."""
    taken = name_taken(tenant, name)
    if taken:
        raise Conflict(taken)
    try:
        with transaction.atomic():
            return SecurityGroup.objects.create(tenant=tenant, name=name, description=description)
    except IntegrityError:  # created meanwhile by another request
        raise Conflict(f"Tenant {tenant} already has a security group named '{name}'.") from None


def delete_group(group: SecurityGroup) -> None:
    """Delete a group no live instance uses (refused with a Conflict otherwise).

    Rules of other groups that name it as remote go with it (cascade); the
    instances that had them are sent their new rules.
    """
    with transaction.atomic():
        if group.instances.live().exists():
            users = ", ".join(sorted(group.instances.live().values_list("name", flat=True)[:5]))
            raise Conflict(
                f"Security group {group.name} is attached to instances ({users}); detach it first."
            )
        affected = affected_by_members_of([group])
        group.delete()
        sync(affected)  # their rules lose the ones that named it


def add_rule(
    group: SecurityGroup,
    direction: str,
    protocol: str = "any",
    port_min: int | None = None,
    port_max: int | None = None,
    remote_cidr: str = "",
    remote_group: SecurityGroup | None = None,
) -> SecurityGroupRule:
    """Add an allow rule (checked by :func:`validate_rule`); the group's running instances get it live."""
    if direction not in DIRECTIONS:
        raise DomainError(f"direction must be one of {', '.join(DIRECTIONS)}.")
    if protocol not in PROTOCOLS:
        raise DomainError(f"protocol must be one of {', '.join(PROTOCOLS)}.")
    try:
        cidr = validate_rule(group, protocol, port_min, port_max, remote_cidr, remote_group)
    except ValueError as exc:
        raise DomainError(str(exc)) from None
    with transaction.atomic():
        rule = SecurityGroupRule.objects.create(
            group=group,
            direction=direction,
            protocol=protocol,
            port_min=port_min,
            port_max=port_max,
            remote_cidr=cidr,
            remote_group=remote_group,
        )
        sync(in_group(group))
    return rule


def remove_rule(rule: SecurityGroupRule) -> None:
    """Remove a rule; the group's running instances lose it live."""
    with transaction.atomic():
        group = rule.group
        rule.delete()
        sync(in_group(group))


def set_groups(instance: Instance, groups: list[SecurityGroup]) -> None:
    """Attach exactly ``groups`` to a live instance (refused across tenants); the change is live."""
    if any(g.tenant_id != instance.tenant_id for g in groups):
        raise Conflict("A security group of another tenant cannot be attached.")
    if instance.vm_state == VmState.DELETED:
        raise Conflict(f"Instance {instance.name} is deleted; its security groups no longer change.")
    with transaction.atomic():
        before = list(instance.security_groups.all())
        instance.security_groups.set(groups)
        sync([instance])  # with the members of the groups its own rules name
        changed = {g.pk: g for g in before}.keys() ^ {g.pk for g in groups}
        sync_members([g for g in [*before, *groups] if g.pk in changed], exclude=[str(instance.pk)])


def validate_rule(
    group: SecurityGroup,
    protocol: str,
    port_min: int | None,
    port_max: int | None,
    remote_cidr: str,
    remote_group: SecurityGroup | None,
) -> str:
    """Check a rule before it is stored; returns the normalised CIDR.  Raises ValueError with a sentence."""
    if remote_group is not None and remote_group.tenant_id != group.tenant_id:
        raise ValueError("remote_group must be a security group of the same tenant.")
    if remote_group is not None and remote_cidr:
        raise ValueError("Give remote_cidr or remote_group, not both.")
    if (port_min is None) != (port_max is None):
        raise ValueError("port_min and port_max go together.")
    if port_min is not None and port_max is not None:
        if protocol not in ("tcp", "udp"):
            raise ValueError("Port ranges need protocol tcp or udp.")
        if not 1 <= port_min <= port_max <= 65535:
            raise ValueError("Ports must satisfy 1 <= port_min <= port_max <= 65535.")
    if remote_cidr:
        try:
            return str(ipaddress.IPv4Network(remote_cidr, strict=False))
        except ValueError:
            raise ValueError(
                f"remote_cidr {remote_cidr!r} is not an IPv4 network such as 198.18.0.0/24."
            ) from None
    return ""
