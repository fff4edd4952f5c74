"""Tenant networks as resources: create (pool or own CIDR), quota, roles, several NICs at launch, delete."""

from __future__ import annotations

import ipaddress
import threading
from typing import Any

import pytest
from django.conf import settings
from django.db import connections

from compute.spec import CreateInstance, NetworkSegment, ReleaseNetwork, Task, from_json
from portal.cloud import networks
from portal.cloud.models import Instance, Network
from portal.tenancy.models import Quota
from tests.portal.conftest import FakeNodes, World

NETS = "/api/v1/networks/"


def _create(world: World, who: str = "a_member", **body: Any) -> Any:
    return world.client(who).post(NETS, {"tenant": "acme", **body}, format="json")


def _launch(world: World, name: str, **extra: Any) -> Any:
    body = {"tenant": "acme", "name": name, "image": "tiny:1", "kind": "vm", "flavor": world.flavor_public.pk}
    return world.client("a_member").post("/api/v1/instances/", body | extra, format="json")


def test_networks_come_from_the_pool_or_the_tenants_own_cidr(world: World) -> None:
    pool = ipaddress.ip_network(settings.SKYPORT_NETWORK_POOL)
    r = _create(world, name="back")
    assert r.status_code == 201, r.json()
    back = r.json()
    subnet = ipaddress.ip_network(back["cidr"])
    assert subnet.prefixlen == 24 and subnet.subnet_of(pool)
    assert back["gateway"] == str(subnet[1]) and back["dns"] == [back["gateway"]]
    assert back["vni"] >= 1 and back["instances"] == [] and back["tenant"] == "acme"
    small = _create(world, name="small", prefix_length=26).json()
    assert ipaddress.ip_network(small["cidr"]).prefixlen == 26
    assert not ipaddress.ip_network(small["cidr"]).overlaps(subnet)
    own = str(list(pool.subnets(new_prefix=24))[-1])
    r = _create(world, name="own", cidr=own)
    assert r.status_code == 201, r.json()
    assert r.json()["cidr"] == own and r.json()["gateway"] == str(ipaddress.ip_network(own)[1])
    listed = world.client("a_viewer").get(NETS).json()["results"]
    assert {n["name"] for n in listed} == {"default", "back", "small", "own"}  # default: the world's instance
    # another tenant sees none of them, and cannot read one by id
    assert world.client("b_member").get(NETS).json()["results"] == []
    assert world.client("b_member").get(f"{NETS}{back['id']}/").status_code == 404


def test_bad_cidrs_are_400_and_overlaps_409_with_a_sentence(world: World) -> None:
    pool = ipaddress.ip_network(settings.SKYPORT_NETWORK_POOL)
    inside = list(pool.subnets(new_prefix=24))
    for cidr, says in (
        ("not-a-cidr", "is not an IPv4 network address"),
        (f"{inside[0][5]}/24", "is not an IPv4 network address"),  # host bits set
        ("10.0.0.0/24", f"is not inside the network pool {pool}"),
        (f"{inside[0][0]}/29", "is too small"),
        ("fd00::/64", "is not an IPv4 network address"),
    ):
        r = _create(world, name="x", cidr=cidr)
        assert r.status_code == 400, (cidr, r.json())
        assert says in r.json()["errors"]["cidr"][0], r.json()
    r = _create(world, name="x", prefix_length=30)
    assert r.status_code == 400 and "prefix_length" in r.json()["errors"]
    r = _create(world, name="x", cidr=str(inside[3]), prefix_length=24)
    assert r.status_code == 400 and "not both" in r.json()["errors"]["prefix_length"][0]
    r = _create(world, name="Bad_Name")
    assert r.status_code == 400 and "name" in r.json()["errors"]
    r = _create(world, name="x", cidr=5)
    assert r.status_code == 400
    assert _create(world, name="mine", cidr=str(inside[3])).status_code == 201
    # the tenant's own network is named; it is a conflict with what exists (409)
    r = _create(world, name="again", cidr=str(inside[3].supernet(new_prefix=23)))
    assert r.status_code == 409, r.json()
    assert f"overlaps network mine ({inside[3]}) of tenant acme" in r.json()["message"]
    # another tenant's network is not named
    r = world.client("b_member").post(
        NETS, {"tenant": "bobco", "name": "x", "cidr": str(inside[3])}, format="json"
    )
    assert r.status_code == 409
    assert "overlaps a network of another tenant" in r.json()["message"] and "mine" not in r.json()["message"]
    r = _create(world, name="mine")
    assert r.status_code == 409 and "already has a network named mine" in r.json()["message"]
    assert r.json()["errors"] == {"name": [r.json()["message"]]}


