"""Published ports through the API: publish, bad input refused with a sentence, quota, audit, removal."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.management import CommandError, call_command

from compute.spec import InstanceForwards, Task, from_json
from portal.audit.models import Event
from portal.cloud import networks
from portal.cloud.models import ComputeNode, ExternalAddress, Instance, PublishedPort
from portal.tenancy.models import Quota
from tests.portal.conftest import FakeNodes, World

URL = "/api/v1/published-ports/"


def _forwards(sent: list[tuple[str, str, list[Any]]]) -> list[tuple[str, InstanceForwards]]:
    return [(q, from_json(InstanceForwards, args[0])) for q, task, args in sent if task == Task.FORWARDS]


@pytest.fixture
def web(world: World) -> Instance:
    inst = world.instance_a
    networks.allocate_port(inst.network, inst)
    call_command("node", "external-address", "shared-1", "198.18.129.1", "--ports", "20000-20002")
    return inst


def test_publish_tells_the_node_and_shows_on_the_instance(
    world: World, web: Instance, sent: list[tuple[str, str, list[Any]]], nodes: FakeNodes
) -> None:
    c = world.client("a_member")
    r = c.post(URL, {"instance": str(web.pk), "protocol": "tcp", "port": 80}, format="json")
    assert r.status_code == 201, r.json()
    body = r.json()
    assert (body["external_address"], body["external_port"], body["node"]) == (
        "198.18.129.1",
        20000,
        "shared-1",
    )
    assert body["url"] == "tcp://198.18.129.1:20000"
    ((queue, msg),) = _forwards(sent)
    assert queue == "node.shared-1" and msg.instance_id == str(web.pk)
    (fwd,) = msg.forwards
    assert (fwd.external_address, fwd.external_port, fwd.port) == ("198.18.129.1", 20000, 80)
    assert fwd.address == web.ports.get().address
    assert Event.objects.filter(action="publishedport.create", tenant=world.a).exists()
    # a second one takes the next free external port; both travel in the complete list
    r = c.post(
        URL, {"instance": str(web.pk), "protocol": "udp", "port": 53, "external_port": 20002}, format="json"
    )
    assert r.status_code == 201 and r.json()["external_port"] == 20002
    assert len(_forwards(sent)[-1][1].forwards) == 2
    listed = c.get(URL, {"instance": str(web.pk)}).json()
    assert listed["count"] == 2
    # other tenants do not see them; unpublishing sends the shorter list
    assert world.client("b_member").get(URL).json()["count"] == 0
    pk = body["id"]
    assert world.client("b_member").delete(f"{URL}{pk}/").status_code == 404
    assert c.delete(f"{URL}{pk}/").status_code == 204
    assert [f.port for f in _forwards(sent)[-1][1].forwards] == [53]


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        ({"protocol": "tcp", "port": 0}, 400, "greater than or equal to 1"),
        ({"protocol": "tcp", "port": 65536}, 400, "less than or equal to 65535"),
        ({"protocol": "sctp", "port": 80}, 400, "not a valid choice"),
        ({"protocol": "tcp", "port": "80"}, 400, "integer"),
        ({"protocol": "tcp", "port": 80, "external_port": 30000}, 409, "outside this node's published range"),
    ],
)
def test_bad_input_is_a_4xx_with_a_sentence(
    world: World, web: Instance, data: dict[str, Any], status: int, message: str
) -> None:
    r = world.client("a_member").post(URL, {"instance": str(web.pk), **data}, format="json")
    assert r.status_code == status, r.json()
    assert message in str(r.json())
    assert not PublishedPort.objects.exists()


def test_already_published_other_tenant_viewer_no_pool_and_quota(
    world: World, web: Instance, sent: list[tuple[str, str, list[Any]]]
) -> None:
    c = world.client("a_member")
    ok = c.post(URL, {"instance": str(web.pk), "protocol": "tcp", "port": 80}, format="json")
    assert ok.status_code == 201
    again = c.post(URL, {"instance": str(web.pk), "protocol": "tcp", "port": 80}, format="json")
    assert again.status_code == 409 and "already published" in str(again.json())
    taken = c.post(
        URL, {"instance": str(web.pk), "protocol": "tcp", "port": 81, "external_port": 20000}, format="json"
    )
    assert taken.status_code == 409 and "198.18.129.1:20000/tcp is already published" in str(taken.json())
    # another tenant's instance does not exist for you
    other = world.client("b_member").post(
        URL, {"instance": str(web.pk), "protocol": "tcp", "port": 22}, format="json"
    )
    assert other.status_code == 400 and "does not exist" in str(other.json())
    viewer = world.client("a_viewer").post(
        URL, {"instance": str(web.pk), "protocol": "tcp", "port": 22}, format="json"
    )
    assert viewer.status_code == 403
    # quota
    Quota.objects.update_or_create(tenant=world.a, defaults={**Quota.defaults(), "published_ports": 1})
    over = c.post(URL, {"instance": str(web.pk), "protocol": "tcp", "port": 443}, format="json")
    assert over.status_code == 409 and "quota of 1 published ports" in str(over.json())
    # a node without external addresses
    Instance.objects.filter(pk=web.pk).update(node=ComputeNode.objects.get(name="node-a"))
    Quota.objects.filter(tenant=world.a).update(published_ports=10)
    none = c.post(URL, {"instance": str(web.pk), "protocol": "tcp", "port": 8080}, format="json")
    assert none.status_code == 409 and "has no external address" in str(none.json())
    assert PublishedPort.objects.count() == 1


def test_deleting_the_instance_removes_its_ports(
    world: World, web: Instance, sent: list[tuple[str, str, list[Any]]]
) -> None:
    c = world.client("a_member")
    assert (
        c.post(URL, {"instance": str(web.pk), "protocol": "tcp", "port": 80}, format="json").status_code
        == 201
    )
    assert c.delete(f"/api/v1/instances/{web.pk}/").status_code == 202
    assert not PublishedPort.objects.exists()
    # the external address can go once nothing is published on it
    call_command("node", "external-address", "shared-1", "198.18.129.1", "--remove")
    assert not ExternalAddress.objects.exists()


@pytest.mark.django_db
def test_external_address_command_errors(world: World) -> None:
    with pytest.raises(CommandError, match="not an IPv4 address"):
        call_command("node", "external-address", "shared-1", "nope")
    with pytest.raises(CommandError, match="expected FIRST-LAST"):
        call_command("node", "external-address", "shared-1", "198.18.129.1", "--ports", "9-1")
    with pytest.raises(CommandError, match="no external address"):
        call_command("node", "external-address", "shared-1", "198.18.129.9", "--remove")
