"""Security groups through the API: default group, rules resolved for the node, live changes, bad input."""

from __future__ import annotations

from typing import Any

from compute.spec import (
    CreateInstance,
    Direction,
    GroupMembers,
    InstanceSecurity,
    SecurityBatch,
    Task,
    from_json,
)
from portal.cloud import secgroups
from portal.cloud.models import Port, SecurityGroup, SecurityGroupRule
from tests.portal.conftest import FakeNodes, World

GROUPS, RULES = "/api/v1/security-groups/", "/api/v1/security-group-rules/"


def _launch(world: World, name: str, **extra: Any) -> dict[str, Any]:
    body = {
        "tenant": "acme",
        "name": name,
        "image": "tiny:1",
        "kind": "vm",
        "flavor": world.flavor_public.pk,
        **extra,
    }
    r = world.client("a_member").post("/api/v1/instances/", body, format="json")
    assert r.status_code == 202, r.json()
    return r.json()  # type: ignore[no-any-return]


def _security(sent: list[tuple[str, str, list[Any]]]) -> dict[str, InstanceSecurity]:
    """The newest rules sent for each instance (the portal sends one batch per node and change)."""
    assert not [t for _, t, _ in sent if t == Task.SECURITY], "rules go in batches, one per node"
    return {
        m.instance_id: m
        for batch in (from_json(SecurityBatch, a[0]) for _, t, a in sent if t == Task.SECURITY_BATCH)
        for m in batch.items
    }


def _members(sent: list[tuple[str, str, list[Any]]]) -> dict[str, GroupMembers]:
    """The newest member list sent for each group."""
    return {
        g.group: g
        for batch in (from_json(SecurityBatch, a[0]) for _, t, a in sent if t == Task.SECURITY_BATCH)
        for g in batch.groups
    }


def test_a_burst_of_creates_sends_members_not_rules(
    world: World, sent: list[tuple[str, str, list[Any]]], nodes: FakeNodes
) -> None:
    """Before: each create re-sent the rules of every other member of the default group (each rule
    listing every member's address): n^2 addresses per create in a burst.  Now a create sends the
    node only the group's new member list, one message, and no instance's rules change."""
    ids = [_launch(world, f"m{i}")["id"] for i in range(6)]
    batches = [from_json(SecurityBatch, a[0]) for _, t, a in sent if t == Task.SECURITY_BATCH]
    assert len(batches) == 5, "the first create has no other member to tell (its spec has the list)"
    assert all(b.items == () and len(b.groups) == 1 for b in batches), "members only, never rules"
    assert [len(b.groups[0].addresses) for b in batches] == [2, 3, 4, 5, 6]
    addresses = {p.address for p in Port.objects.filter(instance_id__in=ids)}
    assert set(batches[-1].groups[0].addresses) == addresses
    versions = [b.groups[0].version for b in batches]
    assert versions == sorted(versions) and len(set(versions)) == 5


def test_default_group_admits_members_and_follows_membership(
    world: World, sent: list[tuple[str, str, list[Any]]], nodes: FakeNodes
) -> None:
    first = _launch(world, "a1")
    (create,) = [from_json(CreateInstance, a[0]) for _, t, a in sent if t == Task.CREATE]
    rules = create.spec.security
    assert rules is not None
    default = str(SecurityGroup.objects.get(tenant__slug="acme", name="default").pk)
    egress = [r for r in rules if r.direction is Direction.EGRESS]
    ingress = [r for r in rules if r.direction is Direction.INGRESS]
    assert [(r.protocol, r.remote, r.remote_group) for r in egress] == [("any", ("0.0.0.0/0",), "")]
    a1_address = first["addresses"][0]["address"]
    # ingress names the group; its members travel beside the rules, kept in a set on the node
    assert [(r.protocol, r.remote, r.remote_group) for r in ingress] == [("any", (), default)]
    assert [(m.group, m.addresses) for m in create.spec.security_members] == [(default, (a1_address,))]
    sent.clear()
    second = _launch(world, "a2")
    # a1's node is told at once that the default group now has a2 too; a1's rules do not change
    assert first["id"] not in _security(sent)
    a2_address = second["addresses"][0]["address"]
    assert set(_members(sent)[default].addresses) == {a1_address, a2_address}
    nodes.run()
    sent.clear()
    assert world.client("a_member").delete(f"/api/v1/instances/{second['id']}/").status_code == 202
    assert _members(sent)[default].addresses == (a1_address,)