def test_the_quota_counts_networks_default_included(world: World) -> None:
    Quota.objects.filter(tenant=world.a).update(networks=3)  # the world's instance made "default"
    assert Network.objects.filter(tenant=world.a).count() == 1
    assert _create(world, name="n1").status_code == 201
    assert _create(world, name="n2").status_code == 201
    r = _create(world, name="n3")
    assert r.status_code == 409 and r.json()["code"] == "quota_exceeded"
    assert r.json()["message"] == "Quota exceeded for networks: tenant acme has 3 of 3; delete one first."
    quota = world.client("a_admin").get("/api/v1/quotas/").json()["results"][0]
    assert quota["networks"] == 3 and quota["usage"]["networks"] == 3
    # bobco is not affected by acme's count
    r = world.client("b_member").post(NETS, {"tenant": "bobco", "name": "n1"}, format="json")
    assert r.status_code == 201


def test_viewers_read_but_cannot_create_or_delete(world: World) -> None:
    r = _create(world, "a_viewer", name="v")
    assert r.status_code == 403 and "member role" in r.json()["message"]
    net = _create(world, name="n").json()
    assert world.client("a_viewer").get(f"{NETS}{net['id']}/").status_code == 200
    assert world.client("a_viewer").delete(f"{NETS}{net['id']}/").status_code == 403
    assert world.client("b_admin").delete(f"{NETS}{net['id']}/").status_code == 404
    assert (
        world.client("a_member").patch(f"{NETS}{net['id']}/", {"name": "y"}, format="json").status_code == 405
    )


def test_an_instance_gets_one_nic_per_network_in_order_and_the_network_cannot_go_while_used(
    world: World, sent: list[tuple[str, str, list[Any]]], nodes: FakeNodes
) -> None:
    front = _create(world, name="front").json()
    back = _create(world, name="back").json()
    r = _launch(world, "two", networks=[back["id"], front["id"]])
    assert r.status_code == 202, r.json()
    inst = r.json()
    assert [a["network"] for a in inst["addresses"]] == ["back", "front"]
    (create,) = [from_json(CreateInstance, a[0]) for _, t, a in sent if t == Task.CREATE]
    nics = create.spec.networks
    assert [n.segment.network for n in nics] == ["acme/back", "acme/front"]
    assert [n.address.split("/")[0] for n in nics] == [a["address"] for a in inst["addresses"]]
    assert nics[0].gateway == back["gateway"] and nics[1].gateway is None  # one default route
    assert nics[0].dns == (back["gateway"],) and nics[1].dns == (front["gateway"],)
    assert len({n.mac for n in nics}) == 2 and nics[0].bridge != nics[1].bridge
    nodes.run()
    detail = world.client("a_viewer").get(f"{NETS}{front['id']}/").json()
    assert [(i["name"], i["nic"]) for i in detail["instances"]] == [("two", 1)]
    r = world.client("a_member").delete(f"{NETS}{front['id']}/")
    assert r.status_code == 409
    assert r.json()["message"] == "Network front is used by instances (two); delete them first."
    assert world.client("a_member").delete(f"/api/v1/instances/{inst['id']}/").status_code == 202
    nodes.run()
    assert Instance.objects.get(pk=inst["id"]).vm_state == "deleted"
    sent.clear()
    assert world.client("a_member").delete(f"{NETS}{front['id']}/").status_code == 204
    releases = [(q, from_json(ReleaseNetwork, a[0])) for q, t, a in sent if t == Task.RELEASE_NETWORK]
    assert [(q, m.network, m.bridge) for q, m in releases] == [
        ("node.shared-1", "acme/front", front["bridge"])
    ]
    assert not Network.objects.filter(pk=front["id"]).exists()
    # the deleted instance's row stays, its first NIC's network (back) too
    assert Instance.objects.get(pk=inst["id"]).network_id == back["id"]


def test_launch_refuses_foreign_unknown_and_repeated_networks(world: World) -> None:
    theirs = networks.create_network(world.b, "theirs")
    mine = _create(world, name="mine").json()
    for given, says in (
        ([theirs.pk], f"No network with id {theirs.pk}."),
        ([mine["id"], mine["id"]], "A network is given twice"),
        ([], "Ensure this field has at least 1 elements."),
        (["1"], "A valid integer is required."),
    ):
        r = _launch(world, "x", networks=given)
        assert r.status_code == 400, (given, r.json())
        assert says in str(r.json()["errors"]["networks"]), r.json()
    # a member of two tenants names a network of the other one
    world.users["a_member"].memberships.create(tenant=world.b, role="member")
    r = _launch(world, "x", networks=[theirs.pk])
    assert r.status_code == 400 and "belongs to tenant bobco" in r.json()["errors"]["networks"][0]


