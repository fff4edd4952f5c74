"""Security groups and published ports in the browser: the pages change rules and ports through the
API's services (the node gets the same messages), refuse bad input with form errors, viewers with 403,
and other tenants' groups, rules, instances and ports with 404."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from compute.spec import Direction, SecurityBatch, Task, from_json
from portal.audit.models import Event
from portal.cloud import forwards, networks, secgroups
from portal.cloud.models import Instance, PublishedPort, SecurityGroup, SecurityGroupRule
from tests.portal.conftest import World
from tests.portal.test_published_ports import _forwards
from tests.web.helpers import client, text

Sent = list[tuple[str, str, list[Any]]]
GROUPS = "/security-groups/"


def _rules_sent(sent: Sent) -> dict[str, Any]:
    """The newest resolved rules sent for each instance (one SecurityBatch per node and change)."""
    return {
        item.instance_id: item
        for batch in (from_json(SecurityBatch, a[0]) for _, t, a in sent if t == Task.SECURITY_BATCH)
        for item in batch.items
    }


@pytest.fixture
def www(world: World, web: Instance) -> SecurityGroup:
    """A group "www" of acme with one rule (tcp/443 from anyone), attached to web-1."""
    group = secgroups.create_group(world.a, "www", "web servers")
    secgroups.add_rule(group, "ingress", "tcp", 443, 443)
    secgroups.set_groups(web, [group])
    return group


def test_groups_page_creates_groups_and_changes_rules_live(world: World, web: Instance, sent: Sent) -> None:
    c = client(world, "a_member")
    page = text(c.get(GROUPS))
    assert (
        "<h1>Security groups of acme</h1>" in page and 'href="/security-groups/" aria-current="page"' in page
    )
    r = c.post(GROUPS, {"name": "www", "description": "web servers"})
    assert r.status_code == 303, text(r)
    group = SecurityGroup.objects.get(tenant=world.a, name="www")
    assert r["Location"] == f"{GROUPS}#group-{group.pk}"
    assert Event.objects.filter(
        action="securitygroup.create", object_id=str(group.pk), tenant=world.a
    ).exists()
    # attach it to web-1 from the instance page: its node gets the (still empty) rule set at once
    r = c.post(f"/instances/{web.pk}/security-groups/", {"security_groups": [group.pk]})
    assert r.status_code == 303 and r["Location"] == f"/instances/{web.pk}/#network"
    assert list(web.security_groups.all()) == [group]
    assert _rules_sent(sent)[str(web.pk)].rules == ()
    sent.clear()
    # a rule added on the page reaches web-1's node as the API's would: one batch, resolved
    rule = {"direction": "ingress", "protocol": "tcp", "port_min": "8000", "port_max": "8080"}
    r = c.post(f"{GROUPS}{group.pk}/rules/", rule | {"remote_cidr": "198.18.7.9/24"})
    assert r.status_code == 303, text(r)
    assert [q for q, t, _ in sent] == ["node.shared-1"]
    (resolved,) = _rules_sent(sent)[str(web.pk)].rules
    assert (resolved.direction, resolved.protocol, resolved.port_min, resolved.port_max, resolved.remote) == (
        Direction.INGRESS,
        "tcp",
        8000,
        8080,
        ("198.18.7.0/24",),
    )
    page = text(c.get(GROUPS))
    assert (
        "8000\u20138080" in page
        and "198.18.7.0/24" in page
        and f'href="/instances/{web.pk}/">web-1</a>' in page
    )
    # one port: the last port may be left empty; a remote group is resolved to its members
    r = c.post(f"{GROUPS}{group.pk}/rules/", {"direction": "ingress", "protocol": "udp", "port_min": "53"})
    assert r.status_code == 303
    r = c.post(
        f"{GROUPS}{group.pk}/rules/", {"direction": "egress", "protocol": "any", "remote_group": group.pk}
    )
    assert r.status_code == 303
    rules = _rules_sent(sent)[str(web.pk)].rules
    address = web.ports.get().address
    assert ("udp", 53, 53) in [(x.protocol, x.port_min, x.port_max) for x in rules]
    assert [x.remote_group for x in rules if x.direction is Direction.EGRESS] == [str(group.pk)]
    (batch,) = [from_json(SecurityBatch, a[0]) for _, t, a in sent if t == Task.SECURITY_BATCH][-1:]
    assert [(m.group, m.addresses) for m in batch.groups] == [(str(group.pk), (address,))]
    # remove a rule: a confirmation page first, then the node loses it
    stored = SecurityGroupRule.objects.get(group=group, protocol="tcp")
    url = f"{GROUPS}rules/{stored.pk}/delete/"
    confirm = c.get(url)
    assert confirm.status_code == 200 and "Remove rule" in text(confirm)
    assert SecurityGroupRule.objects.filter(pk=stored.pk).exists(), "the GET changes nothing"
    sent.clear()
    assert c.post(url).status_code == 303
    assert not SecurityGroupRule.objects.filter(pk=stored.pk).exists()
    assert "tcp" not in [x.protocol for x in _rules_sent(sent)[str(web.pk)].rules]
    assert Event.objects.filter(action="securitygrouprule.delete", tenant=world.a).exists()


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"protocol": "tcp", "port_min": "0"}, "port_min", "greater than or equal to 1"),
        (
            {"protocol": "tcp", "port_min": "80", "port_max": "65536"},
            "port_max",
            "less than or equal to 65535",
        ),
        ({"protocol": "tcp", "port_min": "http"}, "port_min", "Enter a whole number"),
        (
            {"protocol": "tcp", "port_min": "90", "port_max": "80"},
            "port_max",
            "1 &lt;= port_min &lt;= port_max",
        ),
        ({"protocol": "icmp", "port_min": "1"}, "protocol", "Port ranges need protocol tcp or udp"),
        ({"protocol": "tcp", "port_max": "80"}, "port_max", "port_min and port_max go together"),
        ({"protocol": "sctp"}, "protocol", "Select a valid choice"),
        ({"protocol": "tcp", "direction": "sideways"}, "direction", "Select a valid choice"),
        ({"protocol": "tcp", "remote_cidr": "10.0.0.0/33"}, "remote_cidr", "is not an IPv4 network"),
        ({"protocol": "tcp", "remote_cidr": "not an address"}, "remote_cidr", "is not an IPv4 network"),
        ({"protocol": "tcp", "remote_cidr": "fe80::/64"}, "remote_cidr", "is not an IPv4 network"),
    ],
)
def test_bad_rules_are_form_errors_next_to_their_field(
    world: World, www: SecurityGroup, sent: Sent, data: dict[str, str], field: str, message: str
) -> None:
    sent.clear()
    before = SecurityGroupRule.objects.count()
    r = client(world, "a_member").post(f"{GROUPS}{www.pk}/rules/", {"direction": "ingress", **data})
    assert r.status_code == 400, text(r)
    page = text(r)
    assert "The rule was not added to www; see below." in page
    # the error sits in the field's group, and the field says it is invalid
    assert re.search(rf'id="rule-{www.pk}-{field}_error".*?{re.escape(message)}', page, re.S), page
    assert re.search(rf'<(input|select)[^>]*aria-invalid="true"[^>]*id="rule-{www.pk}-{field}"', page), field
    assert "<details open>" in page, "the form with errors is open"
    assert SecurityGroupRule.objects.count() == before and sent == []


def test_rule_with_cidr_and_group_and_groups_of_other_tenants_are_refused(
    world: World, www: SecurityGroup
) -> None:
    c = client(world, "a_member")
    both = {"direction": "ingress", "protocol": "tcp", "remote_cidr": "198.18.0.0/24", "remote_group": www.pk}
    r = c.post(f"{GROUPS}{www.pk}/rules/", both)
    assert r.status_code == 400 and "Give remote_cidr or remote_group, not both." in text(r)
    bobs = SecurityGroup.objects.create(tenant=world.b, name="bobs")
    r = c.post(
        f"{GROUPS}{www.pk}/rules/", {"direction": "ingress", "protocol": "tcp", "remote_group": bobs.pk}
    )
    assert r.status_code == 400 and "Select a valid choice" in text(r)
    r = c.post(f"/instances/{world.instance_a.pk}/security-groups/", {"security_groups": [bobs.pk]})
    assert r.status_code == 400 and f"No security group {bobs.pk} in this tenant." in text(r)
    assert list(world.instance_a.security_groups.all()) == [www]
    assert SecurityGroupRule.objects.count() == 1


def test_group_names_are_checked_and_a_used_group_is_not_deleted(world: World, www: SecurityGroup) -> None:
    c = client(world, "a_member")
    r = c.post(GROUPS, {"name": "Bad Name!"})
    assert r.status_code == 400 and "The group was not created" in text(r) and "lower-case letters" in text(r)
    r = c.post(GROUPS, {"name": "www"})
    assert r.status_code == 409
    assert "Tenant acme already has a security group named &#x27;www&#x27;." in text(r)
    assert 'aria-invalid="true"' in text(r)
    assert SecurityGroup.objects.filter(tenant=world.a).count() == 1
    # delete: a confirmation page, then refused while web-1 uses the group
    url = f"{GROUPS}{www.pk}/delete/"
    assert c.get(url).status_code == 200
    r = c.post(url)
    assert r.status_code == 409
    assert "Security group www is attached to instances (web-1); detach it first." in text(r)
    assert SecurityGroup.objects.filter(pk=www.pk).exists()
    # detach (no group at all), then it goes
    assert c.post(f"/instances/{world.instance_a.pk}/security-groups/", {}).status_code == 303
    assert c.post(url).status_code == 303
    assert not SecurityGroup.objects.filter(pk=www.pk).exists()
    assert Event.objects.filter(action="securitygroup.delete", outcome="success", tenant=world.a).count() == 1


def test_viewers_see_groups_and_ports_but_every_change_is_refused(
    world: World, www: SecurityGroup, web: Instance, sent: Sent
) -> None:
    row = forwards.publish(web, "tcp", 80)
    sent.clear()
    v = client(world, "a_viewer")
    page = text(v.get(GROUPS))
    assert "tcp" in page and "443" in page and "Viewers cannot change security groups" in page
    assert (
        "Add rule" not in page
        and "Create group" not in page
        and "Delete…" not in page
        and "Remove…" not in page
    )
    detail = text(v.get(f"/instances/{web.pk}/"))
    assert "198.18.129.1:20000" in detail and ">www</a>" in detail
    assert "Publish port" not in detail and "Set security groups" not in detail and "Unpublish…" not in detail
    rule = www.rules.get()
    writes = [
        (GROUPS, {"name": "new"}),
        (f"{GROUPS}{www.pk}/rules/", {"direction": "ingress", "protocol": "tcp", "port_min": "22"}),
        (f"{GROUPS}rules/{rule.pk}/delete/", {}),
        (f"{GROUPS}{www.pk}/delete/", {}),
        (f"/instances/{web.pk}/security-groups/", {}),
        (f"/instances/{web.pk}/ports/", {"protocol": "tcp", "port": "22"}),
        (f"/instances/{web.pk}/ports/{row.pk}/delete/", {}),
    ]
    for url, data in writes:
        r = v.post(url, data)
        assert r.status_code == 403, url
        assert "This needs the member role in the tenant; you are viewer." in text(r), url
    for url in (
        f"{GROUPS}rules/{rule.pk}/delete/",
        f"{GROUPS}{www.pk}/delete/",
        f"/instances/{web.pk}/ports/{row.pk}/delete/",
    ):
        assert v.get(url).status_code == 403, url
    assert sent == []
    assert SecurityGroup.objects.filter(tenant=world.a).count() == 1 and www.rules.count() == 1
    assert list(web.security_groups.all()) == [www] and PublishedPort.objects.count() == 1
    denied = Event.objects.filter(actor_name="a_viewer", outcome="denied")
    assert denied.count() == len(writes)


def test_other_tenants_groups_rules_instances_and_ports_are_404(
    world: World, www: SecurityGroup, web: Instance, sent: Sent
) -> None:
    row = forwards.publish(web, "tcp", 80)
    sent.clear()
    rule = www.rules.get()
    b = client(world, "b_member")
    page = text(b.get(GROUPS))
    assert "Security groups of bobco" in page and "www" not in page
    for url in (
        f"{GROUPS}{www.pk}/delete/",
        f"{GROUPS}rules/{rule.pk}/delete/",
        f"/instances/{web.pk}/ports/{row.pk}/delete/",
    ):
        assert b.get(url).status_code == 404, url
        assert b.post(url).status_code == 404, url
    for url, data in (
        (f"{GROUPS}{www.pk}/rules/", {"direction": "ingress", "protocol": "tcp"}),
        (f"/instances/{web.pk}/security-groups/", {}),
        (f"/instances/{web.pk}/ports/", {"protocol": "tcp", "port": "22"}),
        (f"{GROUPS}99999/rules/", {"direction": "ingress", "protocol": "tcp"}),
        (f"/instances/{web.pk}/ports/99999/delete/", {}),
    ):
        assert b.post(url, data).status_code == 404, url
    # a port of one instance is not reachable through another instance's URL either
    other = Instance.objects.create(
        tenant=world.a, name="db-1", kind="vm", isolation_reason="vm: test", image=web.image,
        flavor=web.flavor, network=web.network, vcpus=1, ram_mb=128, disk_gb=1, vm_state="active",
        node=web.node,
    )  # fmt: skip
    assert client(world, "a_member").post(f"/instances/{other.pk}/ports/{row.pk}/delete/").status_code == 404
    assert sent == [] and www.rules.count() == 1 and PublishedPort.objects.count() == 1
    assert list(web.security_groups.all()) == [www]


def test_publish_and_unpublish_a_port_from_the_instance_page(world: World, web: Instance, sent: Sent) -> None:
    c = client(world, "a_member")
    detail = text(c.get(f"/instances/{web.pk}/"))
    assert 'id="network"' in detail and "No published ports" in detail and "Publish port" in detail
    r = c.post(f"/instances/{web.pk}/ports/", {"protocol": "tcp", "port": "80"})
    assert r.status_code == 303 and r["Location"] == f"/instances/{web.pk}/#network"
    ((queue, msg),) = _forwards(sent)
    (fwd,) = msg.forwards
    assert queue == "node.shared-1" and msg.instance_id == str(web.pk)
    assert (fwd.protocol, fwd.external_address, fwd.external_port, fwd.address, fwd.port) == (
        "tcp",
        "198.18.129.1",
        20000,
        web.ports.get().address,
        80,
    )
    page = c.get(f"/instances/{web.pk}/")
    assert "Published tcp/80 of web-1: connect to 198.18.129.1:20000." in text(page)
    assert '<span id="published-' in text(page) and "198.18.129.1:20000</span>" in text(page)
    assert Event.objects.filter(action="publishedport.create", tenant=world.a, outcome="success").exists()
    # a requested external port; then the same instance port again, a port outside the range
    r = c.post(f"/instances/{web.pk}/ports/", {"protocol": "udp", "port": "53", "external_port": "20002"})
    assert r.status_code == 303
    assert len(_forwards(sent)[-1][1].forwards) == 2
    r = c.post(f"/instances/{web.pk}/ports/", {"protocol": "tcp", "port": "80"})
    assert r.status_code == 409 and "tcp/80 of web-1 is already published." in text(r)
    r = c.post(f"/instances/{web.pk}/ports/", {"protocol": "tcp", "port": "81", "external_port": "30000"})
    assert r.status_code == 409 and "outside this node&#x27;s published range (20000-20002)" in text(r)
    assert 'value="30000"' in text(r), "the form keeps what was typed"
    assert len(_forwards(sent)) == 2, "refusals send nothing"
    # unpublish: confirmation, then the node gets the shorter list
    row = PublishedPort.objects.get(instance=web, protocol="tcp")
    url = f"/instances/{web.pk}/ports/{row.pk}/delete/"
    assert "Unpublish tcp/80 of web-1?" in text(c.get(url))
    assert c.post(url).status_code == 303
    assert [f.port for f in _forwards(sent)[-1][1].forwards] == [53]
    assert not PublishedPort.objects.filter(pk=row.pk).exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"protocol": "tcp", "port": "0"}, "greater than or equal to 1"),
        ({"protocol": "tcp", "port": "65536"}, "less than or equal to 65535"),
        ({"protocol": "tcp", "port": "eighty"}, "Enter a whole number"),
        ({"protocol": "tcp"}, "This field is required"),
        ({"protocol": "sctp", "port": "80"}, "Select a valid choice"),
        ({"protocol": "tcp", "port": "80", "external_port": "70000"}, "less than or equal to 65535"),
    ],
)
def test_bad_ports_are_form_errors(
    world: World, web: Instance, sent: Sent, data: dict[str, str], message: str
) -> None:
    r = client(world, "a_member").post(f"/instances/{web.pk}/ports/", data)
    assert r.status_code == 400
    page = text(r)
    assert "Check the port to publish." in page and message in page and 'aria-invalid="true"' in page
    assert sent == [] and not PublishedPort.objects.exists()


def test_a_node_without_external_address_says_so(world: World, sent: Sent) -> None:
    inst = world.instance_a
    networks.allocate_port(inst.network, inst)
    c = client(world, "a_member")
    page = text(c.get(f"/instances/{inst.pk}/"))
    assert "Node shared-1 has no external address yet" in page and "Publish port" not in page
    r = c.post(f"/instances/{inst.pk}/ports/", {"protocol": "tcp", "port": "80"})
    assert r.status_code == 409 and "Node shared-1 has no external address" in text(r)
    assert sent == []


def test_a_deleted_instance_offers_no_network_changes(world: World, www: SecurityGroup) -> None:
    inst = world.instance_a
    Instance.objects.filter(pk=inst.pk).update(vm_state="deleted")
    c = client(world, "a_member")
    page = text(c.get(f"/instances/{inst.pk}/"))
    assert "Set security groups" not in page and "Publish port" not in page
    r = c.post(f"/instances/{inst.pk}/security-groups/", {})
    assert r.status_code == 409 and "is deleted" in text(r)
    r = c.post(f"/instances/{inst.pk}/ports/", {"protocol": "tcp", "port": "80"})
    assert r.status_code == 409 and "has no node to publish on" in text(r)


def test_csrf_is_enforced_on_the_network_forms(world: World, www: SecurityGroup, sent: Sent) -> None:
    c = Client(enforce_csrf_checks=True)
    c.force_login(world.users["a_member"])
    sent.clear()
    for url, data in (
        (GROUPS, {"name": "new"}),
        (f"{GROUPS}{www.pk}/rules/", {"direction": "ingress", "protocol": "tcp"}),
        (f"/instances/{world.instance_a.pk}/ports/", {"protocol": "tcp", "port": "80"}),
    ):
        r = c.post(url, data)
        assert r.status_code == 403 and "security token" in text(r), url
    assert sent == [] and SecurityGroup.objects.count() == 1 and www.rules.count() == 1


def test_the_groups_page_reads_a_fixed_number_of_queries(world: World, www: SecurityGroup) -> None:
    c = client(world, "a_member")
    c.get(GROUPS)

    def count() -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert c.get(GROUPS).status_code == 200
        return len(ctx.captured_queries)

    few = count()
    for i in range(5):
        group = secgroups.create_group(world.a, f"g{i}")
        secgroups.add_rule(group, "ingress", "tcp", 20 + i, 20 + i, remote_group=www)
        secgroups.add_rule(group, "egress")
    secgroups.set_groups(world.instance_a, list(SecurityGroup.objects.filter(tenant=world.a)))
    assert count() == few <= 7, few


def test_launch_form_offers_the_tenants_groups(world: World, www: SecurityGroup, sent: Sent) -> None:
    from compute.spec import CreateInstance
    from portal.images.models import Image

    bobs = SecurityGroup.objects.create(tenant=world.b, name="bobs")
    c = client(world, "a_member")
    page = text(c.get("/instances/new/"))
    assert f'name="security_groups" value="{www.pk}"' in page and ">\n www</label>" in page
    assert f'name="security_groups" value="{bobs.pk}"' not in page
    body = {"image": Image.objects.get(name="tiny").pk, "flavor": world.flavor_public.pk, "kind": "vm"}
    body |= {"network": "default"}
    r = c.post("/instances/new/", body | {"name": "w2", "security_groups": [bobs.pk]})
    assert r.status_code == 400 and "Select a valid choice" in text(r)
    assert not Instance.objects.filter(name="w2").exists()
    sent.clear()
    r = c.post("/instances/new/", body | {"name": "w2", "security_groups": [www.pk]})
    assert r.status_code == 303, text(r)
    inst = Instance.objects.get(name="w2")
    assert list(inst.security_groups.all()) == [www]
    (create,) = [from_json(CreateInstance, a[0]) for _, t, a in sent if t == Task.CREATE]
    assert [(x.protocol, x.port_min) for x in create.spec.security or ()] == [("tcp", 443)]
    # without a choice: the default group, as through the API
    r = c.post("/instances/new/", body | {"name": "w3"})
    assert r.status_code == 303
    assert [g.name for g in Instance.objects.get(name="w3").security_groups.all()] == ["default"]