def test_rules_change_live_and_bad_input_is_refused(
    world: World, sent: list[tuple[str, str, list[Any]]]
) -> None:
    c = world.client("a_member")
    web = c.post(GROUPS, {"tenant": "acme", "name": "web"}, format="json")
    assert web.status_code == 201, web.json()
    gid = web.json()["id"]
    inst = _launch(world, "w1", security_group_ids=[gid])
    sent.clear()
    r = c.post(
        RULES,
        {"group": gid, "direction": "ingress", "protocol": "tcp", "port_min": 80, "port_max": 80},
        format="json",
    )
    assert r.status_code == 201, r.json()
    (rule,) = _security(sent)[inst["id"]].rules
    assert (rule.protocol, rule.port_min, rule.remote) == ("tcp", 80, ("0.0.0.0/0",))
    sent.clear()
    assert c.delete(f"{RULES}{r.json()['id']}/").status_code == 204
    assert _security(sent)[inst["id"]].rules == ()

    def bad(data: dict[str, Any], message: str) -> None:
        resp = c.post(RULES, {"group": gid, "direction": "ingress", **data}, format="json")
        assert resp.status_code == 400, resp.json()
        assert message in str(resp.json())

    bad({"protocol": "tcp", "port_min": 90, "port_max": 80}, "1 <= port_min <= port_max <= 65535")
    bad({"protocol": "tcp", "port_min": 0, "port_max": 80}, "greater than or equal to 1")
    bad({"protocol": "icmp", "port_min": 1, "port_max": 2}, "need protocol tcp or udp")
    bad({"protocol": "tcp", "port_min": 22}, "port_min and port_max go together")
    bad({"remote_cidr": "10.0.0.0/33"}, "is not an IPv4 network")
    bobs = SecurityGroup.objects.create(tenant=world.b, name="bobs")
    bad({"remote_group": bobs.pk}, "same tenant")
    # another tenant's group cannot be attached or used, and its rules do not exist for you
    assert c.post(RULES, {"group": bobs.pk, "direction": "ingress"}, format="json").status_code == 400
    assert c.get(f"{GROUPS}{bobs.pk}/").status_code == 404
    r = c.post(
        f"/api/v1/instances/{inst['id']}/security-groups/", {"security_groups": [bobs.pk]}, format="json"
    )
    assert r.status_code == 400 and "No security group with id" in str(r.json())
    assert not SecurityGroupRule.objects.filter(group=bobs).exists()
    # switching groups live: the instance gets default's rules
    default = secgroups.default_group(world.a)
    sent.clear()
    r = c.post(
        f"/api/v1/instances/{inst['id']}/security-groups/", {"security_groups": [default.pk]}, format="json"
    )
    assert r.status_code == 200 and [g["name"] for g in r.json()] == ["default"]
    assert {x.direction for x in _security(sent)[inst["id"]].rules} == {Direction.INGRESS, Direction.EGRESS}
    # a group in use cannot be deleted; a duplicate name is a conflict
    assert c.delete(f"{GROUPS}{default.pk}/").status_code == 409
    assert c.post(GROUPS, {"tenant": "acme", "name": "web"}, format="json").status_code == 409
    assert (
        world.client("a_viewer").post(GROUPS, {"tenant": "acme", "name": "x"}, format="json").status_code
        == 403
    )


def test_rules_carry_a_rising_version_from_the_create_on(
    world: World, sent: list[tuple[str, str, list[Any]]]
) -> None:
    """Each resolution takes the tenant's next security serial: a node can keep the newest."""
    c = world.client("a_member")
    gid = c.post(GROUPS, {"tenant": "acme", "name": "web"}, format="json").json()["id"]
    inst = _launch(world, "v1", security_group_ids=[gid])
    (create,) = [from_json(CreateInstance, args[0]) for _, task, args in sent if task == Task.CREATE]
    assert create.spec.security_version >= 1
    seen = [create.spec.security_version]
    for port in (80, 443):
        sent.clear()
        body = {"group": gid, "direction": "ingress", "protocol": "tcp", "port_min": port, "port_max": port}
        assert c.post(RULES, body, format="json").status_code == 201
        seen.append(_security(sent)[inst["id"]].version)
    assert seen == sorted(set(seen)), seen
    world.a.refresh_from_db()
    assert world.a.security_serial == seen[-1]
    assert world.b.security_serial == 0, "another tenant's serial is untouched"