def test_without_networks_an_instance_joins_the_default_network_as_before(
    world: World, sent: list[tuple[str, str, list[Any]]]
) -> None:
    r = _launch(world, "one")
    assert r.status_code == 202, r.json()
    (create,) = [from_json(CreateInstance, a[0]) for _, t, a in sent if t == Task.CREATE]
    (nic,) = create.spec.networks
    default = networks.default_network(world.a)
    assert nic.segment.network == "acme/default" and nic.gateway == default.host_address


@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_of_overlapping_cidrs_never_leave_two_overlapping_networks(world: World) -> None:
    """Two tenants race for one /22 and the /24s inside it (own CIDRs) and for pool subnets: the unique
    cidr alone would let a /22 and a /24 inside it both in (PostgreSQL runs them side by side)."""
    Quota.objects.update(networks=20)
    block = list(ipaddress.ip_network(settings.SKYPORT_NETWORK_POOL).subnets(new_prefix=22))[-1]
    asks = [str(block)] + [str(s) for s in block.subnets(new_prefix=24)] + ["", "", ""]
    results: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(asks) * 2)

    def worker(who: str, tenant: str, i: int, cidr: str) -> None:
        try:
            c = world.client(who)
            barrier.wait()
            body = {"tenant": tenant, "name": f"race-{i}"} | (
                {"cidr": cidr} if cidr else {"prefix_length": 24}
            )
            r = c.post(NETS, body, format="json")
            with lock:
                results.append(r.status_code)
        finally:
            connections.close_all()

    threads = [
        threading.Thread(target=worker, args=(who, tenant, i, cidr))
        for who, tenant in (("a_member", "acme"), ("b_member", "bobco"))
        for i, cidr in enumerate(asks)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == len(threads) and set(results) <= {201, 409}, results
    nets = [ipaddress.ip_network(c) for c in Network.objects.values_list("cidr", flat=True)]
    clashes = [(a, b) for i, a in enumerate(nets) for b in nets[i + 1 :] if a.overlaps(b)]
    assert clashes == []
    # every pool pick got a subnet (there is room), and the /22 block is either whole or in /24s
    assert results.count(201) >= 6


def test_two_nic_instances_on_two_nodes_tunnel_both_networks(
    world: World, sent: list[tuple[str, str, list[Any]]], nodes: FakeNodes
) -> None:
    """Each NIC's segment gets its own VXLAN peers: a second instance with NICs on both networks, on
    another node, makes both networks' carriers learn the new peer (one ensure per network)."""
    from tests.portal.test_networks import _creates, _node

    _node("tn1", world.a, "198.51.100.1")
    _node("tn2", world.a, "198.51.100.2")
    front = networks.create_network(world.a, "front")
    back = networks.create_network(world.a, "back")
    body = {
        "networks": [front.pk, back.pk],
        "anti_affinity_group": "spread",
        "image": "busybox:1",
        "kind": "container",
    }
    first = _launch(world, "one", **body).json()
    nics1 = _creates(sent)[f"node.{first['node']}"].networks
    assert [(n.segment.vni, n.segment.tunnel_peers) for n in nics1] == [(front.vni, ()), (back.vni, ())]
    nodes.run()
    sent.clear()
    second = _launch(world, "two", **body).json()
    assert {first["node"], second["node"]} == {"tn1", "tn2"}
    nics2 = _creates(sent)[f"node.{second['node']}"].networks
    local1 = nics1[0].segment.tunnel_local
    assert [(n.segment.vni, n.segment.tunnel_peers) for n in nics2] == [
        (front.vni, (local1,)),
        (back.vni, (local1,)),
    ]
    ensures = [
        from_json(NetworkSegment, a[0])
        for q, t, a in sent
        if t == Task.ENSURE_NETWORK and q == f"node.{first['node']}"
    ]
    assert sorted((s.vni, s.tunnel_peers) for s in ensures) == sorted(
        [(front.vni, (nics2[0].segment.tunnel_local,)), (back.vni, (nics2[0].segment.tunnel_local,))]
    )
